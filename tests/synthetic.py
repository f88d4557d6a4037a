"""A small synthetic dataset for tests of "any dataset, any code length": 16-d topic vectors as text
features (fewer dimensions than a 64-bit code), five labels of which two are P2/P3's new ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = ("sky", "people", "night", "tree", "water")
IMAGE_DIMS, TEXT_DIMS = 48, 16


def write_topic_dataset(path: Path, n: int = 600, n_query: int = 100) -> Path:
    """``n`` items with one or two of five labels: image features and topic vectors around per-label
    centres; the first ``n_query`` rows are queries. Written in our ``.npz`` layout."""
    rng = np.random.default_rng(7)
    labels = np.zeros((n, len(LABELS)), np.uint8)
    labels[np.arange(n), rng.integers(0, len(LABELS), n)] = 1
    second = rng.random(n) < 0.4
    labels[np.flatnonzero(second), rng.integers(0, len(LABELS), second.sum())] = 1
    weights = labels / labels.sum(axis=1, keepdims=True)
    image = weights @ rng.normal(size=(len(LABELS), IMAGE_DIMS)) + 0.3 * rng.normal(size=(n, IMAGE_DIMS))
    topics = np.exp(3 * (weights @ rng.normal(size=(len(LABELS), TEXT_DIMS))) + rng.normal(size=(n, TEXT_DIMS)))
    split = np.zeros(n, np.uint8)
    split[:n_query] = 1
    np.savez(
        path,
        img_feat=image.astype(np.float32),
        txt_feat=(topics / topics.sum(axis=1, keepdims=True)).astype(np.float32),
        labels=labels,
        split=split,
        label_names=np.array(LABELS),
    )
    return path
