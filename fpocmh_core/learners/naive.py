"""Naive online fine-tuning: the baseline that shows what FPO-CMH's bank and rehearsal are for.

The offline model keeps training on each micro-batch as it arrives, with the same networks and
optimiser settings as FPO-CMH, but no anchor bank and no rehearsal: one step per micro-batch on the
offline trainer's own objective (DCMH's pairwise likelihood, fpocmh_core/offline.py, same weights and
scale from config/offline.yaml), over image-text, image-image and text-text pairs of the micro-batch.
Only pairs whose relation is known count: both items carry labels (related = they share a label), or
they are the two halves of one pair (related).

At label share 0 with every item unimodal (the paper's setting) no relation is known: without a bank
there is nothing an unpaired, unlabelled item could be compared with, so the naive learner does not
step and stays equal to the frozen model. Paired arrivals still teach it (their own pair is related).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fpocmh_core import config
from fpocmh_core.bank import MODALITIES
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners import common
from fpocmh_core.learners.base import LearnReport, OnlineLearner
from fpocmh_core.nets import HashModel
from fpocmh_core.offline import load_offline_config
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState


@dataclass(frozen=True)
class NaiveConfig:
    seed: int
    optimizer: common.OptimizerConfig
    offline: dict[str, Any]


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> NaiveConfig:
    return config.load(NaiveConfig, "naive", path, overrides)


class NaiveLearner(OnlineLearner):
    method = "naive"

    def __init__(self, model: HashModel, cfg: NaiveConfig) -> None:
        super().__init__(model)
        self.cfg = cfg
        self.offline = load_offline_config(overrides=dict(cfg.offline))
        self.model.eval()
        self.model.zero_grad(set_to_none=True)  # whatever offline training left behind is not online gradient
        lrs = {Modality.IMAGE: cfg.optimizer.lr_image, Modality.TEXT: cfg.optimizer.lr_text}
        self.optimizers = {m: cfg.optimizer.make(list(model.net(m).parameters()), lrs[m]) for m in MODALITIES}
        self.rng_state = common.seeded_rng_state(cfg.seed)

    @classmethod
    def bootstrap(
        cls,
        ds: CrossModalDataset,
        rows: np.ndarray,
        bits: int,
        overrides: dict | None = None,
        progress: bool = True,
    ) -> NaiveLearner:
        cfg = load_config(overrides=overrides)
        return cls(common.train_backbone(ds, rows, bits, cfg.offline, progress, cfg.seed), cfg)

    def learn(self, batch: Sequence[ItemRecord]) -> LearnReport:
        items = [rec for rec in batch if rec.chunk != -1]
        report = LearnReport(items=len(items))
        views = {m: [i for i, rec in enumerate(items) if rec.features(m) is not None] for m in MODALITIES}
        blocks = [(a, b, w, *_known(items, views[a], views[b], a is b)) for a, b, w in self._blocks()]
        blocks = [block for block in blocks if block[3].any()]
        if not blocks:
            return report
        with common.private_rng(self):
            h = {}
            for m in MODALITIES:
                if views[m]:
                    net = self.model.net(m)
                    net.train()
                    h[m] = net(torch.from_numpy(np.stack([items[i].features(m) for i in views[m]])))
                    net.eval()
            loss = torch.zeros(())
            for a, b, weight, known, related in blocks:
                theta = self.offline.logit_scale * (h[a] @ h[b].T) / self.bits
                nll = F.softplus(theta) - torch.from_numpy(related.astype(np.float32)) * theta
                loss = loss + weight * nll[torch.from_numpy(known)].mean()
            loss.backward()
            for m in MODALITIES:
                if any(p.grad is not None for p in self.model.net(m).parameters()):
                    self.optimizers[m].step()
                    report.steps[m.short] += 1
                self.optimizers[m].zero_grad(set_to_none=True)
        report.losses = {"pairwise": float(loss.detach())}
        return report

    def _blocks(self) -> list[tuple[Modality, Modality, float]]:
        """(modality, modality, weight) of each pair block, weighted as in the offline objective."""
        img, txt = Modality.IMAGE, Modality.TEXT
        return [
            (img, txt, self.offline.w_cross),
            (img, img, self.offline.w_intra / 2),
            (txt, txt, self.offline.w_intra / 2),
        ]

    def export_state(self) -> ModelState:
        tensors = {**self.model.tensors("model"), "rng": self.rng_state.numpy().copy()}
        for m in MODALITIES:
            tensors.update(common.optimizer_tensors(self.optimizers[m], f"optim.{m.short}"))
        meta = {"arch": self.model.arch(), "config": config.to_dict(self.cfg)}
        return ModelState(self.method, self.version, self.parent_version, tensors, meta)

    @classmethod
    def from_state(cls, state: ModelState) -> NaiveLearner:
        cfg = config.build(NaiveConfig, state.meta["config"], "naive state")
        learner = cls(HashModel.from_tensors(state.meta["arch"], state.subset("model")), cfg)
        for m in MODALITIES:
            common.load_optimizer_tensors(learner.optimizers[m], state.subset(f"optim.{m.short}"))
        learner.rng_state = torch.from_numpy(np.array(state.tensors["rng"]))
        learner.version, learner.parent_version = state.version, state.parent_version
        return learner


def _known(items: list[ItemRecord], rows: list[int], cols: list[int], same_side: bool) -> tuple[np.ndarray, np.ndarray]:
    """(known, related) between two lists of arrivals: labels on both, or the two halves of one pair."""
    rec_r, rec_c = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
    same = rec_r[:, None] == rec_c[None, :]
    lab_r = [items[i].labels for i in rows]
    lab_c = [items[i].labels for i in cols]
    has_r = np.array([lab is not None for lab in lab_r], dtype=bool)
    has_c = np.array([lab is not None for lab in lab_c], dtype=bool)
    share = np.zeros(same.shape, dtype=bool)
    if has_r.any() and has_c.any():
        a = np.stack([lab for lab in lab_r if lab is not None]).astype(np.float32)
        b = np.stack([lab for lab in lab_c if lab is not None]).astype(np.float32)
        share[np.ix_(has_r, has_c)] = (a @ b.T) > 0
    known = (has_r[:, None] & has_c[None, :]) | same
    if same_side:
        known &= ~same  # an item with itself says nothing
    return known, same | share
