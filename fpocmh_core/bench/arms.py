"""The methods of ``fpocmh bench stream`` as arms: how each encodes now, how it learns, what it has stored.

Every arm stores database codes as the pipeline does. The encoder hashes each arrival's present
modalities with the model of that moment (the offline part, before the stream, with version 0); codes a
learner assigns itself (``LearnReport.codes``, written by the pipeline's learner role as ``source:
learner``) then replace the encoder's codes of those items, last write wins as on the compacted codes
topic. FPO-CMH (``learner_codes``) codes the views it learnt in blocks of ``learner_codes_block``; the
bench never pauses it, so the views of the last, unfilled block keep the encoder's codes (the pipeline
codes them once the stream has paused for ``learner.flush_after_s``). DLCH: at each chunk end the bench
calls ``finish_increment``, the chunk being DLCH's increment (in the pipeline the increment closes when
the next chunk's first arrival reaches the learner, or when the stream pauses), and the codes of that
increment replace the encoder's: DCC codes for the items it learned from, codes of its updated networks
for the ones it could not learn from. The offline rows keep the encoder's version-0 codes, as in a
replay, not DLCH's original-phase codes B_o.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners.base import LearnReport, OnlineLearner
from fpocmh_core.nets import HashModel
from fpocmh_core.protocols import StreamSplit
from fpocmh_core.records import ItemRecord, Modality

METHODS = ("frozen", "naive", "retrain", "cca", "fpocmh", "dlch")
# Learners tuned through a config file of their own, overridable with --<name>-set KEY=VALUE.
CONFIGURED = ("fpocmh", "dlch", "naive", "offline")


@dataclass
class Arm:
    """One method in the run: how it encodes now, how it learns, and the codes it has stored."""

    name: str
    encode: Callable[[np.ndarray, Modality], np.ndarray]
    learn: Callable[[list[ItemRecord]], LearnReport | None] | None = None
    end_chunk: Callable[[], LearnReport | None] | None = None
    static: bool = False  # the model never changes, so re-hashing gives the stored codes back
    stored: dict[Modality, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def store(self, batch: list[ItemRecord]) -> None:
        """What the encoder does on arrival: hash each present modality with the model of this moment."""
        for m in Modality:
            recs = [r for r in batch if r.features(m) is not None]
            if recs:
                self.stored[m][[r.item_id for r in recs]] = self.encode(np.stack([r.features(m) for r in recs]), m)

    def step(self, call: Callable[..., LearnReport | None], *args: Any) -> float:
        """Run a learning call, write the codes it assigned, and return the seconds the call took."""
        start = time.perf_counter()
        report = call(*args)
        seconds = time.perf_counter() - start
        for code in report.codes if report is not None else ():
            self.stored[code.modality][code.item_id] = code.code
        return seconds


class Retrainer:
    """Full retraining from scratch after each chunk on everything seen so far (labelled items only)."""

    def __init__(self, ds: CrossModalDataset, split: StreamSplit, bits: int, off_cfg: Any, seed: int, model: HashModel):
        self.ds, self.split, self.bits, self.off_cfg, self.seed = ds, split, bits, off_cfg, seed
        self.model = model
        self.images: list[int] = []
        self.texts: list[int] = []
        self.trained_on = (0, 0)

    def encode(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        return self.model.encode(x, modality)

    def collect(self, batch: list[ItemRecord]) -> None:
        for rec in batch:
            if rec.labels is None:
                continue
            if rec.image is not None:
                self.images.append(rec.item_id)
            if rec.text is not None:
                self.texts.append(rec.item_id)

    def retrain(self) -> None:
        """Retrain unless nothing new carried labels (the result would be the same model)."""
        from fpocmh_core.offline import TrainingSet, train_offline

        if (len(self.images), len(self.texts)) == self.trained_on:
            return
        # The offline pairs, then every labelled stream image and text (unpaired: labels relate them).
        off = self.split.offline
        images = np.concatenate([off, np.asarray(self.images, dtype=np.int64)])
        texts = np.concatenate([off, np.asarray(self.texts, dtype=np.int64)])
        pairs = np.stack([np.arange(off.size)] * 2, axis=1)
        ds = self.ds
        data = TrainingSet(ds.image[images], ds.labels[images], ds.text[texts], ds.labels[texts], pairs)
        self.model = train_offline(data, self.bits, self.off_cfg, progress=False, seed=self.seed).model
        self.trained_on = (len(self.images), len(self.texts))


def check_overrides(args: argparse.Namespace) -> None:
    """Load every ``--<name>-set`` against its config, so that a bad key or value fails before anything trains.

    Raises :class:`~fpocmh_core.config.ConfigError` naming the key and what it expected."""
    from fpocmh_core.learners.dlch_train import DlchConfig
    from fpocmh_core.learners.fpocmh import load_config as load_fpocmh_config
    from fpocmh_core.learners.naive import load_config as load_naive_config
    from fpocmh_core.offline import load_offline_config

    loaders: dict[str, Callable[[dict[str, Any]], Any]] = {
        "fpocmh": lambda o: load_fpocmh_config(overrides=o),
        "naive": lambda o: load_naive_config(overrides=o),
        "offline": lambda o: load_offline_config(overrides=o),
        "dlch": lambda o: config.load(DlchConfig, "dlch", overrides=o),
    }
    for name in CONFIGURED:
        loaders[name](config.parse_overrides(getattr(args, f"{name}_set")))


def _from_learner(name: str, learner: OnlineLearner) -> Arm:
    return Arm(name, learner.encode, learner.learn)


def build(
    args: argparse.Namespace,
    methods: list[str],
    ds: CrossModalDataset,
    split: StreamSplit,
    bits: int,
    seed: int,
    model0: HashModel,
    off_cfg: Any,
) -> dict[str, Arm]:
    """The arms of ``methods`` on one seed's stream, every one with the offline rows stored.

    ``model0`` is the offline model frozen, naive, retrain and fpocmh start from; DLCH starts from its
    own original phase on the same offline rows (as ``fpocmh run`` with ``method: dlch`` does)."""
    from fpocmh_core.baselines import CCAHasher
    from fpocmh_core.learners.dlch import DlchLearner
    from fpocmh_core.learners.fpocmh import FpocmhLearner
    from fpocmh_core.learners.fpocmh import load_config as load_fpocmh_config
    from fpocmh_core.learners.naive import NaiveLearner
    from fpocmh_core.learners.naive import load_config as load_naive_config

    def overrides(name: str) -> dict[str, Any]:
        return {"seed": seed, **config.parse_overrides(getattr(args, f"{name}_set"))}

    arms: dict[str, Arm] = {}
    for name in methods:
        if name == "frozen":
            arms[name] = Arm(name, model0.encode, static=True)
        elif name == "cca":
            cca = CCAHasher(bits).fit(ds.image[split.offline], ds.text[split.offline])
            arms[name] = Arm(name, cca.encode, static=True)
        elif name == "naive":
            cfg = load_naive_config(overrides=overrides(name))
            arms[name] = _from_learner(name, NaiveLearner(copy.deepcopy(model0), cfg))
        elif name == "fpocmh":
            learner = FpocmhLearner.from_offline(
                copy.deepcopy(model0), ds, split.offline, load_fpocmh_config(overrides=overrides(name))
            )
            arms[name] = _from_learner(name, learner)
            print(f"[{bits} bits, seed {seed}] fpocmh: {learner.space}-space form, {len(learner.bank)} bank rows")
        elif name == "dlch":
            start = time.perf_counter()
            dlch = DlchLearner.bootstrap(ds, split.offline, bits, overrides(name), progress=not args.quiet)
            arms[name] = Arm(name, dlch.encode, dlch.learn, dlch.finish_increment)
            print(f"[{bits} bits, seed {seed}] dlch original phase: {time.perf_counter() - start:.1f}s")
        elif name == "retrain":
            retrainer = Retrainer(ds, split, bits, off_cfg, seed, copy.deepcopy(model0))
            arms[name] = Arm(name, retrainer.encode, retrainer.collect, retrainer.retrain)
    for arm in arms.values():
        arm.stored = {m: np.zeros((len(ds), bits // 8), np.uint8) for m in Modality}
        arm.store([ItemRecord(int(r), ds.image[r], ds.text[r]) for r in split.offline])
    return arms
