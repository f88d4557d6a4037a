"""Datasets: one in-memory form (:class:`CrossModalDataset`) and loaders for the published layouts."""

from fpocmh_core.data.dataset import CrossModalDataset, DatasetError
from fpocmh_core.data.loaders import DATA_ENV, find_dataset, load_dataset

__all__ = ["DATA_ENV", "CrossModalDataset", "DatasetError", "find_dataset", "load_dataset"]
