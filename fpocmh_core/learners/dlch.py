"""DLCH lifelong learner: frozen database codes, increments learned from a sample, new codes by DCC.

How it fits the streaming pipeline. DLCH learns per *increment*, not per item: ``learn`` buffers the
paired, labelled records of the current increment (``ItemRecord.chunk``; chunk -1 is original data and
is ignored) and runs the lifelong update when the increment is complete: when a record of another
chunk arrives, when ``finish_increment()`` is called, or when ``lifelong.buffer_size`` records are
buffered. The update's codes for the increment's items come back in ``LearnReport.codes``: for the
items of an increment the DLCH learner, not the encoder, writes the database codes. Those codes then
join the frozen set, which no later update changes (only codes of the current increment are written).

Codes are per modality (B_x from image, B_y from text, as in the code's original phase); the code's
unified sign(B_x + B_y) would give 0-valued bits where they disagree (B5). Omega is drawn from the
whole current database: the frozen part through a uniform reservoir of old items whose features the
learner keeps (``lifelong.reservoir``), the new part from the increment itself, in proportion to
their sizes.

What happens to an arrival DLCH cannot use as it arrives. The lifelong loss needs an item's image,
its text and its labels. DLCH **buffers** every arrival of the increment, then joins the two halves of
a pair that arrived apart (a partial-modal stream splits pairs into an image-only and a text-only item
within a chunk; labels carried by either half count for the pair). What is then paired and labelled
is learned; the rest (no labels, or a half whose other half did not arrive in the same increment) is
**coded by the updated networks without learning** and not added to the frozen set. Each arrival is
counted once in ``LearnReport.outcomes`` when its increment is learned:

- ``learned``: it entered the lifelong update (a paired arrival, or one half of a joined pair);
- ``coded``: coded by the updated networks without learning (unlabelled, or its other half missing);
- ``known``: its item already holds frozen codes (a redelivery), left as stored;
- ``offline``: chunk -1, the original data version 0 was trained on.

``LearnReport.pending`` is the number of arrivals buffered in the open increment. Nothing is dropped: a
stopped learner exports the buffer with its state, and :meth:`flush` learns it (the stream ended).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fpocmh_core import codes, config
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners.base import CodeRecord, LearnReport, OnlineLearner, model_from_state
from fpocmh_core.learners.dlch_train import (
    DlchConfig,
    LifelongProblem,
    LifelongResult,
    train_lifelong,
    train_original,
)
from fpocmh_core.nets import HashModel, HashNet
from fpocmh_core.records import ItemRecord, Modality
from fpocmh_core.state import ModelState

_ARRAYS = ("ids", "image", "text", "labels")


def _empty_items(dims: tuple[int, int], n_labels: int, bits: int) -> dict[str, dict[str, np.ndarray]]:
    width = bits // 8
    return {
        "frozen": {
            "ids": np.zeros(0, np.int64),
            "image": np.zeros((0, width), np.uint8),
            "text": np.zeros((0, width), np.uint8),
            "labels": np.zeros((0, n_labels), np.uint8),
        },
        "reservoir": {
            "ids": np.zeros(0, np.int64),
            "image": np.zeros((0, dims[0]), np.float32),
            "text": np.zeros((0, dims[1]), np.float32),
            "labels": np.zeros((0, n_labels), np.uint8),
        },
    }


def positions(all_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` id inside ``all_ids`` (all must be present)."""
    order = np.argsort(all_ids, kind="stable")
    pos = order[np.searchsorted(all_ids, wanted, sorter=order)]
    if not np.array_equal(all_ids[pos], wanted):
        raise KeyError("some ids are not in the set")
    return pos


def merge_reports(into: LearnReport, other: LearnReport) -> None:
    for key, value in other.steps.items():
        into.steps[key] = into.steps.get(key, 0) + value
    for key, value in other.outcomes.items():
        into.outcomes[key] = into.outcomes.get(key, 0) + value
    into.losses.update(other.losses)
    into.codes.extend(other.codes)


def join_halves(records: Sequence[ItemRecord]) -> tuple[dict[int, ItemRecord], Counter[int]]:
    """One record per item, in first-arrival order: an item's image, text and labels from whichever of
    its arrivals carried them; plus how many arrivals each item had."""
    parts: dict[int, dict[str, np.ndarray | None]] = {}
    arrivals: Counter[int] = Counter()
    for r in records:
        arrivals[r.item_id] += 1
        item = parts.setdefault(r.item_id, {"image": None, "text": None, "labels": None, "chunk": r.chunk})
        for key in ("image", "text", "labels"):
            if item[key] is None:
                item[key] = getattr(r, key)
    joined = {i: ItemRecord(i, p["image"], p["text"], p["labels"], int(p["chunk"])) for i, p in parts.items()}
    return joined, arrivals


