"""MATLAB (.mat, v5 or v7.3/HDF5) layouts of published cross-modal hashing code.

**FPO-CMH** (``utils.load_data``): one file with ``offline_image``, ``offline_text``, ``offline_label``,
``online_image``, ``online_text`` and ``online_label``, plus an index file ``<stem>_index.mat`` holding
six 0-based index vectors ``{offline,online}_{train,retrieval,test}_index``, each relative to its part.
The dataset's rows are the offline part, then the online part; ``feature_space`` is ``"joint"`` (CLIP)
and ``split`` is 1 on every row of a test index. ``extras`` keeps the file's own division, as dataset
rows (online indices shifted by the offline size):

- ``offline_rows``, ``online_rows``: the rows of each part;
- ``{offline,online}_{train,retrieval,test}_rows``: the six index vectors.

A row listed both as test and as retrieval gets ``split`` 1, so code that needs the authors' exact
database should take it from the ``*_retrieval_rows``.

**DCMH-style MIRFlickr**: ``YAll`` (tags), ``LAll`` (labels) and precomputed image features under
``XAll``, ``FAll`` or ``IAll``, in one file or in sibling files ``<prefix>-yall.mat``, ``<prefix>-lall.mat``,
``<prefix>-iall.mat`` / ``-fall.mat`` / ``-xall.mat`` in one folder. Raw 4-D images are refused: the
learners take feature vectors. There is no split; the protocols draw the queries. With 24 label columns
the label names are MIRFlickr-25K's, in the standard order.

MATLAB stores matrices column-major, so h5py shows a MATLAB N x d matrix as d x N; arrays read from
v7.3 files are transposed back. Shapes in messages are MATLAB's (rows x columns).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse
from scipy.io.matlab import MatReadError

from fpocmh_core.data.dataset import (
    CrossModalDataset,
    DatasetError,
    check_aligned,
    check_features,
    check_labels,
    require_keys,
)

PARTS = ("offline", "online")
FPO_KEYS = tuple(f"{part}_{kind}" for part in PARTS for kind in ("image", "text", "label"))
FPO_INDEX_KEYS = tuple(f"{part}_{role}_index" for part in PARTS for role in ("train", "retrieval", "test"))

DCMH_TEXT, DCMH_LABELS = "YAll", "LAll"
DCMH_IMAGE_KEYS = ("XAll", "FAll", "IAll")
# DLCH's FLICKR-25K.mat keeps raw pixels under this key.
RAW_IMAGE_KEYS = ("images",)
DCMH_SIBLING = re.compile(r"^(?P<prefix>.+)-[xyfil]all$", re.IGNORECASE)

MIRFLICKR25K_LABELS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
    "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
    "tree", "water",
)  # fmt: skip


class MatFile:
    """Keys, shapes and arrays of one .mat file; reads one key at a time, as files with raw images are large."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with h5py.File(path, "r") as fh:
                # Groups such as '#refs#' hold MATLAB cell arrays and strings, never a matrix we need.
                self.shapes = {
                    k: tuple(reversed(v.shape))
                    for k, v in fh.items()
                    if isinstance(v, h5py.Dataset) and not k.startswith("#")
                }
            self.hdf5 = True
        except OSError:
            try:
                self.shapes = {name: tuple(shape) for name, shape, _ in scipy.io.whosmat(path)}
            except (ValueError, OSError, MatReadError) as exc:
                raise DatasetError(f"{path}: not a MATLAB .mat or HDF5 file ({exc})") from exc
            self.hdf5 = False

    @property
    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def read(self, key: str) -> np.ndarray:
        if self.hdf5:
            with h5py.File(self.path, "r") as fh:
                return np.asarray(fh[key][()]).T
        arr = scipy.io.loadmat(self.path, variable_names=[key])[key]
        return arr.toarray() if scipy.sparse.issparse(arr) else np.asarray(arr)


