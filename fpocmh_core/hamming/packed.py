"""Arrays of unsigned integers of any width up to 32 bits, packed end to end.

A multi-index table holds one row index per stored code and substring; at 10^8 codes a row index
needs 27 bits, so packing saves 5 of every 32 bits (1.9 of the 28 bytes per code the shard may spend).
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # entries packed at a time: bounds the unpacked bits held (64 MB) whatever the size


class PackedUInts:
    """``size`` unsigned integers of ``width`` bits each, bit ``b`` of entry ``i`` at bit ``i * width + b``
    of a little-endian stream of uint32 words (plus one spare word, so every read takes two words)."""

    def __init__(self, words: np.ndarray, width: int, size: int) -> None:
        if not 1 <= width <= 32:
            raise ValueError(f"width must be 1..32 bits, got {width}")
        if words.dtype != np.uint32 or words.size != words_needed(width, size):
            raise ValueError(f"{words.size} words of {words.dtype} for {size} entries of {width} bits")
        self.words, self.width, self.size = words, width, size

    @classmethod
    def pack(cls, values: np.ndarray, width: int) -> PackedUInts:
        values = np.asarray(values)
        if values.size and int(values.max()) >> width:
            raise ValueError(f"a value does not fit in {width} bits")
        out = np.zeros(words_needed(width, values.size) * 4, np.uint8)
        # _CHUNK is a multiple of 8, so every chunk starts on a byte boundary of the stream.
        for start in range(0, values.size, _CHUNK):
            chunk = values[start : start + _CHUNK].astype("<u4")
            bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :width]
            packed = np.packbits(bits.reshape(-1), bitorder="little")
            at = start * width // 8
            out[at : at + packed.size] = packed
        return cls(out.view(np.uint32), width, values.size)

    def __getitem__(self, pos: np.ndarray) -> np.ndarray:
        """Entries at positions ``pos`` (int64 array), as int64."""
        bit = np.asarray(pos, np.int64) * self.width
        word = bit >> 5
        pair = self.words[word].astype(np.uint64) | (self.words[word + 1].astype(np.uint64) << np.uint64(32))
        return ((pair >> (bit & 31).astype(np.uint64)) & np.uint64((1 << self.width) - 1)).astype(np.int64)

    def unpack(self) -> np.ndarray:
        return self[np.arange(self.size)]

    @property
    def nbytes(self) -> int:
        return self.words.nbytes


def words_needed(width: int, size: int) -> int:
    return (width * size + 31) // 32 + 1


def width_for(count: int) -> int:
    """Bits that hold every index below ``count``."""
    return max(1, int(count - 1).bit_length())