class DlchLearner(OnlineLearner):
    method = "dlch"

    def __init__(
        self,
        model: HashModel,
        label_net: HashNet,
        cfg: DlchConfig,
        items: dict[str, dict[str, np.ndarray]],
        reservoir_seen: int,
        updates: int = 0,
    ) -> None:
        super().__init__(model)
        self.label_net = label_net
        self.cfg = cfg
        self.frozen = items["frozen"]
        self.reservoir = items["reservoir"]
        self.reservoir_seen = reservoir_seen
        self.updates = updates
        self.pending: list[ItemRecord] = []
        self.pending_chunk: int | None = None

    # ---- original phase -------------------------------------------------------------------------

    @classmethod
    def bootstrap(
        cls,
        ds: CrossModalDataset,
        rows: np.ndarray,
        bits: int,
        overrides: dict | None = None,
        progress: bool = True,
    ) -> DlchLearner:
        cfg = config.load(DlchConfig, "dlch", overrides={**(overrides or {}), "bits": bits})
        torch.manual_seed(cfg.seed)
        model = HashModel.create(ds.dims, bits, cfg.hidden, cfg.dropout, seed=cfg.seed)
        model.image.fit_scaler(ds.image[rows])
        model.text.fit_scaler(ds.text[rows])
        label_net = HashNet(ds.n_labels, bits, cfg.label_hidden, cfg.dropout)
        b_img, b_txt = train_original(
            model,
            label_net,
            ds.image[rows],
            ds.text[rows],
            ds.labels[rows],
            cfg.original,
            cfg.seed,
            _epoch_printer(cfg.original.epochs) if progress else None,
        )
        learner = cls(model, label_net, cfg, _empty_items(ds.dims, ds.n_labels, bits), reservoir_seen=0)
        learner._freeze(np.asarray(rows, np.int64), b_img, b_txt, ds.labels[rows])
        learner._offer_reservoir(np.asarray(rows, np.int64), ds.image[rows], ds.text[rows], ds.labels[rows])
        return learner

    # ---- streaming ------------------------------------------------------------------------------

    def learn(self, batch: Sequence[ItemRecord]) -> LearnReport:
        """Buffer the increment's records; run the lifelong update whenever an increment completes."""
        report = LearnReport(items=sum(r.chunk != -1 for r in batch))
        for record in batch:
            if record.chunk == -1:
                report.outcomes["offline"] = report.outcomes.get("offline", 0) + 1
                continue
            if self.pending and record.chunk != self.pending_chunk:
                merge_reports(report, self.finish_increment())
            self.pending.append(record)
            self.pending_chunk = record.chunk
            if len(self.pending) >= self.cfg.lifelong.buffer_size:
                merge_reports(report, self.finish_increment())
        report.pending = len(self.pending)
        return report

    def finish_increment(self) -> LearnReport:
        """Run the lifelong update on the buffered increment (no-op when nothing is buffered)."""
        records, self.pending, self.pending_chunk = self.pending, [], None
        report = LearnReport()
        joined, arrivals = join_halves(records)
        known = set(self.frozen["ids"].tolist())
        usable: dict[int, ItemRecord] = {}
        others: list[ItemRecord] = []
        for item_id, record in joined.items():
            if item_id in known:
                outcome = "known"
            elif record.is_paired and record.labels is not None:
                usable[item_id], outcome = record, "learned"
            else:
                others.append(record)
                outcome = "coded"
            report.outcomes[outcome] = report.outcomes.get(outcome, 0) + arrivals[item_id]
        if not usable and not others:
            return report
        self.updates += 1
        if usable:
            ids = np.array(list(usable), np.int64)
            image = np.stack([r.image for r in usable.values()]).astype(np.float32)
            text = np.stack([r.text for r in usable.values()]).astype(np.float32)
            labels = np.stack([r.labels for r in usable.values()]).astype(np.uint8)
            b_img, b_txt, result = self._lifelong_update(ids, image, text, labels)
            self._freeze(ids, b_img, b_txt, labels)
            self._offer_reservoir(ids, image, text, labels)
            report.losses.update(result.losses)
            report.steps = {"img": result.steps, "txt": result.steps}
            packed_img, packed_txt = codes.pack(b_img), codes.pack(b_txt)
            for i, item_id in enumerate(ids.tolist()):
                report.codes.append(CodeRecord(item_id, Modality.IMAGE, packed_img[i]))
                report.codes.append(CodeRecord(item_id, Modality.TEXT, packed_txt[i]))
        for m in Modality:
            views = [r for r in others if r.features(m) is not None]
            if views:
                packed = self.model.encode(np.stack([r.features(m) for r in views]), m)
                report.codes.extend(CodeRecord(r.item_id, m, packed[i]) for i, r in enumerate(views))
        return report

    def flush(self) -> LearnReport:
        """End of stream: whatever is buffered is a complete increment."""
        return self.finish_increment()

    # ---- lifelong phase -------------------------------------------------------------------------

    def sample_omega(self, n_new: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Omega as (reservoir rows, new-item rows): a uniform draw from the current database.

        Old and new items enter in proportion to n_frozen : n_new, so Omega looks like a sample of
        the whole database; the old rows come from the reservoir, which is uniform over the frozen set.
        """
        size = self.cfg.lifelong.omega
        n_frozen = self.frozen["ids"].shape[0]
        n_res = self.reservoir["ids"].shape[0]
        k_new = min(n_new, int(round(size * n_new / max(n_frozen + n_new, 1))))
        k_old = min(n_res, size - k_new)
        return np.sort(rng.choice(n_res, k_old, replace=False)), np.sort(rng.choice(n_new, k_new, replace=False))

    def lifelong_problem(
        self, ids: np.ndarray, image: np.ndarray, text: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> LifelongProblem:
        """Omega with index maps into the frozen arrays (old rows) and into the increment (new rows)."""
        res_rows, new_rows = self.sample_omega(labels.shape[0], rng)
        res = self.reservoir
        n_old = res_rows.shape[0]
        omega_old = np.concatenate([positions(self.frozen["ids"], res["ids"][res_rows]), np.full(new_rows.size, -1)])
        omega_new = np.concatenate([np.full(n_old, -1), new_rows])
        return LifelongProblem(
            omega_ids=np.concatenate([res["ids"][res_rows], ids[new_rows]]),
            omega_image=np.concatenate([res["image"][res_rows], image[new_rows]]),
            omega_text=np.concatenate([res["text"][res_rows], text[new_rows]]),
            omega_labels=np.concatenate([res["labels"][res_rows], labels[new_rows]]),
            omega_old=omega_old,
            omega_new=omega_new,
            old_image_codes=codes.unpack(self.frozen["image"], self.bits),
            old_text_codes=codes.unpack(self.frozen["text"], self.bits),
            old_labels=self.frozen["labels"],
            new_labels=labels,
        )

    def _lifelong_update(
        self, ids: np.ndarray, image: np.ndarray, text: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, LifelongResult]:
        seed = self.cfg.seed + 1000 * self.updates
        problem = self.lifelong_problem(ids, image, text, labels, np.random.default_rng(seed))
        torch.manual_seed(seed)
        result = train_lifelong(self.model, problem, self.cfg.lifelong, seed)
        return result.image_codes, result.text_codes, result

    def _freeze(self, ids: np.ndarray, b_img: np.ndarray, b_txt: np.ndarray, labels: np.ndarray) -> None:
        f = self.frozen
        f["ids"] = np.concatenate([f["ids"], ids])
        f["image"] = np.concatenate([f["image"], codes.pack(b_img)])
        f["text"] = np.concatenate([f["text"], codes.pack(b_txt)])
        f["labels"] = np.concatenate([f["labels"], labels.astype(np.uint8)])

    def _offer_reservoir(self, ids: np.ndarray, image: np.ndarray, text: np.ndarray, labels: np.ndarray) -> None:
        """Reservoir sampling (algorithm R), seeded per update, so the kept items are a uniform sample."""
        rng = np.random.default_rng([self.cfg.seed, self.updates, 1])
        res, cap = self.reservoir, self.cfg.lifelong.reservoir
        take = max(0, min(cap - res["ids"].shape[0], ids.shape[0]))
        arrays = {"ids": ids, "image": image.astype(np.float32), "text": text.astype(np.float32), "labels": labels}
        for key in _ARRAYS:
            res[key] = np.concatenate([res[key], arrays[key][:take]])
        seen = self.reservoir_seen + take
        for i in range(take, ids.shape[0]):
            seen += 1
            slot = int(rng.integers(0, seen))
            if slot < cap:
                for key in _ARRAYS:
                    res[key][slot] = arrays[key][i]
        self.reservoir_seen = seen

    # ---- stored codes and state -----------------------------------------------------------------

    def frozen_codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item ids, packed image-side codes, packed text-side codes) of every frozen item."""
        return self.frozen["ids"].copy(), self.frozen["image"].copy(), self.frozen["text"].copy()

    def export_state(self) -> ModelState:
        tensors = self.model.tensors("model")
        tensors.update(
            {f"label_net.{k}": v.detach().cpu().numpy().copy() for k, v in self.label_net.state_dict().items()}
        )
        for group in ("frozen", "reservoir"):
            tensors.update({f"{group}.{k}": v.copy() for k, v in getattr(self, group).items()})
        tensors.update(_pending_tensors(self.pending, self.model.arch(), self.label_net.in_dim))
        return ModelState(
            method=self.method,
            version=self.version,
            parent_version=self.parent_version,
            tensors=tensors,
            meta={
                "arch": self.model.arch(),
                "label_arch": self.label_net.arch(),
                "config": config.to_dict(self.cfg),
                "updates": self.updates,
                "reservoir_seen": self.reservoir_seen,
                "pending_chunk": self.pending_chunk,
            },
        )

    @classmethod
    def from_state(cls, state: ModelState) -> DlchLearner:
        meta = state.meta
        cfg = config.build(DlchConfig, meta["config"], "dlch state")
        la = meta["label_arch"]
        label_net = HashNet(la["in_dim"], la["bits"], la["hidden"], la["dropout"])
        label_net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.subset("label_net").items()})
        items = {group: {k: np.array(v) for k, v in state.subset(group).items()} for group in ("frozen", "reservoir")}
        learner = cls(model_from_state(state), label_net, cfg, items, int(meta["reservoir_seen"]), int(meta["updates"]))
        learner.version, learner.parent_version = state.version, state.parent_version
        learner.pending = _pending_records(state.subset("pending"))
        learner.pending_chunk = meta["pending_chunk"]
        learner.model.eval()
        learner.label_net.eval()
        return learner


