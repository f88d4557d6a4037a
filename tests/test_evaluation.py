"""Codes and retrieval metrics, against hand-computed values and plain-python references."""

from __future__ import annotations

import numpy as np
import pytest

from fpocmh_core import codes, evaluation


def random_codes(rs: np.random.RandomState, n: int, bits: int) -> np.ndarray:
    return codes.pack(np.where(rs.rand(n, bits) < 0.5, 1, -1))


def popcount_distance(a: np.ndarray, b: np.ndarray) -> int:
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True))


def reference_rank(q: np.ndarray, db: np.ndarray) -> list[int]:
    """Nearest first; ties keep database order."""
    return sorted(range(len(db)), key=lambda j: (popcount_distance(q, db[j]), j))


def reference_ap(q: np.ndarray, db: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray, k: int | None) -> float:
    ranked = reference_rank(q, db)[:k]
    hits, precisions = 0, []
    for rank, j in enumerate(ranked, start=1):
        if (q_lab & db_lab[j]).any():
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / hits if hits else 0.0


# --- a database small enough to rank by hand -----------------------------------------------------


def bits_set(*positions: int) -> np.ndarray:
    """An 8-bit sign code with +1 at ``positions``."""
    signs = -np.ones(8, dtype=np.int8)
    signs[list(positions)] = 1
    return signs


# query 0 is all -1, so an item's distance to it is its number of +1 bits.
Q = codes.pack(np.stack([bits_set(), bits_set(0, 1, 2, 3, 4, 5, 6, 7)]))
DB = codes.pack(np.stack([bits_set(0, 1), bits_set(2), bits_set(3), bits_set(), bits_set(4, 5, 6)]))
#                                      item: 0       1       2       3       4
#                         distance to query 0: 2       1       1       0       3
Q_LABELS = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.uint8)
DB_LABELS = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0]], dtype=np.uint8)
#                     relevant to query 0: item 0 yes, 1 no, 2 yes, 3 no, 4 yes; to query 1: none.
#
# Query 0 ranks 3 (d0), 1 (d1), 2 (d1), 0 (d2), 4 (d3): items 1 and 2 tie and database order puts
# the irrelevant item 1 first. Hits at ranks 3, 4, 5: AP = (1/3 + 2/4 + 3/5) / 3 = 43/90.
# (Had the tie gone to item 2, hits at 2, 4, 5 would give (1/2 + 2/4 + 3/5) / 3 = 48/90.)
# Query 1 shares no label with any item: AP 0, still counted. mAP = (43/90 + 0) / 2 = 43/180.
# Top 3 only: query 0 hits at rank 3 alone, AP@3 = (1/3) / 1; mAP@3 = (1/3 + 0) / 2 = 1/6.


def test_hand_ranked_example_ranks_ties_in_database_order():
    dist, idx = evaluation.hamming_rank(Q[:1], DB)
    assert idx[0].tolist() == [3, 1, 2, 0, 4]
    assert dist[0].tolist() == [0, 1, 1, 2, 3]


def test_map_of_the_hand_ranked_example():
    assert evaluation.mean_average_precision(Q, DB, Q_LABELS, DB_LABELS) == pytest.approx(43 / 180)


def test_map_at_3_of_the_hand_ranked_example():
    assert evaluation.mean_average_precision(Q, DB, Q_LABELS, DB_LABELS, topk=3) == pytest.approx(1 / 6)


def test_precision_at_k_of_the_hand_ranked_example():
    # query 0's first 2 are irrelevant, first 4 hold 2 hits; query 1 has none
    p = evaluation.precision_at_k(Q, DB, Q_LABELS, DB_LABELS, ks=[2, 4])
    assert p == pytest.approx({2: 0.0, 4: (2 / 4 + 0) / 2})


