"""Discrete cyclic coordinate descent (DCC) for asymmetric hashing codes (ADSH, DIHN, DICH, DLCH).

Solves, bit by bit with the others held fixed,

    min_B  ||c*S - U B^T||^2 + alpha * ||B - U_bar||^2     over B in {-1, +1}^(n x c)

where U (m x c) are relaxed network outputs on the sampled rows, S (m x n) the target similarities
of those rows to the n items being coded, and U_bar (n x c) the outputs of the coded items themselves
where they were sampled (zero rows elsewhere). Expanding the objective leaves
``-2 tr(B^T P) + ||U B^T||^2`` with ``P = c S^T U + alpha U_bar``, and the exact minimiser for bit k is
``B[:, k] = sign(P[:, k] - B[:, !k] U[:, !k]^T U[:, k])``: one matrix-vector product per bit, for all
rows at once.
"""

from __future__ import annotations

import numpy as np


def _sign(x: np.ndarray) -> np.ndarray:
    # sign(0) = +1 so that a code never carries a 0 bit (codes.sign_codes does the same).
    return np.where(x >= 0, 1.0, -1.0)


def linear_term(S: np.ndarray, U: np.ndarray, U_bar: np.ndarray, alpha: float) -> np.ndarray:
    """P = c S^T U + alpha U_bar, with c the number of bits."""
    bits = U.shape[1]
    return bits * S.T @ U + alpha * U_bar


def objective(B: np.ndarray, S: np.ndarray, U: np.ndarray, U_bar: np.ndarray, alpha: float) -> float:
    """||c S - U B^T||^2 + alpha ||B - U_bar||^2 (the quantity each DCC sweep cannot increase)."""
    bits = U.shape[1]
    return float(((bits * S - U @ B.T) ** 2).sum() + alpha * ((B - U_bar) ** 2).sum())


def sweep(B: np.ndarray, P: np.ndarray, gram: np.ndarray, sweeps: int = 1) -> np.ndarray:
    """``sweeps`` DCC passes over all bits from the +-1 matrix ``B``, given P and gram = U^T U."""
    B = np.array(B, dtype=np.float64)
    for _ in range(sweeps):
        for k in range(B.shape[1]):
            # B[:, !k] @ gram[!k, k] without slicing out column k: take the full product, remove its k-th term.
            cross = B @ gram[:, k] - B[:, k] * gram[k, k]
            B[:, k] = _sign(P[:, k] - cross)
    return B


def solve(B: np.ndarray, S: np.ndarray, U: np.ndarray, U_bar: np.ndarray, alpha: float, sweeps: int = 1) -> np.ndarray:
    """DCC on the objective above with an explicit similarity matrix S; returns a new matrix."""
    U = np.asarray(U, dtype=np.float64)
    P = linear_term(np.asarray(S, dtype=np.float64), U, np.asarray(U_bar, dtype=np.float64), alpha)
    return sweep(B, P, U.T @ U, sweeps)