def _pending_tensors(records: list[ItemRecord], arch: dict, n_labels: int) -> dict[str, np.ndarray]:
    """Buffered records as plain arrays (missing parts as zeros plus a presence mask)."""
    dims = (arch["image"]["in_dim"], arch["text"]["in_dim"])

    def stack(get: Callable[[ItemRecord], np.ndarray | None], width: int, dtype: type) -> np.ndarray:
        rows = [np.zeros(width, dtype) if get(r) is None else np.asarray(get(r), dtype) for r in records]
        return np.stack(rows) if rows else np.zeros((0, width), dtype)

    def has(get: Callable[[ItemRecord], np.ndarray | None]) -> np.ndarray:
        return np.array([get(r) is not None for r in records], dtype=np.uint8)

    return {
        "pending.ids": np.array([r.item_id for r in records], np.int64),
        "pending.chunk": np.array([r.chunk for r in records], np.int64),
        "pending.image": stack(lambda r: r.image, dims[0], np.float32),
        "pending.text": stack(lambda r: r.text, dims[1], np.float32),
        "pending.labels": stack(lambda r: r.labels, n_labels, np.uint8),
        "pending.has_image": has(lambda r: r.image),
        "pending.has_text": has(lambda r: r.text),
        "pending.has_labels": has(lambda r: r.labels),
    }


def _pending_records(t: dict[str, np.ndarray]) -> list[ItemRecord]:
    return [
        ItemRecord(
            item_id=int(t["ids"][i]),
            image=t["image"][i] if t["has_image"][i] else None,
            text=t["text"][i] if t["has_text"][i] else None,
            labels=t["labels"][i] if t["has_labels"][i] else None,
            chunk=int(t["chunk"][i]),
        )
        for i in range(t["ids"].shape[0])
    ]


def _epoch_printer(epochs: int) -> Callable[[int, dict[str, float]], None]:
    def show(epoch: int, losses: dict[str, float]) -> None:
        parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        print(f"dlch original phase: epoch {epoch + 1}/{epochs} {parts}", flush=True)

    return show
