"""The two DLCH training phases (methods.md B3) as plain functions over arrays.

The learner (``dlch.py``) owns state, buffering and index bookkeeping; these functions only train.
Deviations from the HqiLi/DLCH code, all deliberate (B5):
- the networks end in tanh (the code has none and applies tanh only when building U for DCC);
- the lifelong loss adds the new-code term with weight epsilon (computed but dropped in the code);
- quantisation targets are the codes of the Omega rows' true database items (the code indexes the
  stacked code matrix by the position inside Omega), and U_bar carries the outputs of the new items
  that are in Omega (the code passes empty index maps, so U_bar = 0);
- balance is the squared column sum ||U^T 1||^2 (the code's is linear, beta * sum(U));
- per-pair / per-element normalisation of the lifelong terms (see config/dlch.yaml);
- the new codes start from one DCC pass on the pre-update outputs instead of random signs;
- original phase: Adam and 20 epochs instead of SGD and 200 (MLP heads on fixed features), memory
  banks initialised with the networks' outputs (the code: N(0, 1)), and each MLS term compares a
  batch with a random subset of a bank (``bank_sample``) instead of all of it;
- codes stay per modality in the lifelong phase too; the code merges them into sign(B_x + B_y);
- a fixed seed everywhere (the code uses seed=None).
The lifelong loss against all stored codes is computed from their sufficient statistics
(:class:`CodeStats`): the same value and gradient as the explicit sum, at a cost independent of N_db.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fpocmh_core import config, dcc
from fpocmh_core.nets import HashModel, HashNet
from fpocmh_core.records import Modality


@dataclass(frozen=True)
class OriginalConfig:
    eta: float
    gamma: float
    mu: float
    batch: int
    bank_sample: int
    lr: float
    lr_end: float
    weight_decay: float
    epochs: int


@dataclass(frozen=True)
class LifelongConfig:
    old_weight: float
    epsilon: float
    alpha: float
    beta: float
    dcc_alpha: float
    dcc_sweeps: int
    omega: int
    reservoir: int
    batch: int
    lr: float
    decay: float
    epochs: int
    buffer_size: int

    def __post_init__(self) -> None:
        for name in ("old_weight", "epsilon", "alpha", "beta", "dcc_alpha"):
            if getattr(self, name) < 0:
                raise config.ConfigError(f"dlch: lifelong.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("omega", "batch", "buffer_size", "dcc_sweeps"):
            if getattr(self, name) < 1:
                raise config.ConfigError(f"dlch: lifelong.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DlchConfig:
    bits: int
    seed: int
    hidden: tuple[int, ...]
    dropout: float
    label_hidden: tuple[int, ...]
    original: OriginalConfig
    lifelong: LifelongConfig


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def normalised_labels(labels: np.ndarray) -> torch.Tensor:
    """Rows scaled to unit length, so that a @ b.T is the cosine label similarity S of B3."""
    lab = _t(labels)
    return lab / lab.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mls_loss(h: torch.Tensor, H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Multi-label similarity loss: mean (ReLU(cos(h_i, H_j)) - S_ij)^2 over batch x memory."""
    cos = nn.functional.normalize(h, dim=1) @ nn.functional.normalize(H, dim=1).T
    return ((torch.relu(cos) - s) ** 2).mean()


