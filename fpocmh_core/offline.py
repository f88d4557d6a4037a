"""Offline supervised cross-modal hash training: the frozen backbone and the "full retraining" baseline.

Objective, on the relaxed codes ``u`` (image) and ``v`` (text) of one mini-batch, all in [-1, 1]^c:

- the pairwise negative log-likelihood of Deep Cross-Modal Hashing (DCMH; Jiang and Li, CVPR 2017),
  ``log(1 + e^theta) - S * theta`` with ``theta = logit_scale * <u, v> / c`` and ``S = 1`` when the two
  items share a label, over every image-text pair of the batch (``w_cross``) and, as in PRDH (Yang et
  al., AAAI 2017), over every image-image and text-text pair (``w_intra``). DCMH uses ``theta = <u, v> / 2``;
  dividing by ``c`` lets one scale serve every code length;
- label prediction by one linear classifier on the codes, shared by both modalities, so that both
  land in the same semantic space (the classification term of DSDH; Li et al., NeurIPS 2017) (``w_label``);
- quantisation ``||u - sign(u)||^2`` (``w_quant``);
- for known pairs, the squared distance between the two codes (``w_pair``).

Similarity comes from labels only, so the image items and the text items need not be paired: a
training unit is a known pair, a lone image or a lone text, and a batch's images and texts are compared
all against all. Full retraining on a partial-modal stream uses the same trainer as the paired offline
part. Generalisation comes from dropout, random masking of input features (tags dropped from a bag of
words), weight decay and a cosine learning-rate decay; early stopping watches a held-out share of the
training units and restores the best weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.evaluation import mean_average_precision
from fpocmh_core.learners.base import model_from_state
from fpocmh_core.nets import HashModel
from fpocmh_core.records import Modality
from fpocmh_core.state import ModelState, load_checkpoint, save_checkpoint

SCALERS = ("feature", "global")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OfflineConfig:
    """See ``config/offline.yaml`` for what each field does."""

    hidden: tuple[int, ...]
    dropout: float
    image_scaler: str
    text_scaler: str
    input_drop_image: float
    input_drop_text: float
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str
    weight_decay: float
    logit_scale: float
    w_cross: float
    w_intra: float
    w_label: float
    w_quant: float
    w_pair: float
    val_share: float
    eval_every: int
    patience: int

    def __post_init__(self) -> None:
        for name in ("image_scaler", "text_scaler"):
            if getattr(self, name) not in SCALERS:
                raise config.ConfigError(f"offline: {name} must be one of {SCALERS}, got {getattr(self, name)!r}")
        if self.lr_schedule not in SCHEDULES:
            raise config.ConfigError(f"offline: lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("dropout", "input_drop_image", "input_drop_text"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise config.ConfigError(f"offline: {name} must be within [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.val_share < 1.0:
            raise config.ConfigError(f"offline: val_share must be within [0, 1), got {self.val_share}")
        if self.epochs < 0:
            raise config.ConfigError(f"offline: epochs must be >= 0, got {self.epochs}")
        for name in ("batch_size", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise config.ConfigError(f"offline: {name} must be >= 1, got {getattr(self, name)}")


def load_offline_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> OfflineConfig:
    return config.load(OfflineConfig, "offline", path, overrides)


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Labelled image items and labelled text items, not necessarily paired.

    ``pairs`` lists known pairs as rows ``(image index, text index)``; each item is in at most one pair.
    """

    image: np.ndarray
    image_labels: np.ndarray
    text: np.ndarray
    text_labels: np.ndarray
    pairs: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, x, lab in (("image", self.image, self.image_labels), ("text", self.text, self.text_labels)):
            if x.ndim != 2 or lab.ndim != 2 or x.shape[0] != lab.shape[0]:
                raise ValueError(
                    f"TrainingSet: {name} {x.shape} and its labels {lab.shape} must be 2-D with equal rows"
                )
        if self.image_labels.shape[1] != self.text_labels.shape[1]:
            raise ValueError(
                f"TrainingSet: image and text labels disagree on label columns: "
                f"{self.image_labels.shape[1]} vs {self.text_labels.shape[1]}"
            )
        if self.pairs is None:
            return
        pairs = self.pairs
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"TrainingSet: pairs must have shape (k, 2), got {pairs.shape}")
        for col, n, name in ((0, self.n_image, "image"), (1, self.n_text, "text")):
            if pairs.size and (pairs[:, col].min() < 0 or pairs[:, col].max() >= n):
                raise ValueError(f"TrainingSet: pairs name {name} rows outside 0..{n - 1}")
            if np.unique(pairs[:, col]).size != pairs.shape[0]:
                raise ValueError(f"TrainingSet: an {name} item is in more than one pair")

    @classmethod
    def from_rows(cls, ds: CrossModalDataset, rows: np.ndarray) -> TrainingSet:
        """The paired, labelled ``rows`` of a dataset."""
        idx = np.arange(len(rows))
        return cls(ds.image[rows], ds.labels[rows], ds.text[rows], ds.labels[rows], np.stack([idx, idx], axis=1))

    @property
    def n_image(self) -> int:
        return self.image.shape[0]

    @property
    def n_text(self) -> int:
        return self.text.shape[0]

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.shape[1], self.text.shape[1]

    def fingerprint(self) -> str:
        """A short content hash of everything the trainer sees."""
        h = hashlib.sha256()
        pairs = np.zeros((0, 2), np.int64) if self.pairs is None else self.pairs
        for arr in (self.image, self.image_labels, self.text, self.text_labels, pairs):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def units(self) -> np.ndarray:
        """(n_units, 2) rows ``(image index or -1, text index or -1)``: each pair, then each lone item."""
        pairs = np.zeros((0, 2), np.int64) if self.pairs is None else self.pairs.astype(np.int64)
        lone_img = np.setdiff1d(np.arange(self.n_image), pairs[:, 0])
        lone_txt = np.setdiff1d(np.arange(self.n_text), pairs[:, 1])
        return np.concatenate(
            [
                pairs,
                np.stack([lone_img, np.full_like(lone_img, -1)], axis=1),
                np.stack([np.full_like(lone_txt, -1), lone_txt], axis=1),
            ]
        )


