"""Linear CCA with sign codes: finds a shared direction, encodes like a hash model, fails loudly."""

from __future__ import annotations

import numpy as np
import pytest

from fpocmh_core.baselines import CCAHasher
from fpocmh_core.offline import TrainingSet
from fpocmh_core.records import Modality

IMG, TXT = Modality.IMAGE, Modality.TEXT


@pytest.fixture(scope="module")
def planted():
    """Two modalities in different spaces that share one latent variable z, plus independent noise."""
    rng = np.random.default_rng(7)
    n = 2000
    z = rng.standard_normal(n)
    x = rng.standard_normal((n, 20)) + 3.0 * np.outer(z, rng.standard_normal(20)) / np.sqrt(20)
    y = rng.standard_normal((n, 30)) + 3.0 * np.outer(z, rng.standard_normal(30)) / np.sqrt(30)
    return z, x + 5.0, y - 2.0  # offsets: the fit must centre


def test_cca_recovers_a_planted_shared_direction(planted):
    z, x, y = planted
    cca = CCAHasher(8).fit(x, y)
    px, py = cca.project(x, IMG), cca.project(y, TXT)
    assert abs(np.corrcoef(px[:, 0], z)[0, 1]) > 0.9
    assert abs(np.corrcoef(py[:, 0], z)[0, 1]) > 0.9
    assert cca.correlations[0] > 0.8 > 0.3 > cca.correlations[1]
    # The first bit of an item's image code and of its text code agree far more often than chance.
    bx, by = cca.encode(x, IMG), cca.encode(y, TXT)
    first_bit_agrees = (np.unpackbits(bx, axis=1)[:, 0] == np.unpackbits(by, axis=1)[:, 0]).mean()
    assert first_bit_agrees > 0.8
    assert bx.shape == (len(x), 1) and bx.dtype == np.uint8


def test_fit_on_a_training_set_uses_its_pairs(planted):
    _, x, y = planted
    shuffled = np.random.default_rng(0).permutation(len(y))
    # Text rows stored in another order; the pairs say which text belongs to which image.
    pairs = np.stack([np.arange(len(x)), np.argsort(shuffled)], axis=1)
    data = TrainingSet(x, np.ones((len(x), 1)), y[shuffled], np.ones((len(y), 1)), pairs)
    from_arrays, from_set = CCAHasher(8).fit(x, y), CCAHasher(8).fit(data)
    assert np.allclose(from_arrays.correlations, from_set.correlations)
    assert np.array_equal(from_arrays.encode(y, TXT), from_set.encode(y, TXT))


def test_cca_refuses_what_it_cannot_do(planted):
    _, x, y = planted
    with pytest.raises(RuntimeError, match="fit"):
        CCAHasher(8).encode(x, IMG)
    with pytest.raises(ValueError, match="pairs"):
        CCAHasher(8).fit(x, y[:-1])
    with pytest.raises(ValueError, match="no pairs"):
        CCAHasher(8).fit(TrainingSet(x, np.ones((len(x), 1)), y, np.ones((len(y), 1)), None))
    with pytest.raises(ValueError, match="exceed"):
        CCAHasher(32).fit(x, y)
