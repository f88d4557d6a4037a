"""Find and load dataset files: our ``.npz`` layout and the MATLAB/HDF5 layouts of published code."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fpocmh_core.data.dataset import (
    CrossModalDataset,
    DatasetError,
    check_aligned,
    check_features,
    check_labels,
    require_keys,
)

DATA_ENV = "FPOCMH_DATA"
# Looked in, in order, when neither a path nor FPOCMH_DATA is given.
DEFAULT_DATA_DIRS = (Path("data"), Path("../shared/data"))
DEFAULT_PATTERN = "mirflickr15677_*.npz"


def find_dataset(path: str | Path | None = None, pattern: str = DEFAULT_PATTERN) -> Path:
    """Resolve a dataset path from an argument, ``$FPOCMH_DATA``, or the default data folders.

    A directory is searched for ``pattern`` (the MIRFlickr benchmark by default).
    """
    candidates: list[Path]
    if path is not None:
        candidates, origin = [Path(path)], "--data"
    elif os.environ.get(DATA_ENV):
        candidates, origin = [Path(os.environ[DATA_ENV])], f"${DATA_ENV}"
    else:
        candidates, origin = list(DEFAULT_DATA_DIRS), "the default data folders"
    for cand in candidates:
        if cand.is_file():
            return cand
        if cand.is_dir():
            hits = sorted(cand.glob(pattern))
            if hits:
                return hits[0]
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DatasetError(
        f"no dataset found from {origin}: looked for a file or a folder holding {pattern!r} in {looked}. "
        f"Pass --data PATH or set {DATA_ENV}."
    )


# What numpy raises on a truncated or corrupt .npz: at open (no zip directory) or while inflating a member.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def load_npz(path: Path) -> CrossModalDataset:
    """Our layout: ``img_feat``, ``txt_feat``, ``labels``; optional ``split``, ``label_names``, extras."""
    try:
        return _read_npz(path)
    except DatasetError:
        raise
    except _UNREADABLE as exc:
        raise DatasetError(
            f"{path}: not a readable .npz file, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def _read_npz(path: Path) -> CrossModalDataset:
    npz = np.load(path, allow_pickle=False)
    with npz:
        keys = set(npz.files)
        require_keys(keys, ("img_feat", "txt_feat", "labels"), path)
        arrays = {k: npz[k] for k in ("img_feat", "txt_feat", "labels")}
        # Checked under the file's own key names, so a message points at what to fix in the file.
        check_features(arrays["img_feat"], "img_feat", str(path))
        check_features(arrays["txt_feat"], "txt_feat", str(path))
        check_labels(arrays["labels"], "labels", str(path))
        check_aligned(arrays, str(path))
        split = npz["split"].astype(np.uint8) if "split" in keys else None
        names = tuple(str(s) for s in npz["label_names"]) if "label_names" in keys else ()
        space = str(npz["feature_space"]) if "feature_space" in keys else "separate"
        # Any other per-item array can stand in for a modality (CrossModalDataset.with_features).
        core = {"img_feat", "txt_feat", "labels", "split", "label_names", "feature_space"}
        extras = {k: npz[k] for k in sorted(keys - core) if npz[k].shape[:1] == (len(arrays["labels"]),)}
        return CrossModalDataset(
            name=path.stem,
            image=arrays["img_feat"].astype(np.float32),
            text=arrays["txt_feat"].astype(np.float32),
            labels=arrays["labels"].astype(np.uint8),
            split=split,
            label_names=names,
            feature_space=space,
            source=str(path),
            extras=extras,
        )


def load_dataset(path: str | Path | None = None, **kwargs: object) -> CrossModalDataset:
    """Load any supported layout; the format follows the file's suffix."""
    resolved = find_dataset(path)
    suffix = resolved.suffix.lower()
    if suffix == ".npz":
        return load_npz(resolved)
    if suffix in (".mat", ".h5", ".hdf5"):
        from fpocmh_core.data.matlab import load_mat

        return load_mat(resolved, **kwargs)  # type: ignore[arg-type]
    raise DatasetError(f"{resolved}: unsupported file type {suffix!r}; expected .npz, .mat, .h5 or .hdf5")
