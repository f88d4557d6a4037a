"""The naive online fine-tuning baseline: same networks and optimiser as FPO-CMH, no bank, no rehearsal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset
from fpocmh_core.learners import fpocmh, naive
from fpocmh_core.learners.naive import NaiveLearner
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds() -> CrossModalDataset:
    rs = np.random.RandomState(0)
    labels = np.zeros((64, 3), np.uint8)
    labels[np.arange(64), rs.randint(0, 3, 64)] = 1
    return CrossModalDataset("tiny", rs.randn(64, 10).astype(np.float32), rs.randn(64, 7).astype(np.float32), labels)


def learner(ds: CrossModalDataset) -> NaiveLearner:
    return NaiveLearner(HashModel.create(ds.dims, 16, hidden=(16,), seed=0), naive.load_config())


def weights(lr: NaiveLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lr.model.parameters()]


def test_naive_uses_the_fpocmh_optimiser_settings():
    assert config.to_dict(naive.load_config().optimizer) == config.to_dict(fpocmh.load_config().optimizer)


def test_unpaired_unlabelled_arrivals_teach_nothing(ds):
    lrn = learner(ds)
    before = weights(lrn)
    batch = [ItemRecord(i, ds.image[i], None) for i in range(8)] + [ItemRecord(i, None, ds.text[i]) for i in range(8)]
    report = lrn.learn(batch)
    assert report.steps == {"img": 0, "txt": 0}
    assert all(torch.equal(a, b) for a, b in zip(before, weights(lrn), strict=True))


def test_labelled_or_paired_arrivals_give_one_step_per_micro_batch(ds):
    lrn = learner(ds)
    labelled = [ItemRecord(i, ds.image[i], None, ds.labels[i]) for i in range(8)]
    labelled += [ItemRecord(i, None, ds.text[i], ds.labels[i]) for i in range(8, 16)]
    assert lrn.learn(labelled).steps == {"img": 1, "txt": 1}
    pairs = [ItemRecord(i, ds.image[i], ds.text[i]) for i in range(16, 20)]
    before = weights(lrn)
    assert lrn.learn(pairs).steps == {"img": 1, "txt": 1}
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(lrn), strict=True))