# --- faiss and numpy ranking agree ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 64, 128])
@pytest.mark.parametrize("k", [None, 37])
def test_faiss_and_numpy_rankings_agree_exactly(bits, k):
    rs = np.random.RandomState(bits)
    q, db = random_codes(rs, 40, bits), random_codes(rs, 1500, bits)
    d_faiss, i_faiss = evaluation.hamming_rank(q, db, k, backend="faiss")
    d_numpy, i_numpy = evaluation.hamming_rank(q, db, k, backend="numpy")
    assert i_faiss.shape == (40, k or 1500)
    np.testing.assert_array_equal(i_faiss, i_numpy)
    np.testing.assert_array_equal(d_faiss, d_numpy)
    np.testing.assert_array_equal(d_numpy, np.take_along_axis(codes.hamming(q, db), i_numpy, axis=1))


# --- metrics against plain-python references ----------------------------------------------------


@pytest.fixture(scope="module")
def small_retrieval():
    rs = np.random.RandomState(7)
    q, db = random_codes(rs, 12, 16), random_codes(rs, 150, 16)
    q_lab = (rs.rand(12, 5) < 0.3).astype(np.uint8)
    db_lab = (rs.rand(150, 5) < 0.3).astype(np.uint8)
    return q, db, q_lab, db_lab


@pytest.mark.parametrize("k", [1, 10, 100, None])
def test_map_at_k_matches_a_brute_force_reference(small_retrieval, k):
    q, db, q_lab, db_lab = small_retrieval
    expected = np.mean([reference_ap(q[i], db, q_lab[i], db_lab, k) for i in range(len(q))])
    assert evaluation.mean_average_precision(q, db, q_lab, db_lab, topk=k) == pytest.approx(expected, abs=1e-6)


def test_precision_at_k_matches_a_brute_force_reference(small_retrieval):
    q, db, q_lab, db_lab = small_retrieval
    ks = [1, 5, 50]
    got = evaluation.precision_at_k(q, db, q_lab, db_lab, ks)
    for k in ks:
        hits = [[(q_lab[i] & db_lab[j]).any() for j in reference_rank(q[i], db)[:k]] for i in range(len(q))]
        assert got[k] == pytest.approx(np.mean(hits))


def test_pr_curve_recall_grows_to_one(small_retrieval):
    q, db, q_lab, db_lab = small_retrieval
    q_lab, db_lab = q_lab.copy(), db_lab.copy()
    q_lab[:, 0] = 1
    db_lab[:5, 0] = 1  # every query has something relevant, so full recall is reachable
    precision, recall = evaluation.pr_curve(q, db, q_lab, db_lab)
    assert precision.shape == recall.shape == (17,)
    assert np.all(np.diff(recall) >= 0)
    assert recall[-1] == pytest.approx(1.0)  # radius = bits retrieves the whole database
    assert precision[-1] == pytest.approx(evaluation.relevance(q_lab, db_lab).mean())
    assert 0.0 <= recall[0] < 1.0


def test_empty_query_or_database_scores_zero():
    assert evaluation.mean_average_precision(Q[:0], DB, Q_LABELS[:0], DB_LABELS) == 0.0


# --- codes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16, 64, 128])
def test_pack_unpack_round_trip(bits):
    signs = np.where(np.random.RandomState(bits).rand(9, bits) < 0.5, 1, -1).astype(np.int8)
    packed = codes.pack(signs)
    assert packed.shape == (9, bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(codes.unpack(packed, bits), signs)


def test_sign_codes_map_zero_to_plus_one():
    np.testing.assert_array_equal(codes.sign_codes(np.array([[-0.5, 0.0, 2.0]])), [[-1, 1, 1]])


def test_code_length_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        codes.pack(np.ones((2, 12)))


def test_hamming_counts_differing_bits():
    rs = np.random.RandomState(3)
    a, b = random_codes(rs, 6, 32), random_codes(rs, 9, 32)
    expected = [[popcount_distance(x, y) for y in b] for x in a]
    np.testing.assert_array_equal(codes.hamming(a, b), expected)


def test_bit_drift_is_the_share_of_flipped_bits():
    rs = np.random.RandomState(4)
    stored = random_codes(rs, 10, 64)
    signs = codes.unpack(stored)
    signs[:, :8] *= -1  # flip 8 of every 64 bits
    assert codes.bit_drift(stored, codes.pack(signs)) == pytest.approx(8 / 64)
    assert codes.bit_drift(stored, stored) == 0.0
    assert codes.bit_drift(stored[:0], stored[:0]) == 0.0