def quantisation_loss(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((b - h) ** 2).mean()


def _linear_lr(cfg: OriginalConfig, epoch: int) -> float:
    if cfg.epochs <= 1:
        return cfg.lr
    return cfg.lr + (cfg.lr_end - cfg.lr) * epoch / (cfg.epochs - 1)


def _outputs(net: nn.Module, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
    net.train(was_training)
    return out


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def train_original(
    model: HashModel,
    label_net: HashNet,
    image: np.ndarray,
    text: np.ndarray,
    labels: np.ndarray,
    cfg: OriginalConfig,
    seed: int,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """B3.1 in place on ``model`` and ``label_net``; returns the learned codes (B_x, B_y) as +-1 int8.

    Each epoch runs the label, image and text networks over the data (each in shuffled batches),
    keeping memory banks F, G, Lambda of their latest outputs, then sets B_x = sign(2F + Lambda),
    B_y = sign(2G + Lambda). The banks start from the networks' initial outputs (the code: N(0, 1)).
    """
    gen = torch.Generator().manual_seed(seed)
    x_img, x_txt, x_lab = _t(image), _t(text), _t(labels)
    s_all = normalised_labels(labels)
    n = x_img.shape[0]
    nets = {"lab": label_net, "img": model.image, "txt": model.text}
    inputs = {"lab": x_lab, "img": x_img, "txt": x_txt}
    bank = {k: _outputs(net, inputs[k]) for k, net in nets.items()}
    b_img, b_txt = _sign(bank["img"] + bank["lab"]), _sign(bank["txt"] + bank["lab"])
    opts = {k: torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for k, net in nets.items()}
    batch = min(cfg.batch, n)
    bank_sample = cfg.bank_sample
    for epoch in range(cfg.epochs):
        lr = _linear_lr(cfg, epoch)
        totals = {k: 0.0 for k in nets}
        for key, net in nets.items():
            for group in opts[key].param_groups:
                group["lr"] = lr
            net.train()
            perm = torch.randperm(n, generator=gen)
            steps = n // batch
            for step in range(steps):
                idx = perm[step * batch : (step + 1) * batch]
                h = net(inputs[key][idx])
                bank[key][idx] = h.detach()
                # MLS against a random subset of the banks: an unbiased estimate of the code's mean over
                # all n rows at a fraction of the cost (the batch itself is always in the bank).
                mem = torch.randperm(n, generator=gen)[:bank_sample] if bank_sample < n else slice(None)
                s = s_all[idx] @ s_all[mem].T
                if key == "lab":
                    loss = (
                        cfg.eta * mls_loss(h, bank["lab"][mem], s)
                        + mls_loss(h, bank["img"][mem], s)
                        + cfg.gamma * mls_loss(h, bank["txt"][mem], s)
                        + cfg.mu * 0.5 * (quantisation_loss(h, b_img[idx]) + quantisation_loss(h, b_txt[idx]))
                    )
                else:
                    codes = b_img if key == "img" else b_txt
                    loss = (
                        cfg.eta * mls_loss(h, bank[key][mem], s)
                        + mls_loss(h, bank["lab"][mem], s)
                        + cfg.mu * quantisation_loss(h, codes[idx])
                    )
                opts[key].zero_grad()
                loss.backward()
                opts[key].step()
                totals[key] += float(loss.detach()) / steps
        b_img, b_txt = _sign(2 * bank["img"] + bank["lab"]), _sign(2 * bank["txt"] + bank["lab"])
        if progress is not None:
            progress(epoch, totals)
    model.eval()
    label_net.eval()
    return b_img.numpy().astype(np.int8), b_txt.numpy().astype(np.int8)


@dataclass(frozen=True)
class LifelongProblem:
    """One increment, with explicit index maps (B8 step 1).

    Omega rows are either an old (frozen) item or a new one: ``omega_old[i]`` is the row of Omega item
    i in the frozen arrays (-1 if it is new), ``omega_new[i]`` its row among the new items (-1 if old).
    """

    omega_ids: np.ndarray
    omega_image: np.ndarray
    omega_text: np.ndarray
    omega_labels: np.ndarray
    omega_old: np.ndarray
    omega_new: np.ndarray
    old_image_codes: np.ndarray  # +-1, n_old x c
    old_text_codes: np.ndarray
    old_labels: np.ndarray
    new_labels: np.ndarray

    def __post_init__(self) -> None:
        if not np.all((self.omega_old >= 0) ^ (self.omega_new >= 0)):
            raise ValueError("every Omega row must map to exactly one old or one new item")

    @property
    def n_db(self) -> int:
        return self.old_labels.shape[0] + self.new_labels.shape[0]

    def u_bar(self, u: np.ndarray) -> np.ndarray:
        """U scattered onto the new-item rows: U_bar[j] = u of the Omega row holding new item j, else 0."""
        out = np.zeros((self.new_labels.shape[0], u.shape[1]), dtype=np.float64)
        in_omega = self.omega_new >= 0
        out[self.omega_new[in_omega]] = u[in_omega]
        return out

    def omega_targets(self, old_codes: np.ndarray, new_codes: np.ndarray) -> np.ndarray:
        """The stored or learned code of each Omega row's own database item (the quantisation target)."""
        out = np.empty((self.omega_old.shape[0], old_codes.shape[1]), dtype=np.float32)
        is_old = self.omega_old >= 0
        out[is_old] = old_codes[self.omega_old[is_old]]
        out[~is_old] = new_codes[self.omega_new[~is_old]]
        return out


@dataclass
class LifelongResult:
    image_codes: np.ndarray  # +-1 int8, n_new x c
    text_codes: np.ndarray
    losses: dict[str, float]  # mean loss terms of the last epoch
    steps: int  # optimiser steps per modality


@dataclass(frozen=True)
class CodeStats:
    """Sufficient statistics of a code set B (n x c) with unit-length labels L (n x k).

    For an output u with unit-length labels l, the asymmetric loss against every stored code is
        sum_j (u.b_j / c - l.l_j)^2 = u^T G u / c^2 - 2 u^T M l / c + l^T K l,
    with G = B^T B, M = B^T L, K = L^T L. This is exact and costs O(c^2) per row, not O(n c): the
    lifelong update then scales with |Omega| and not with the size of the database.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    label_gram: torch.Tensor

    @classmethod
    def of(cls, codes: np.ndarray, unit_labels: torch.Tensor) -> CodeStats:
        b = torch.as_tensor(np.asarray(codes, dtype=np.float64))
        lab = unit_labels.double()
        return cls((b.T @ b).float(), (b.T @ lab).float(), (lab.T @ lab).float())

    def pair_sums(self, u: torch.Tensor, unit_labels: torch.Tensor) -> torch.Tensor:
        """Per row of ``u``: the sum over all stored codes of (u.b_j / c - S_ij)^2."""
        bits = u.shape[1]
        quad = ((u @ self.gram) * u).sum(dim=1) / bits**2
        lin = ((u @ self.cross) * unit_labels).sum(dim=1) / bits
        const = ((unit_labels @ self.label_gram) * unit_labels).sum(dim=1)
        return quad - 2 * lin + const


def lifelong_loss(
    u: torch.Tensor,
    unit_labels: torch.Tensor,
    old: CodeStats,
    new: CodeStats,
    targets: torch.Tensor,
    n_db: int,
    cfg: LifelongConfig,
) -> dict[str, torch.Tensor]:
    """The terms of the lifelong hashing loss for one batch of Omega (see config/dlch.yaml)."""
    n_b = u.shape[0]
    terms = {
        "old": cfg.old_weight * old.pair_sums(u, unit_labels).sum() / (n_b * n_db),
        "new": cfg.epsilon * new.pair_sums(u, unit_labels).sum() / (n_b * n_db),
        "quant": cfg.alpha * quantisation_loss(u, targets),
        "balance": cfg.beta * (u.mean(dim=0) ** 2).mean(),
    }
    terms["total"] = sum(terms.values())  # type: ignore[assignment]
    return terms


def _dcc_update(
    problem: LifelongProblem,
    omega_labels: torch.Tensor,
    new_labels: torch.Tensor,
    u: torch.Tensor,
    codes: np.ndarray,
    cfg: LifelongConfig,
) -> np.ndarray:
    """B_n by DCC, with P = c S^n^T U + alpha U_bar and S^n = L_new L_Omega^T kept factorised."""
    u64 = u.double()
    bits = u.shape[1]
    p = bits * (new_labels.double() @ (omega_labels.double().T @ u64)).numpy()
    p += cfg.dcc_alpha * problem.u_bar(u64.numpy())
    return dcc.sweep(codes, p, (u64.T @ u64).numpy(), cfg.dcc_sweeps)


def train_lifelong(model: HashModel, problem: LifelongProblem, cfg: LifelongConfig, seed: int) -> LifelongResult:
    """B3.2 in place on ``model``: fine-tune on Omega against frozen old codes, learn the new codes by DCC."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    l_omega = normalised_labels(problem.omega_labels)
    l_old = normalised_labels(problem.old_labels)
    l_new = normalised_labels(problem.new_labels)
    n_new = problem.new_labels.shape[0]
    inputs = {Modality.IMAGE: _t(problem.omega_image), Modality.TEXT: _t(problem.omega_text)}
    old_codes = {Modality.IMAGE: problem.old_image_codes, Modality.TEXT: problem.old_text_codes}
    old_stats = {m: CodeStats.of(old_codes[m], l_old) for m in inputs}
    # The code starts B_n from random signs; one DCC pass on the current outputs gives the first epoch
    # meaningful new-code and quantisation targets instead.
    new_codes = {
        m: _dcc_update(
            problem,
            l_omega,
            l_new,
            _outputs(model.net(m), x),
            np.where(rng.random((n_new, model.bits)) < 0.5, -1, 1),
            cfg,
        )
        for m, x in inputs.items()
    }
    opts = {m: torch.optim.Adam(model.net(m).parameters(), lr=cfg.lr) for m in inputs}
    m_omega = l_omega.shape[0]
    batch = min(cfg.batch, m_omega)
    steps = max(m_omega // batch, 1)
    totals: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        lr = cfg.lr * cfg.decay**epoch
        for m, x in inputs.items():
            net = model.net(m)
            net.train()
            for group in opts[m].param_groups:
                group["lr"] = lr
            new_stats = CodeStats.of(new_codes[m], l_new)
            targets = torch.from_numpy(problem.omega_targets(old_codes[m], new_codes[m]))
            perm = torch.randperm(m_omega, generator=gen)
            for step in range(steps):
                idx = perm[step * batch : (step + 1) * batch]
                terms = lifelong_loss(
                    net(x[idx]), l_omega[idx], old_stats[m], new_stats, targets[idx], problem.n_db, cfg
                )
                opts[m].zero_grad()
                terms["total"].backward()
                opts[m].step()
                if epoch == cfg.epochs - 1:
                    for name, value in terms.items():
                        key = f"{m.short}_{name}"
                        totals[key] = totals.get(key, 0.0) + float(value.detach()) / steps
            new_codes[m] = _dcc_update(problem, l_omega, l_new, _outputs(net, x), new_codes[m], cfg)
    model.eval()
    return LifelongResult(
        image_codes=new_codes[Modality.IMAGE].astype(np.int8),
        text_codes=new_codes[Modality.TEXT].astype(np.int8),
        losses=totals,
        steps=steps * cfg.epochs,
    )
