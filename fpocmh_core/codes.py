"""Binary codes: +-1 sign matrices for arithmetic, bit-packed uint8 rows for storage and faiss.

Bit j of a packed row is 1 where the sign code is +1. A relaxed output of exactly 0 maps to +1, so a
stored code never carries the 0-valued bits that torch.sign would give.
"""

from __future__ import annotations

import numpy as np

VALID_BITS = (8, 16, 32, 64, 128, 256)


def check_bits(bits: int) -> int:
    if bits % 8 or bits <= 0:
        raise ValueError(f"code length must be a positive multiple of 8, got {bits}")
    return bits


def sign_codes(relaxed: np.ndarray) -> np.ndarray:
    """Relaxed outputs (any real) -> int8 matrix of +1/-1."""
    return np.where(np.asarray(relaxed) >= 0, 1, -1).astype(np.int8)


def pack(signs: np.ndarray) -> np.ndarray:
    """(n, bits) +-1 -> (n, bits/8) uint8."""
    signs = np.atleast_2d(signs)
    check_bits(signs.shape[1])
    return np.packbits(signs > 0, axis=1)


def unpack(packed: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(n, bits/8) uint8 -> (n, bits) int8 of +1/-1."""
    packed = np.atleast_2d(np.asarray(packed, dtype=np.uint8))
    bits = bits or packed.shape[1] * 8
    return (np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1).astype(np.int8)


def hamming(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed rows (plain numpy; the reference for faiss)."""
    xor = np.bitwise_xor(a_packed[:, None, :], b_packed[None, :, :])
    return np.unpackbits(xor, axis=2).sum(axis=2, dtype=np.int32)


def bit_drift(stored: np.ndarray, rehashed: np.ndarray) -> float:
    """Fraction of bits that differ between two packed code matrices of the same items."""
    if stored.size == 0:
        return 0.0
    diff = np.unpackbits(np.bitwise_xor(stored, rehashed), axis=1).sum()
    return float(diff) / (stored.shape[0] * stored.shape[1] * 8)