def load_mat(
    path: Path | str,
    index_path: Path | str | None = None,
    label_names: Sequence[str] | None = None,
) -> CrossModalDataset:
    """Load an FPO-CMH or a DCMH-style file; the layout follows the keys found in ``path``.

    ``index_path`` is the FPO-CMH index file (default: ``<stem>_index.mat`` beside ``path``, then in
    ``../split/``); ``label_names`` overrides the label names.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path.resolve()}: no such file")
    mat = MatFile(path)
    if any(key in mat.shapes for key in FPO_KEYS):
        return _load_fpo(mat, index_path, label_names)
    if DCMH_SIBLING.match(path.stem) or any(k in mat.shapes for k in (DCMH_TEXT, DCMH_LABELS, *DCMH_IMAGE_KEYS)):
        if index_path is not None:
            raise DatasetError(f"{path}: index_path applies to the FPO-CMH layout only; this file is DCMH-style")
        return _load_dcmh(mat, label_names)
    raise DatasetError(
        f"{path}: not a known layout: expected the FPO-CMH keys {list(FPO_KEYS)} or the DCMH keys "
        f"{DCMH_TEXT}, {DCMH_LABELS} and one of {list(DCMH_IMAGE_KEYS)}; the file has {mat.keys}"
    )


def _same_width(arrays: dict[str, np.ndarray], where: str) -> None:
    if len({arr.shape[1] for arr in arrays.values()}) > 1:
        shapes = ", ".join(f"{key} {arr.shape}" for key, arr in arrays.items())
        raise DatasetError(f"{where}: column counts disagree ({shapes}); both parts need the same dims")


def _read_part(mat: MatFile, part: str) -> dict[str, np.ndarray]:
    where = str(mat.path)
    arrays = {f"{part}_{kind}": mat.read(f"{part}_{kind}") for kind in ("image", "text", "label")}
    check_features(arrays[f"{part}_image"], f"{part}_image", where)
    check_features(arrays[f"{part}_text"], f"{part}_text", where)
    check_labels(arrays[f"{part}_label"], f"{part}_label", where)
    check_aligned(arrays, where)
    return arrays


def find_index_file(path: Path, index_path: Path | str | None = None) -> Path:
    """The FPO-CMH index file: ``index_path``, else ``<stem>_index.mat`` beside ``path`` or in ``../split/``."""
    if index_path is not None:
        candidates = [Path(index_path)]
    else:
        name = f"{path.stem}_index.mat"
        candidates = [path.with_name(name), path.parent.parent / "split" / name]
    for cand in candidates:
        if cand.is_file():
            return cand
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DatasetError(f"{path}: the FPO-CMH layout needs its index file; looked for {looked}. Pass index_path=PATH.")


def _read_index(mat: MatFile, key: str, size: int) -> np.ndarray:
    raw = np.squeeze(mat.read(key))
    if raw.ndim > 1:
        raise DatasetError(f"{mat.path}: {key} must be a vector, got shape {raw.shape}")
    raw = raw.reshape(-1)
    if not np.array_equal(raw, np.round(raw)):
        raise DatasetError(f"{mat.path}: {key} must hold whole numbers (row indices)")
    idx = raw.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise DatasetError(
            f"{mat.path}: {key} holds indices {idx.min()}..{idx.max()} but its part has {size} rows; "
            f"indices must be 0-based, within 0..{size - 1}"
        )
    return idx


def _load_fpo(mat: MatFile, index_path: Path | str | None, label_names: Sequence[str] | None) -> CrossModalDataset:
    where = str(mat.path)
    require_keys(set(mat.shapes), FPO_KEYS, mat.path)
    off, on = (_read_part(mat, part) for part in PARTS)
    for kind in ("image", "text", "label"):
        _same_width({f"offline_{kind}": off[f"offline_{kind}"], f"online_{kind}": on[f"online_{kind}"]}, where)
    n_off, n_on = off["offline_image"].shape[0], on["online_image"].shape[0]
    n = n_off + n_on

    index = MatFile(find_index_file(mat.path, index_path))
    require_keys(set(index.shapes), FPO_INDEX_KEYS, index.path)
    sizes, offsets = {"offline": n_off, "online": n_on}, {"offline": 0, "online": n_off}
    extras = {"offline_rows": np.arange(n_off, dtype=np.int64), "online_rows": np.arange(n_off, n, dtype=np.int64)}
    split = np.zeros(n, dtype=np.uint8)
    for key in FPO_INDEX_KEYS:
        part = key.split("_", 1)[0]
        rows = _read_index(index, key, sizes[part]) + offsets[part]
        extras[key.removesuffix("_index") + "_rows"] = rows
        if key.endswith("_test_index"):
            split[rows] = 1
    return CrossModalDataset(
        name=mat.path.stem,
        image=np.concatenate([off["offline_image"], on["online_image"]]).astype(np.float32),
        text=np.concatenate([off["offline_text"], on["online_text"]]).astype(np.float32),
        labels=np.concatenate([off["offline_label"], on["online_label"]]).astype(np.uint8),
        split=split,
        label_names=tuple(label_names or ()),
        feature_space="joint",
        source=where,
        extras=extras,
    )


def _dcmh_files(mat: MatFile) -> list[MatFile]:
    """The file itself, plus its ``<prefix>-*all.mat`` siblings when its name follows that pattern."""
    match = DCMH_SIBLING.match(mat.path.stem)
    if not match:
        return [mat]
    prefix = match["prefix"].lower()
    siblings = sorted(
        p
        for p in mat.path.parent.iterdir()
        if p != mat.path
        and p.suffix.lower() == ".mat"
        and (m := DCMH_SIBLING.match(p.stem))
        and m["prefix"].lower() == prefix
    )
    return [mat, *(MatFile(p) for p in siblings)]


def _missing(key: str, files: list[MatFile], hint: str) -> DatasetError:
    looked = "; ".join(f"{f.path} (keys {f.keys})" for f in files)
    return DatasetError(f"missing key {key!r}: looked in {looked}. {hint}")


def _load_dcmh(mat: MatFile, label_names: Sequence[str] | None) -> CrossModalDataset:
    files = _dcmh_files(mat)
    match = DCMH_SIBLING.match(mat.path.stem)
    hint = (
        f"Expected sibling files {match['prefix']}-yall.mat, {match['prefix']}-lall.mat and "
        f"{match['prefix']}-fall.mat (or -iall/-xall) in {mat.path.parent.resolve()}."
        if match
        else f"A DCMH-style file holds {DCMH_TEXT}, {DCMH_LABELS} and one of {list(DCMH_IMAGE_KEYS)}."
    )
    holder: dict[str, MatFile] = {}
    for f in reversed(files):  # the file the caller named wins over its siblings
        holder.update(dict.fromkeys(f.shapes, f))
    for key in (DCMH_TEXT, DCMH_LABELS):
        if key not in holder:
            raise _missing(key, files, hint)

    image_keys = [k for k in DCMH_IMAGE_KEYS if k in holder]
    flat = [k for k in image_keys if len(holder[k].shapes[k]) == 2]
    if not flat:
        raw = [k for k in (*image_keys, *RAW_IMAGE_KEYS) if k in holder]
        if raw:
            found = ", ".join(f"{k} {holder[k].shapes[k]} in {holder[k].path}" for k in raw)
            raise DatasetError(
                f"only raw images found ({found}); precomputed 2-D image features (items x dims) are needed "
                f"under one of {list(DCMH_IMAGE_KEYS)}"
            )
        raise _missing(" or ".join(DCMH_IMAGE_KEYS), files, hint)
    image_key = flat[0]

    arrays = {key: holder[key].read(key) for key in (image_key, DCMH_TEXT, DCMH_LABELS)}
    where = ", ".join(sorted({str(holder[key].path) for key in arrays}))
    check_features(arrays[image_key], image_key, str(holder[image_key].path))
    check_features(arrays[DCMH_TEXT], DCMH_TEXT, str(holder[DCMH_TEXT].path))
    check_labels(arrays[DCMH_LABELS], DCMH_LABELS, str(holder[DCMH_LABELS].path))
    check_aligned(arrays, where)
    labels = arrays[DCMH_LABELS].astype(np.uint8)
    if label_names is None and labels.shape[1] == len(MIRFLICKR25K_LABELS):
        label_names = MIRFLICKR25K_LABELS
    return CrossModalDataset(
        name=match["prefix"] if match else mat.path.stem,
        image=arrays[image_key].astype(np.float32),
        text=arrays[DCMH_TEXT].astype(np.float32),
        labels=labels,
        label_names=tuple(label_names or ()),
        feature_space="separate",
        source=where,
    )
