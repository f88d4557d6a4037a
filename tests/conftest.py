"""Shared fixtures. The benchmark file lives in ../shared/data (or $FPOCMH_DATA)."""

from __future__ import annotations

import pytest

from fpocmh_core import config
from fpocmh_core.data import CrossModalDataset, find_dataset, load_dataset
from fpocmh_core.protocols import P1Config, P1Split, p1_split


@pytest.fixture(scope="session")
def benchmark_path():
    return find_dataset()


@pytest.fixture(scope="session")
def mirflickr(benchmark_path) -> CrossModalDataset:
    """The real MIRFlickr-25K benchmark (15,677 items)."""
    return load_dataset(benchmark_path)


@pytest.fixture(scope="session")
def p1_config() -> P1Config:
    return config.load(P1Config, "p1")


@pytest.fixture(scope="session")
def p1(mirflickr, p1_config) -> P1Split:
    return p1_split(mirflickr, p1_config)