@dataclass
class OfflineResult:
    model: HashModel
    val_map: float
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _pairwise_nll(a: torch.Tensor, b: torch.Tensor, sim: torch.Tensor, scale: float) -> torch.Tensor:
    """DCMH's -log p(S | codes), averaged over all pairs, with theta = scale * <a, b> / bits."""
    theta = scale * (a @ b.T) / a.shape[1]
    return (F.softplus(theta) - sim * theta).mean()


def _similar(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T > 0).float()


def _mask_inputs(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Zero a random ``share`` of the raw features (a dropped tag, a silent activation); no rescaling,
    because a zero means "absent" for the sparse non-negative features these nets see."""
    if share == 0.0:
        return x
    return x * (torch.rand(x.shape, generator=gen) >= share).to(x.dtype)


class _Validator:
    """mAP of held-out images against training texts and of held-out texts against training images."""

    def __init__(self, data: TrainingSet, train_units: np.ndarray, val_units: np.ndarray) -> None:
        def rows(units: np.ndarray, col: int) -> np.ndarray:
            return units[units[:, col] >= 0, col]

        self.data = data
        self.q_img, self.q_txt = rows(val_units, 0), rows(val_units, 1)
        self.db_img, self.db_txt = rows(train_units, 0), rows(train_units, 1)

    def __call__(self, model: HashModel) -> dict[str, float]:
        d = self.data
        i2t = mean_average_precision(
            model.encode(d.image[self.q_img], Modality.IMAGE),
            model.encode(d.text[self.db_txt], Modality.TEXT),
            d.image_labels[self.q_img],
            d.text_labels[self.db_txt],
        )
        t2i = mean_average_precision(
            model.encode(d.text[self.q_txt], Modality.TEXT),
            model.encode(d.image[self.db_img], Modality.IMAGE),
            d.text_labels[self.q_txt],
            d.image_labels[self.db_img],
        )
        directions = [m for m, n in ((i2t, self.q_img.size), (t2i, self.q_txt.size)) if n]
        return {"val_i2t": i2t, "val_t2i": t2i, "val_map": float(np.mean(directions)) if directions else math.nan}


def _fresh_model(data: TrainingSet, train_units: np.ndarray, bits: int, cfg: OfflineConfig, seed: int) -> HashModel:
    model = HashModel.create(data.dims, bits, cfg.hidden, cfg.dropout, seed)
    img_rows = train_units[train_units[:, 0] >= 0, 0]
    txt_rows = train_units[train_units[:, 1] >= 0, 1]
    model.image.fit_scaler(data.image[img_rows], per_feature=cfg.image_scaler == "feature")
    model.text.fit_scaler(data.text[txt_rows], per_feature=cfg.text_scaler == "feature")
    return model


def train_offline(
    data: TrainingSet,
    bits: int,
    cfg: OfflineConfig,
    *,
    init: HashModel | None = None,
    progress: bool = True,
    seed: int = 0,
) -> OfflineResult:
    """Train a hash model on ``data`` (or continue from a copy of ``init``), early-stopped on held-out units.

    Deterministic for a seed at a fixed torch thread count; the global torch RNG is left as it was.
    ``OfflineResult.epochs`` is the epoch whose weights were kept (0 = the starting weights).
    """
    if init is not None and (init.bits != bits or (init.image.in_dim, init.text.in_dim) != data.dims):
        raise ValueError(
            f"init model ({init.image.in_dim}, {init.text.in_dim}) -> {init.bits} bits does not fit "
            f"data {data.dims} -> {bits} bits"
        )
    start = time.perf_counter()
    units = data.units()
    order = np.random.default_rng([seed, 0]).permutation(len(units))
    n_val = int(round(cfg.val_share * len(units)))
    val_units, train_units = units[order[:n_val]], units[order[n_val:]]
    if len(train_units) == 0:
        raise ValueError("TrainingSet has no training units left after the validation hold-out")
    validate = _Validator(data, train_units, val_units) if n_val else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(init) if init is not None else _fresh_model(data, train_units, bits, cfg, seed)
        head = torch.nn.Linear(bits, data.image_labels.shape[1])
        gen = torch.Generator().manual_seed(seed)
        history = _fit(model, head, data, train_units, cfg, gen, validate, progress)
    model.eval()
    best = max(history, key=lambda h: h["val_map"]) if validate else history[-1]
    return OfflineResult(
        model=model,
        val_map=best.get("val_map", math.nan),
        epochs=int(best["epoch"]),
        seconds=time.perf_counter() - start,
        history=history,
    )


def _fit(
    model: HashModel,
    head: torch.nn.Linear,
    data: TrainingSet,
    units: np.ndarray,
    cfg: OfflineConfig,
    gen: torch.Generator,
    validate: _Validator | None,
    progress: bool,
) -> list[dict[str, float]]:
    """The training loop; leaves ``model`` with the best validated weights. Returns the history."""
    x_img, x_txt = (
        torch.from_numpy(np.asarray(data.image, np.float32)),
        torch.from_numpy(np.asarray(data.text, np.float32)),
    )
    y_img = torch.from_numpy(np.asarray(data.image_labels, np.float32))
    y_txt = torch.from_numpy(np.asarray(data.text_labels, np.float32))
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(units) / cfg.batch_size)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * k / total_steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)

    history: list[dict[str, float]] = []
    best_score, best_state, best_epoch = -math.inf, None, 0
    start = time.perf_counter()

    def checkpoint(epoch: int, losses: dict[str, float]) -> None:
        nonlocal best_score, best_state, best_epoch
        entry: dict[str, float] = {"epoch": epoch, **losses, "seconds": time.perf_counter() - start}
        if validate is not None:
            entry |= validate(model)
            if entry["val_map"] > best_score:
                best_score, best_epoch = entry["val_map"], epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(entry)

    checkpoint(0, {})
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"offline {model.bits} bits", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(units), generator=gen).numpy()
        sums: dict[str, float] = {}
        for k in range(steps_per_epoch):
            terms = _batch_loss(
                model,
                head,
                units[perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]],
                x_img,
                x_txt,
                y_img,
                y_txt,
                cfg,
                gen,
            )
            loss = sum(terms.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / steps_per_epoch
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            continue
        checkpoint(epoch, {"loss": sum(sums.values()), **{f"loss_{k}": v for k, v in sums.items()}})
        last = history[-1]
        bar.set_postfix(loss=f"{last['loss']:.3f}", val_map=f"{last.get('val_map', math.nan):.4f}")
        if validate is not None and epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def _batch_loss(
    model: HashModel,
    head: torch.nn.Linear,
    batch: np.ndarray,
    x_img: torch.Tensor,
    x_txt: torch.Tensor,
    y_img: torch.Tensor,
    y_txt: torch.Tensor,
    cfg: OfflineConfig,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch of units (see the module docstring)."""
    has_img, has_txt = batch[:, 0] >= 0, batch[:, 1] >= 0
    img_rows, txt_rows = torch.from_numpy(batch[has_img, 0]), torch.from_numpy(batch[has_txt, 1])
    outs, labels = [], []
    if img_rows.numel():
        outs.append(model.image(_mask_inputs(x_img[img_rows], cfg.input_drop_image, gen)))
        labels.append(y_img[img_rows])
    if txt_rows.numel():
        outs.append(model.text(_mask_inputs(x_txt[txt_rows], cfg.input_drop_text, gen)))
        labels.append(y_txt[txt_rows])
    s = cfg.logit_scale
    intra = [_pairwise_nll(h, h, _similar(y, y), s) for h, y in zip(outs, labels, strict=True)]
    terms = {
        "intra": cfg.w_intra * torch.stack(intra).mean(),
        "label": cfg.w_label
        * torch.stack(
            [F.binary_cross_entropy_with_logits(head(h), y) for h, y in zip(outs, labels, strict=True)]
        ).mean(),
        "quant": cfg.w_quant * torch.stack([((h - h.detach().sign()) ** 2).mean() for h in outs]).mean(),
    }
    if len(outs) == 2:
        (u, v), (yu, yv) = outs, labels
        sim = _similar(yu, yv)
        terms["cross"] = cfg.w_cross * _pairwise_nll(u, v, sim, s)
        both = has_img & has_txt
        if both.any() and cfg.w_pair:
            # Positions of the paired units among this batch's image rows and text rows.
            iu = torch.from_numpy(np.cumsum(has_img)[both] - 1)
            iv = torch.from_numpy(np.cumsum(has_txt)[both] - 1)
            terms["pair"] = cfg.w_pair * ((u[iu] - v[iv]) ** 2).mean()
    return terms


def offline_state(result: OfflineResult, cfg: OfflineConfig) -> ModelState:
    """Version 0 of a deployment: what encoders and query consumers load (``model_from_state``)."""
    return ModelState(
        method="offline",
        version=0,
        parent_version=None,
        tensors=result.model.tensors(),
        meta={"arch": result.model.arch(), "config": config.to_dict(cfg), "val_map": result.val_map},
    )


def _rows_sha256(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def offline_manifest(
    result: OfflineResult,
    cfg: OfflineConfig,
    data: TrainingSet,
    ds: CrossModalDataset | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """What a reader of a checkpoint folder needs: shapes, training data identity, validation, config."""
    model = result.model
    training: dict[str, Any] = {
        "training_set": data.fingerprint(),
        "n_image": data.n_image,
        "n_text": data.n_text,
        "n_pairs": 0 if data.pairs is None else int(data.pairs.shape[0]),
    }
    if ds is not None:
        training |= {"dataset": ds.name, "dataset_fingerprint": ds.fingerprint()}
    if rows is not None:
        training |= {"rows": int(len(rows)), "rows_sha256": _rows_sha256(rows)}
    best = next((h for h in result.history if h["epoch"] == result.epochs), {})
    return {
        "dims": [model.image.in_dim, model.text.in_dim],
        "bits": model.bits,
        "feature_space": ds.feature_space if ds is not None else None,
        "training": training,
        "validation": {k: best[k] for k in ("val_map", "val_i2t", "val_t2i") if k in best} | {"epoch": result.epochs},
        "train_seconds": result.seconds,
        "config": config.to_dict(cfg),
    }


def save_offline_checkpoint(
    result: OfflineResult,
    directory: Path,
    cfg: OfflineConfig,
    data: TrainingSet,
    ds: CrossModalDataset | None = None,
    rows: np.ndarray | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """``state.safetensors`` + ``manifest.json`` in ``directory`` (see :func:`offline_manifest`)."""
    manifest = offline_manifest(result, cfg, data, ds, rows) | dict(extra or {})
    return save_checkpoint(offline_state(result, cfg), Path(directory), manifest)


def load_offline_model(directory: Path) -> tuple[HashModel, dict[str, Any]]:
    """The hash model of a checkpoint folder (checksum verified) and its manifest."""
    state, manifest = load_checkpoint(Path(directory))
    model = model_from_state(state)
    model.eval()
    return model, manifest
