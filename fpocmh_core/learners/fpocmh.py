"""FPO-CMH: fast partial-modal online cross-modal hashing (methods.md PART A).

Per arrival, in arrival order (A4.4): the item's categories, weight and target distributions are read
from the anchor bank as it stands, the streaming partial-modal loss (intra- and cross-modal anchor
terms) accumulates gradient in the item's own network, then the item is folded into the bank. Each
modality's optimiser steps once its own window of ``mu`` items is full, after adding the initial-anchor
rehearsal loss. Images and texts therefore step at different times (asynchronous optimisation).

Vectorised over micro-batches: a network changes only when its own window is full, so the items of a
modality's window go through that network in one forward/backward pass (with the rehearsal anchors of
its step), and the eval-mode codes the bank averages are computed once per stretch between two steps.
Only the bank recursion (an item's categories and targets depend on the bank after the previous item)
runs item by item, on K-row arrays. The result equals feeding the items one at a time (``learn`` on
single-item batches), up to floating point.

Deviations from the official code (A7), deliberate:
- the anchor codes in both loss terms are read from the bank's code tier (the running mean of the
  stored codes of each category), not recomputed as f(A) from tier 1 with gradient. So an item's loss
  sends gradient only into its own network, and its targets live in the code space of the stored
  database codes, which is what keeps new codes compatible with old ones;
- tier-2 prototypes average the items' eval-mode codes (what the encoder stores), not a dropout sample;
- running-mean bank updates instead of the 1/2 moving average, and row 0 is updated (see bank.py);
- rehearsal targets sign(f0(A0)) are computed in eval mode, and the rehearsal loss is weighted by gamma;
- separate feature spaces: targets from the item's category distribution (config/fpocmh.yaml), and
  a similarity scale re-chosen for those spaces (30; the paper's 100 is CLIP's);
- ``logit_scale`` multiplies the hash-side cosines (1 = the paper, the default).

Additions to the paper, on by default (config/fpocmh.yaml marks each; the paper's form is reachable by
``code_rehearsal.items: 0, code_rehearsal.stream: false, reservoir.items: 0, pairwise.weight: 0,
learner_codes: false, lr_schedule.start: 1, lr_schedule.decay_steps: 0`` and the paper's learning rate 1e-3):

- Stored-code rehearsal. The paper's rehearsal holds the K initial anchors to their initial codes, K
  points (24 here) in a 1,000-dimensional input space, which pins little of the function the database
  codes were written with: at the paper's learning rate the networks barely move, and at a rate where
  they learn from the stream the drift eats the gain. So each step also fits a batch of items' features
  to the codes they were stored with, the compatibility idea of backward-compatible training (Shen et al.,
  "Towards Backward-Compatible Representation Learning", CVPR 2020) applied to hash codes. The batch
  comes from the reservoir (``code_rehearsal.stream``), or from a fixed sample of the offline items.
- A reservoir (learners/reservoir.py): a uniform sample of the items seen so far, offline items first,
  each with the code the learner's model gave it on arrival (what the encoder stored, up to version
  lag), its categories and its features. Rehearsal that grows with the stream: when most of the
  database arrives online, the offline sample is a small and shrinking share of the stored codes.
- A pairwise term against stored codes: each arrival's code is compared, through DCMH's pairwise
  likelihood (the offline trainer's objective), with reservoir codes of both modalities, related when
  they share a category. The anchor terms compare an item with 24 category prototypes; this term gives
  the item-level signal the offline model was trained with, against codes that are in the database.
- Learner codes (``learner_codes``): every view the learner learnt from (weight > 0) is coded once more,
  by the learner's model, and that code replaces the encoder's (``report.codes``; the pipeline writes it
  after the encoder's, consumers/learner_codes.py). Coded on arrival, before the model had learnt from
  the item, a stored code missed the item's own lesson, which re-hashing then gave back: on MIRFlickr at
  offline share 0.05 that was half the gap between stored and re-hashed mAP. The learnt views wait in
  blocks (``learner_codes_block``; a pause in the stream codes what waits, :meth:`flush`): a view is
  coded by a model that has also learnt the views that came after it, not only its own batch. With
  ``reservoir.codes: stored`` the learner code of a labelled view also replaces the arrival code in its
  reservoir slot, so rehearsal holds the model to the codes the database holds. The two go together: coding in
  blocks alone puts the stored codes ahead of what the model re-hashes (they were written by models
  that had just learnt their neighbours), and rehearsing them pulls the model after them. Measured in
  docs/design-notes/learner-codes.md.
- A learning-rate schedule, ``lr * start / (1 + n / decay_steps)`` at a modality's n-th step: learn
  early, when the stored codes are few and the model knows least, and settle later, so that most stored
  codes are written by a model close to the final one (which is what keeps stored and re-hashed mAP
  together). A category the stream brings (promoted into the bank) starts it over, from ``restart_start``
  (15x rather than 5x): the schedule has decayed by then, and the new category would be learnt slowly.
  ``code_rehearsal.new_category_weight`` can also lighten the rehearsal from then on (off by default: it
  learns more with a strong offline model and lets stored codes fall behind with a weak one).
- A self-check (``code_rehearsal.self_check``, learners/self_check.py): on every stream, from its first
  learner codes, the learner measures on its reservoir how far the stored codes and its model have parted
  (retrieval over stored codes against the same items re-hashed now) and reports it; from the stream's
  first arrivals (``since: start``) or once the stream brings a category (``since: new_category``) it also
  holds each network to its codes from it: lighter rehearsal while the stored
  codes keep pace; heavier rehearsal, then a smaller learning rate, once the model runs ahead of them. A
  strong offline model then learns with light rehearsal and a weak one, or data the defaults were not chosen
  on, keeps its codes valid, with no setting tuned per dataset.
The configuration lives in learners/fpocmh_config.py; docs/design-notes/ has the measurements behind it.

One module: every term above shares one forward pass per step and the learner's state (bank, reservoir,
optimisers, waiting views); split apart, each term would reach into the others' tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fpocmh_core import codes, config, schemas
from fpocmh_core.bank import MODALITIES, AnchorBank, cosine, softmax
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners import common
from fpocmh_core.learners.base import CodeRecord, LearnReport, OnlineLearner
from fpocmh_core.learners.fpocmh_config import FpocmhConfig, load_config, load_vocabulary
from fpocmh_core.learners.reservoir import CodeReservoir
from fpocmh_core.learners.self_check import RehearsalWeights, stored_minus_rehashed
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState

# Logit for bank rows that did not exist yet when an item arrived (promoted later in its segment).
_ABSENT = -1e9


@dataclass
class _Learnt:
    """An arrival's view the learner learnt from, waiting to be coded (``learner_codes``); ``slot``: the
    reservoir slot its code goes to as well (``reservoir.codes: stored``, labelled views), or -1."""

    item_id: int
    modality: Modality
    x: np.ndarray
    present: tuple[Modality, ...]
    slot: int = -1


@dataclass
class _Targets:
    """What the bank said about one arrival, before the arrival was folded in (and its feature)."""

    x: np.ndarray
    q_intra: np.ndarray
    q_inter: np.ndarray
    weight: float
    own_codes: np.ndarray
    other_codes: np.ndarray
    # Pairwise term: reservoir codes (other modality's rows, then own), whether each is related, row weights.
    pair_codes: np.ndarray | None = None
    pair_related: np.ndarray | None = None


class FpocmhLearner(OnlineLearner):
    method = "fpocmh"

    def __init__(
        self,
        model: HashModel,
        bank: AnchorBank,
        cfg: FpocmhConfig,
        space: str,
        vocabulary: np.ndarray | None = None,
        replay: Mapping[Modality, tuple[np.ndarray, np.ndarray]] | None = None,
        reservoir: CodeReservoir | None = None,
    ) -> None:
        super().__init__(model)
        if space not in ("separate", "joint"):
            raise ValueError(f"space must be 'separate' or 'joint', got {space!r}")
        if vocabulary is not None and space != "joint":
            raise ValueError("zero-shot category embeddings need joint-space features")
        self.cfg, self.space, self.bank, self.vocabulary = cfg, space, bank, vocabulary
        # Per modality: (features, stored codes in {-1, 1}) of the stored-code rehearsal sample.
        self.replay = {m: (np.asarray(replay[m][0]), np.asarray(replay[m][1])) for m in MODALITIES} if replay else {}
        if (cfg.reservoir.items > 0) != (reservoir is not None):
            raise ValueError("a reservoir is needed exactly when reservoir.items > 0")
        self.reservoir = reservoir
        sample = cfg.pairwise.sample
        # Row weights of the pairwise term: the other modality's sample (cross-modal), then the own one.
        self.pair_weights = torch.tensor([1.0] * sample + [cfg.pairwise.intra] * sample) / sample
        self.model.eval()
        self.model.zero_grad(set_to_none=True)  # whatever offline training left behind is not online gradient
        lrs = {Modality.IMAGE: cfg.optimizer.lr_image, Modality.TEXT: cfg.optimizer.lr_text}
        self.optimizers = {m: cfg.optimizer.make(list(model.net(m).parameters()), lrs[m]) for m in MODALITIES}
        self.base_lr = lrs
        self.window = {m: 0 for m in MODALITIES}
        self.steps = {m: 0 for m in MODALITIES}
        self.rng_state = common.seeded_rng_state(cfg.seed)
        self.waiting: list[_Learnt] = []
        self.weights = RehearsalWeights(cfg.code_rehearsal.self_check, cfg.code_rehearsal.weight)
        # Views learnt since the last self-check, and whether it steers yet (``since``).
        self.unchecked = 0
        self.steered = False

    @property
    def bank_rows(self) -> int:
        return len(self.bank)

    @property
    def uncoded(self) -> int:
        return len(self.waiting)

    @property
    def rehearsal(self) -> dict[Modality, tuple[float, float, float]]:
        """Per modality, after the first self-check: (stored minus re-hashed mAP, rehearsal weight, lr scale)."""
        w = self.weights
        return {m: (gap, w.weights[m], w.lr_scales[m]) for m, gap in w.gaps.items()}

    def _self_checking(self) -> bool:
        rehearsal = self.cfg.code_rehearsal
        return rehearsal.self_checked and (rehearsal.self_check.since == "start" or self.bank.has_new_category)

    def _holding_codes(self) -> bool:
        hold = self.cfg.code_rehearsal.self_check.hold_codes
        return hold == "always" or (hold == "before_new_category" and not self.bank.has_new_category)

    def _holds(self, m: Modality) -> bool:
        """Whether modality ``m``'s learner codes are held back now (``self_check.hold_codes``)."""
        return self._holding_codes() and self.weights.holding[m]

    def _lr_scale(self, m: Modality) -> float:
        return self.weights.lr_scales[m] if self._self_checking() else 1.0

    def _rehearsal_weight(self, m: Modality) -> float:
        if self._self_checking():
            return self.weights.weights[m]
        return self.cfg.code_rehearsal.weight_for(self.bank.has_new_category)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_offline(
        cls,
        model: HashModel,
        ds: CrossModalDataset,
        rows: np.ndarray,
        cfg: FpocmhConfig,
    ) -> FpocmhLearner:
        """Build the bank from the offline rows with the offline ``model`` (which the learner takes over)."""
        space = ds.feature_space if cfg.feature_space == "auto" else cfg.feature_space
        vocab = load_vocabulary(cfg.category_embeddings) if cfg.category_embeddings else None
        if vocab is not None and space != "joint":
            raise config.ConfigError("fpocmh: category_embeddings need feature_space joint")
        feats = {Modality.IMAGE: ds.image[rows], Modality.TEXT: ds.text[rows]}
        relaxed = {m: model.relaxed(feats[m], m) for m in MODALITIES}
        if vocab is None:
            members = {m: ds.labels[rows] for m in MODALITIES}
        else:
            members = {m: zero_shot(feats[m], vocab, cfg.similarity_scale, cfg.theta) for m in MODALITIES}
        bank = AnchorBank.build(feats, relaxed, members, cfg.is_accessible_bank_count)
        reservoir = None
        if cfg.reservoir.items > 0:
            n_categories = ds.labels.shape[1] if vocab is None else len(vocab)
            dims = {m: feats[m].shape[1] for m in MODALITIES} if cfg.code_rehearsal.stream else None
            reservoir = CodeReservoir(cfg.reservoir.items, model.bits, n_categories, cfg.seed, dims)
            for m in MODALITIES:
                for row, x, h, cats in zip(rows, feats[m], relaxed[m], members[m], strict=True):
                    if cats.any():
                        reservoir.add(m, int(row), h, np.flatnonzero(cats), x)
        # Eval mode: the targets are the codes the offline model actually gave, without dropout noise.
        bank.set_rehearsal_targets(
            {m: codes.sign_codes(model.relaxed(bank.initial_feat[m], m)).astype(np.float32) for m in MODALITIES}
        )
        replay = {} if cfg.code_rehearsal.stream else stored_code_sample(model, feats, cfg)
        return cls(model, bank, cfg, space, vocab, replay, reservoir)

    @classmethod
    def bootstrap(
        cls,
        ds: CrossModalDataset,
        rows: np.ndarray,
        bits: int,
        overrides: dict | None = None,
        progress: bool = True,
    ) -> FpocmhLearner:
        cfg = load_config(overrides=overrides)
        return cls.from_offline(common.train_backbone(ds, rows, bits, cfg.offline, progress, cfg.seed), ds, rows, cfg)

    # ----------------------------------------------------------------- learning
    def learn(self, batch: Sequence[ItemRecord]) -> LearnReport:
        items = [rec for rec in batch if rec.chunk != -1]
        report = LearnReport(items=len(items))
        totals = {
            "intra": 0.0,
            "inter": 0.0,
            "weight": 0.0,
            "rehearsal": 0.0,
            "replay": 0.0,
            "pairwise": 0.0,
            "views": 0.0,
            "weighted": 0.0,
        }
        pending: dict[Modality, list[_Targets]] = {m: [] for m in MODALITIES}
        learnt: list[_Learnt] = []
        with common.private_rng(self):
            start = 0
            for end, stepping in self._step_points(items):
                self._observe(items[start:end], pending, totals, learnt)
                for m in stepping:
                    totals["rehearsal"] += self._backward(m, pending[m], totals, step=True)
                    report.steps[m.short] += 1
                start = end
            self._observe(items[start:], pending, totals, learnt)
            for m in MODALITIES:
                self._backward(m, pending[m], totals, step=False)
        if self.cfg.learner_codes:
            self.waiting.extend(learnt)
            if len(self.waiting) >= self.cfg.learner_codes_block:
                report.codes = self._code_waiting()
        report.losses = {
            "intra": totals["intra"] / max(totals["weighted"], 1.0),
            "inter": totals["inter"] / max(totals["weighted"], 1.0),
            "weight": totals["weight"] / max(totals["views"], 1.0),
            "rehearsal": totals["rehearsal"] / max(sum(report.steps.values()), 1),
        }
        if self.replay or self.cfg.code_rehearsal.stream:
            report.losses["replay"] = totals["replay"] / max(sum(report.steps.values()), 1)
        if self.cfg.pairwise.weight > 0:
            report.losses["pairwise"] = totals["pairwise"] / max(totals["weighted"], 1.0)
        return report

    def _step_points(self, items: list[ItemRecord]) -> list[tuple[int, tuple[Modality, ...]]]:
        """(index after the item, modalities) for every arrival that fills a modality's window."""
        fill = dict(self.window)
        out = []
        for i, rec in enumerate(items):
            full = []
            for m in rec.modalities:
                fill[m] += 1
                if fill[m] == self.cfg.mu:
                    fill[m] = 0
                    full.append(m)
            if full:
                out.append((i + 1, tuple(full)))
        return out

    def flush(self) -> LearnReport:
        """The stream paused: code the learnt views that wait for a full block."""
        return LearnReport(codes=self._code_waiting())

    def _code_waiting(self) -> list[CodeRecord]:
        """Codes of the waiting views by the current model (``learner_codes``), each also put in the view's
        reservoir slot when the reservoir rehearses stored codes (module docstring); none of a modality the
        self-check holds back (``self_check.hold_codes``)."""
        out = []
        for m in MODALITIES:
            views = [v for v in self.waiting if v.modality is m]
            if not views or self._holds(m):
                continue
            signs = codes.sign_codes(self.model.relaxed(np.stack([v.x for v in views]), m))
            packed = codes.pack(signs)
            out.extend(CodeRecord(v.item_id, m, packed[i], v.present) for i, v in enumerate(views))
            if self.cfg.reservoir.codes == "stored":
                for v, h in zip(views, signs, strict=True):
                    if v.slot >= 0:
                        self.reservoir.replace_code(m, v.slot, v.item_id, h)
        if self.cfg.code_rehearsal.self_checked:
            self._check(len(self.waiting))
        self.waiting = []
        return out

    def _check(self, learnt: int) -> None:
        """The self-check on every stream: the drift is measured (and reported, :attr:`rehearsal`) every
        ``every`` learnt views (coded or held back) from the start; it steers only once ``since`` allows."""
        steering = self._self_checking()
        if steering and not self.steered:
            # Steering's first check comes ``every`` views after it starts, as it did before the drift was
            # also measured on streams that never steer: the P3 tables stay what they were measured as.
            self.unchecked, self.steered = 0, True
        self.unchecked += learnt
        check = self.cfg.code_rehearsal.self_check
        if self.unchecked < check.every:
            return
        gaps = stored_minus_rehashed(self.model, self.reservoir, check.items, check.queries)
        if self._holding_codes():
            self.weights.hold(gaps)
        if steering:
            # Before a new category the check only guards: below the configured weight, bag-of-tags P1
            # lost 0.004 I->T (docs/design-notes/self-check.md); light rehearsal pays off for new categories.
            floor = None if self.bank.has_new_category else self.cfg.code_rehearsal.weight
            self.weights.update(gaps, floor)
        else:
            self.weights.gaps = dict(gaps)
        self.unchecked = 0

    def _observe(
        self,
        segment: list[ItemRecord],
        pending: dict[Modality, list[_Targets]],
        totals: dict[str, float],
        learnt: list[_Learnt],
    ) -> None:
        """Targets of each arrival in order, then the arrival folded into the bank (no optimiser step inside).
        Views with a positive weight are added to ``learnt``."""
        views = [(rec, m) for rec in segment for m in rec.modalities]
        mods = [m for m in MODALITIES if any(v is m for _, v in views)]
        feats = {m: np.stack([r.features(m) for r, v in views if v is m]).astype(np.float32) for m in mods}
        stored = {m: self.model.relaxed(x, m) for m, x in feats.items()}
        zs = {m: zero_shot(x, self.vocabulary, self.cfg.similarity_scale, self.cfg.theta) for m, x in feats.items()}
        seen = {m: 0 for m in MODALITIES}
        for rec, m in views:
            i = seen[m]
            seen[m] += 1
            x = feats[m][i]
            cats = [int(c) for c in np.flatnonzero(zs[m][i])] if self.vocabulary is not None else None
            cats, tgt = self._targets(rec, m, x, cats)
            if tgt.weight > 0:  # a weight-0 item adds nothing to the loss or its gradient
                pending[m].append(tgt)
            if self.bank.observe(m, x, stored[m][i], cats) and self.cfg.lr_schedule.restart_on_new_category:
                self.steps = {k: 0 for k in MODALITIES}
            slot = None
            if self.reservoir is not None and cats and (rec.labels is not None or self.cfg.reservoir.inferred):
                slot = self.reservoir.add(m, rec.item_id, stored[m][i], cats, x)
            if tgt.weight > 0 and self.cfg.learner_codes:
                # Only a labelled view's learner code joins rehearsal: an unlabelled view's codes the model's
                # own guess at its categories, and rehearsing it would entrench the guess (P1, label share 0).
                keep = slot is not None and rec.labels is not None
                learnt.append(_Learnt(rec.item_id, m, x, rec.modalities, slot if keep else -1))
            self.window[m] += 1
            totals["weight"] += tgt.weight
            totals["views"] += 1

    def _targets(
        self, rec: ItemRecord, m: Modality, x: np.ndarray, cats: list[int] | None
    ) -> tuple[list[int], _Targets]:
        """The arrival's categories and its loss targets, from the bank before the arrival is folded in."""
        bank, cfg = self.bank, self.cfg
        if cats is None and cfg.use_labels and rec.labels is not None:
            cats = [int(c) for c in np.flatnonzero(rec.labels)]
        rows = [bank.row_of[c] for c in cats or () if c in bank.row_of]
        if self.space == "separate" and rows:
            q_intra = np.zeros(len(bank), np.float32)
            q_intra[rows] = 1.0 / len(rows)
        else:
            q_intra = softmax(cfg.similarity_scale * bank.similarity(x, m))
        if self.space == "joint":
            q_inter = softmax(cfg.similarity_scale * cosine(x, bank.feat[m.other]))
        else:
            q_inter = q_intra
        if cats is None:
            cats = [bank.categories[r] for r in np.flatnonzero(q_intra > cfg.theta)]
        if not cats:
            weight = 0.0
        elif any(c in bank.row_of for c in cats):
            weight = 1.0
        else:
            weight = 1.0 - cfg.phi
        tgt = _Targets(x, q_intra, q_inter, weight, bank.code[m].copy(), bank.code[m.other].copy())
        if self.cfg.pairwise.weight > 0 and weight > 0:
            # Drawn now, keyed by how many items of this modality the reservoir has been offered: the same
            # rows whether the arrival comes alone or in a micro-batch.
            key, n = self.reservoir.seen[m], self.cfg.pairwise.sample
            drawn = [self.reservoir.sample(src, 2 * key + (src is m), n, cats) for src in (m.other, m)]
            tgt.pair_codes = np.concatenate([c for c, _ in drawn])
            tgt.pair_related = np.concatenate([r for _, r in drawn])
        return cats, tgt

    def _backward(self, m: Modality, tgts: list[_Targets], totals: dict[str, float], step: bool) -> float:
        """Gradient of the pending items' streaming loss (eq. 1) into network ``m``; on a step, plus rehearsal.

        Returns the rehearsal loss (0 without a step). Pending items are consumed.
        """
        if not tgts and not step:
            return 0.0
        net = self.model.net(m)
        # One forward pass over blocks: the pending items, then (on a step) the anchors and the replay rows.
        blocks = [np.stack([t.x for t in tgts])] if tgts else []
        replay_codes = None
        if step:
            blocks.append(self.bank.initial_feat[m])
            if self.replay or self.cfg.code_rehearsal.stream:
                replay_x, replay_codes = self._replay_batch(m)
                blocks.append(replay_x)
        net.train(self.cfg.online_dropout)
        out = net(torch.from_numpy(np.concatenate(blocks).astype(np.float32, copy=False)))
        net.eval()
        loss = torch.zeros(())
        if tgts:
            loss = loss + self._stream_loss(out[: len(tgts)], tgts, totals)
        rehearsal = torch.zeros(())
        if step:
            anchors = len(self.bank.initial_feat[m])
            at = len(tgts)
            targets = torch.from_numpy(self.bank.rehearsal_targets[m])
            rehearsal = self.cfg.gamma * ((out[at : at + anchors] - targets) ** 2).mean()
            loss = loss + rehearsal
            if replay_codes is not None:
                replayed = ((out[at + anchors :] - torch.from_numpy(replay_codes)) ** 2).mean()
                totals["replay"] += float(replayed.detach())
                loss = loss + self._rehearsal_weight(m) * replayed
        loss.backward()
        tgts.clear()
        if step:
            for group in self.optimizers[m].param_groups:
                factor = self.cfg.lr_schedule.factor(self.steps[m], self.bank.has_new_category)
                group["lr"] = self.base_lr[m] * factor * self._lr_scale(m)
            self.optimizers[m].step()
            self.optimizers[m].zero_grad(set_to_none=True)
            self.window[m] = 0
            self.steps[m] += 1
        return float(rehearsal.detach())

    def _replay_batch(self, m: Modality) -> tuple[np.ndarray, np.ndarray]:
        """``code_rehearsal.batch`` rows of the stored-code sample (or of the reservoir), drawn with the
        learner's own RNG."""
        if self.cfg.code_rehearsal.stream:
            take = torch.randperm(self.reservoir.size(m))[: self.cfg.code_rehearsal.batch].numpy()
            return self.reservoir.rehearsal(m, take)
        feats, stored = self.replay[m]
        take = torch.randperm(len(feats))[: self.cfg.code_rehearsal.batch].numpy()
        return feats[take], stored[take].astype(np.float32)

    def _stream_loss(self, out: torch.Tensor, tgts: list[_Targets], totals: dict[str, float]) -> torch.Tensor:
        """Sum over items of w * (alpha * L_intra + beta * L_inter) / mu, against code-tier snapshots."""
        k = len(self.bank)
        present = torch.zeros(len(tgts), k, dtype=torch.bool)
        for i, t in enumerate(tgts):
            present[i, : len(t.q_intra)] = True

        def stack(name: str, width: int | None = None) -> torch.Tensor:
            shape = (k,) if width is None else (k, width)
            arr = np.zeros((len(tgts), *shape), np.float32)
            for i, t in enumerate(tgts):
                row = getattr(t, name)
                arr[i, : len(row)] = row
            return torch.from_numpy(arr)

        h = F.normalize(out, dim=1)

        def ce(q: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
            z = self.cfg.logit_scale * torch.einsum("nc,nkc->nk", h, F.normalize(anchors, dim=2))
            logp = F.log_softmax(z.masked_fill(~present, _ABSENT), dim=1)
            return -(q * logp).sum(dim=1)

        intra = ce(stack("q_intra"), stack("own_codes", self.bits))
        inter = ce(stack("q_inter"), stack("other_codes", self.bits))
        weight = torch.tensor([t.weight for t in tgts])
        totals["intra"] += float(intra.detach().sum())
        totals["inter"] += float(inter.detach().sum())
        totals["weighted"] += len(tgts)
        per_item = self.cfg.alpha * intra + self.cfg.beta * inter
        if self.cfg.pairwise.weight > 0:
            pairwise = self._pairwise_loss(out, tgts)
            totals["pairwise"] += float(pairwise.detach().sum())
            per_item = per_item + self.cfg.pairwise.weight * pairwise
        return (weight * per_item).sum() / self.cfg.mu

    def _pairwise_loss(self, out: torch.Tensor, tgts: list[_Targets]) -> torch.Tensor:
        """Per item: DCMH's pairwise likelihood of the item's code against its reservoir rows' stored codes,
        theta = scale * <h, b> / bits, related = a shared category; rows weighted by ``pair_weights``."""
        stored = torch.from_numpy(np.stack([t.pair_codes for t in tgts]))
        related = torch.from_numpy(np.stack([t.pair_related for t in tgts]))
        theta = self.cfg.pairwise.scale * torch.einsum("nc,nrc->nr", out, stored) / self.bits
        return ((F.softplus(theta) - related * theta) * self.pair_weights).sum(dim=1)

    # ----------------------------------------------------------------- state
    def export_state(self) -> ModelState:
        tensors = {**self.model.tensors("model"), **self.bank.tensors("bank"), "rng": self.rng_state.numpy().copy()}
        for m in MODALITIES:
            tensors.update(common.optimizer_tensors(self.optimizers[m], f"optim.{m.short}"))
            tensors.update(common.grad_tensors(self.model.net(m), f"grad.{m.short}"))
        if self.vocabulary is not None:
            tensors["vocabulary"] = self.vocabulary
        if self.reservoir is not None:
            tensors.update(self.reservoir.tensors("reservoir"))
        for m, (feats, stored) in self.replay.items():
            tensors[f"replay.feat.{m.short}"] = feats
            tensors[f"replay.code.{m.short}"] = stored
        tensors.update(_waiting_tensors(self.waiting, {m: self.model.net(m).in_dim for m in MODALITIES}))
        meta = {
            "arch": self.model.arch(),
            "config": config.to_dict(self.cfg),
            "feature_space": self.space,
            "window": {m.short: self.window[m] for m in MODALITIES},
            "steps": {m.short: self.steps[m] for m in MODALITIES},
            "rehearsal": {**self.weights.to_meta(), "unchecked": self.unchecked, "steered": self.steered},
        }
        return ModelState(self.method, self.version, self.parent_version, tensors, meta)

    @classmethod
    def from_state(cls, state: ModelState) -> FpocmhLearner:
        # States written before a setting existed learnt without it, and keep doing so: no stored-code
        # rehearsal, reservoir, pairwise term or schedule; rehearsal from the offline sample.
        saved = {
            "code_rehearsal": {"items": 0, "batch": 1, "weight": 0.0},
            "reservoir": {"items": 0, "inferred": False},
            "lr_schedule": {"start": 1.0, "decay_steps": 0.0},
            "pairwise": {"weight": 0.0, "intra": 0.0, "scale": 1.0, "sample": 1},
            "learner_codes": False,
            "learner_codes_block": 0,
            "online_dropout": True,
            **state.meta["config"],
        }
        saved["reservoir"] = {"codes": "arrival", **saved["reservoir"]}
        saved["code_rehearsal"] = {
            "stream": False,
            "new_category_weight": None,
            "self_check": {"every": 0, "items": 1, "queries": 1, "band": 1.0, "min_weight": 0.0},
            **saved["code_rehearsal"],
        }
        # States from before the self-check ran from the stream's start steered only after a new category.
        saved["code_rehearsal"]["self_check"] = {
            "max_weight": 0.0,
            "min_lr_scale": 1.0,
            "since": "new_category",
            "two_sided": False,
            "hold_codes": "never",
            **saved["code_rehearsal"]["self_check"],
        }
        saved["lr_schedule"] = {"restart_on_new_category": False, "restart_start": None, **saved["lr_schedule"]}
        cfg = config.build(FpocmhConfig, saved, "fpocmh state")
        model = HashModel.from_tensors(state.meta["arch"], state.subset("model"))
        bank = AnchorBank.from_tensors(state.subset("bank"), cfg.is_accessible_bank_count)
        vocab = np.array(state.tensors["vocabulary"]) if "vocabulary" in state.tensors else None
        replay = {
            m: (np.array(state.tensors[f"replay.feat.{m.short}"]), np.array(state.tensors[f"replay.code.{m.short}"]))
            for m in MODALITIES
            if f"replay.feat.{m.short}" in state.tensors
        }
        reservoir = CodeReservoir.from_tensors(state.subset("reservoir"), cfg.seed) if cfg.reservoir.items else None
        learner = cls(model, bank, cfg, state.meta["feature_space"], vocab, replay, reservoir)
        for m in MODALITIES:
            common.load_optimizer_tensors(learner.optimizers[m], state.subset(f"optim.{m.short}"))
            common.load_grad_tensors(model.net(m), state.subset(f"grad.{m.short}"))
            learner.window[m] = int(state.meta["window"][m.short])
            learner.steps[m] = int(state.meta["steps"][m.short])
        learner.rng_state = torch.from_numpy(np.array(state.tensors["rng"]))
        learner.waiting = _waiting_views(state)
        if "rehearsal" in state.meta:  # states from before the self-check keep the configured weight
            learner.weights.load_meta(state.meta["rehearsal"])
            learner.unchecked = int(state.meta["rehearsal"]["unchecked"])
            # States from before the drift was measured on every stream counted only while steering.
            learner.steered = bool(state.meta["rehearsal"].get("steered", learner._self_checking()))
        learner.version, learner.parent_version = state.version, state.parent_version
        return learner


def _waiting_tensors(views: list[_Learnt], dims: Mapping[Modality, int]) -> dict[str, np.ndarray]:
    """The learnt views that wait for their codes, per modality, for the learner's checkpoint."""
    out = {}
    for m in MODALITIES:
        mine = [v for v in views if v.modality is m]
        out[f"waiting.id.{m.short}"] = np.array([v.item_id for v in mine], np.int64)
        out[f"waiting.slot.{m.short}"] = np.array([v.slot for v in mine], np.int64)
        out[f"waiting.present.{m.short}"] = np.array([schemas.modality_mask(v.present) for v in mine], np.uint8)
        out[f"waiting.feat.{m.short}"] = (
            np.stack([v.x for v in mine]).astype(np.float32) if mine else np.zeros((0, dims[m]), np.float32)
        )
    return out


def _waiting_views(state: ModelState) -> list[_Learnt]:
    """Inverse of :func:`_waiting_tensors` (none in states saved before learnt views waited)."""
    views = []
    for m in MODALITIES:
        if f"waiting.id.{m.short}" not in state.tensors:
            continue
        t = {k: np.asarray(state.tensors[f"waiting.{k}.{m.short}"]) for k in ("id", "slot", "present", "feat")}
        views.extend(
            _Learnt(int(i), m, x, schemas.mask_modalities(int(p)), int(s))
            for i, s, p, x in zip(t["id"], t["slot"], t["present"], t["feat"], strict=True)
        )
    return views


def stored_code_sample(
    model: HashModel, feats: Mapping[Modality, np.ndarray], cfg: FpocmhConfig
) -> dict[Modality, tuple[np.ndarray, np.ndarray]]:
    """A seeded sample of the offline items, per modality: features (float16, which holds both kinds of
    feature here to ~3 digits and halves the state) and the codes the offline model stored (int8 +-1)."""
    n = min(cfg.code_rehearsal.items, *(len(x) for x in feats.values()))
    if n == 0:
        return {}
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(feats[Modality.IMAGE]), n, replace=False))
    out = {}
    for m in MODALITIES:
        x = np.asarray(feats[m][rows], dtype=np.float32)
        out[m] = (x.astype(np.float16), codes.sign_codes(model.relaxed(x, m)).astype(np.int8))
    return out


def zero_shot(x: np.ndarray, vocabulary: np.ndarray | None, scale: float, theta: float) -> np.ndarray | None:
    """Paper A4.2: categories {k : softmax(scale * cos(x, E))_k > theta}, as an (items x V) bool matrix."""
    if vocabulary is None:
        return None
    return softmax(scale * cosine(x, vocabulary)) > theta
