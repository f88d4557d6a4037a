"""Pieces the gradient-based online learners share: optimisers, exact-resume state, private RNG."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fpocmh_core.data import CrossModalDataset
from fpocmh_core.nets import HashModel

OPTIMIZERS = ("sgd", "adam", "adamw")


def train_backbone(
    ds: CrossModalDataset, rows: np.ndarray, bits: int, overrides: Mapping[str, Any], progress: bool, seed: int
) -> HashModel:
    """The offline (version 0) hash model: the supervised offline trainer on the paired, labelled rows."""
    from fpocmh_core.offline import TrainingSet, load_offline_config, train_offline

    cfg = load_offline_config(overrides=dict(overrides))
    return train_offline(TrainingSet.from_rows(ds, rows), bits, cfg, progress=progress, seed=seed).model


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimiser per modality (FPO-CMH A4.4); the naive baseline uses the same settings."""

    name: str
    lr_image: float
    lr_text: float
    momentum: float
    weight_decay: float

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")

    def make(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=self.weight_decay)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, np.ndarray]:
    """The optimiser's per-parameter state (momentum, Adam moments, step) as plain arrays."""
    out = {}
    for idx, slots in opt.state_dict()["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{idx}.{key}"] = value.detach().cpu().numpy().copy()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_tensors` (prefix already stripped); hyperparameters come from config."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = torch.from_numpy(np.array(value))
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def grad_tensors(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """Gradients accumulated but not yet stepped (a partly filled window), as plain arrays."""
    return {
        f"{prefix}.{name}": p.grad.detach().cpu().numpy().copy()
        for name, p in module.named_parameters()
        if p.grad is not None
    }


def load_grad_tensors(module: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    for name, p in module.named_parameters():
        p.grad = torch.from_numpy(np.array(tensors[name])) if name in tensors else None


def seeded_rng_state(seed: int) -> torch.Tensor:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen.get_state()


@contextmanager
def private_rng(owner: object, attr: str = "rng_state") -> Iterator[None]:
    """Run with ``owner``'s own torch RNG state (dropout draws), leaving the global RNG untouched.

    The state is saved back on exit, so a learner exported between two ``learn`` calls and rebuilt
    continues with exactly the same dropout masks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(getattr(owner, attr))
        try:
            yield
        finally:
            setattr(owner, attr, torch.get_rng_state())
