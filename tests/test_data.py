"""Dataset loading: the benchmark file, our .npz layout and the MATLAB layouts of published code."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from fpocmh_core.data import DATA_ENV, DatasetError, load_dataset
from fpocmh_core.data.matlab import FPO_INDEX_KEYS

N_OFF, N_ON, DIM, N_LABELS = 12, 8, 6, 4


def write_v73(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """What MATLAB's ``save -v7.3`` writes: HDF5 behind a 512-byte header, matrices column-major."""
    with h5py.File(path, "w", userblock_size=512) as fh:
        for key, arr in arrays.items():
            fh[key] = np.atleast_2d(arr).T
    with path.open("r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, written by the fpocmh tests")
    return path


def write_v5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    scipy.io.savemat(path, arrays)
    return path


WRITERS = pytest.mark.parametrize("write", [write_v73, write_v5], ids=["v7.3-hdf5", "v5-scipy"])


def multi_hot(rng: np.random.Generator, n: int, n_labels: int = N_LABELS) -> np.ndarray:
    labels = (rng.random((n, n_labels)) < 0.4).astype(np.float64)
    labels[np.arange(n), rng.integers(0, n_labels, n)] = 1  # no empty rows
    return labels


def fpo_arrays(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features and index vectors of a tiny FPO-CMH dataset, in MATLAB orientation (items x dims)."""
    rng = np.random.default_rng(seed)
    feats: dict[str, np.ndarray] = {}
    for part, n in (("offline", N_OFF), ("online", N_ON)):
        feats[f"{part}_image"] = rng.normal(size=(n, DIM)).astype(np.float32)
        feats[f"{part}_text"] = rng.normal(size=(n, DIM)).astype(np.float32)
        feats[f"{part}_label"] = multi_hot(rng, n)
    index = {}
    for part, n in (("offline", N_OFF), ("online", N_ON)):
        perm = rng.permutation(n).astype(np.float64)  # MATLAB saves indices as doubles
        index[f"{part}_test_index"] = perm[:3]
        index[f"{part}_retrieval_index"] = perm[3:]
        index[f"{part}_train_index"] = perm[3 : n - 2]
    return feats, index


def write_fpo(root: Path, write, name: str = "MIRFlickr") -> Path:
    """The FPO-CMH repository layout: ROOT/feature/X.mat and ROOT/split/X_index.mat."""
    feats, index = fpo_arrays()
    (root / "feature").mkdir(parents=True)
    (root / "split").mkdir()
    write(root / "split" / f"{name}_index.mat", index)
    return write(root / "feature" / f"{name}.mat", feats)


def write_npz(path: Path, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    arrays = {
        "img_feat": rng.normal(size=(10, 5)).astype(np.float32),
        "txt_feat": (rng.random((10, 7)) < 0.3).astype(np.uint8),
        "labels": multi_hot(rng, 10, 3).astype(np.uint8),
        "label_names": np.array(["a", "b", "c"]),
        "split": np.array([1, 0] * 5, dtype=np.uint8),
        "ids": np.arange(10, dtype=np.int32),
    }
    np.savez(path, **{**arrays, **override})
    return path


# --- the benchmark file -------------------------------------------------------------------------


def test_the_benchmark_file_loads_with_its_own_dims(mirflickr, benchmark_path):
    with np.load(benchmark_path) as npz:
        img_dim, txt_dim, n_labels = npz["img_feat"].shape[1], npz["txt_feat"].shape[1], npz["labels"].shape[1]
    assert len(mirflickr) == 15_677
    assert mirflickr.dims == (img_dim, txt_dim)
    assert mirflickr.n_labels == n_labels
    assert int(mirflickr.split.sum()) == 2_000
    assert mirflickr.label_names[-2:] == ("tree", "water")
    assert mirflickr.image.dtype == np.float32 and mirflickr.labels.dtype == np.uint8


# --- our .npz layout ----------------------------------------------------------------------------


def test_npz_layout_round_trips(tmp_path):
    path = write_npz(tmp_path / "small.npz")
    ds = load_dataset(path)
    with np.load(path) as npz:
        np.testing.assert_array_equal(ds.image, npz["img_feat"])
        np.testing.assert_array_equal(ds.text, npz["txt_feat"].astype(np.float32))
        np.testing.assert_array_equal(ds.labels, npz["labels"])
        np.testing.assert_array_equal(ds.split, npz["split"])
        np.testing.assert_array_equal(ds.extras["ids"], npz["ids"])
    assert ds.label_names == ("a", "b", "c")
    assert ds.feature_space == "separate"


def test_missing_file_names_the_path_looked_at(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(DatasetError, match="no dataset found") as err:
        load_dataset(missing)
    assert str(missing) in str(err.value)


def test_env_var_names_the_dataset(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "mirflickr15677_tiny.npz")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # a folder: searched for the benchmark pattern
    assert load_dataset().source == str(path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(DatasetError, match=rf"\${DATA_ENV}") as err:
        load_dataset()
    assert str(tmp_path / "gone") in str(err.value)


def test_missing_key_is_named_with_the_keys_present(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, img_feat=np.ones((3, 2)), txt_feat=np.ones((3, 2)))
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['labels'\]") as err:
        load_dataset(path)
    assert "'img_feat', 'txt_feat'" in str(err.value)


def test_rows_that_disagree_across_modalities_name_keys_and_shapes(tmp_path):
    path = write_npz(tmp_path / "short.npz", txt_feat=np.ones((9, 7), dtype=np.uint8))
    with pytest.raises(DatasetError, match="rows must be aligned") as err:
        load_dataset(path)
    assert "img_feat (10, 5)" in str(err.value) and "txt_feat (9, 7)" in str(err.value)


def test_nan_and_inf_rows_are_named_with_their_key(tmp_path):
    img = np.ones((10, 5), dtype=np.float32)
    img[3, 0], img[7, 4] = np.nan, np.inf
    with pytest.raises(DatasetError, match=r"img_feat has NaN or inf in 2 row\(s\): 3, 7"):
        load_dataset(write_npz(tmp_path / "nan.npz", img_feat=img))


def test_empty_label_rows_are_named(tmp_path):
    labels = np.ones((10, 3), dtype=np.uint8)
    labels[[2, 5]] = 0
    with pytest.raises(DatasetError, match=r"labels has empty label rows in 2 row\(s\): 2, 5"):
        load_dataset(write_npz(tmp_path / "empty.npz", labels=labels))


def test_labels_must_be_multi_hot(tmp_path):
    labels = np.ones((10, 3), dtype=np.uint8)
    labels[0, 0] = 2
    with pytest.raises(DatasetError, match="labels must be multi-hot 0/1"):
        load_dataset(write_npz(tmp_path / "counts.npz", labels=labels))


def test_features_must_be_two_dimensional(tmp_path):
    with pytest.raises(DatasetError, match=r"img_feat must be 2-D \(items x dims\), got shape \(10, 5, 1\)"):
        load_dataset(write_npz(tmp_path / "cube.npz", img_feat=np.ones((10, 5, 1), dtype=np.float32)))


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_dataset(path)


# --- FPO-CMH layout -----------------------------------------------------------------------------


@WRITERS
def test_fpo_layout_round_trips_offline_rows_first(tmp_path, write):
    path = write_fpo(tmp_path, write)
    feats, index = fpo_arrays()
    ds = load_dataset(path)

    np.testing.assert_array_equal(ds.image, np.concatenate([feats["offline_image"], feats["online_image"]]))
    np.testing.assert_array_equal(ds.text, np.concatenate([feats["offline_text"], feats["online_text"]]))
    np.testing.assert_array_equal(ds.labels, np.concatenate([feats["offline_label"], feats["online_label"]]))
    assert ds.dims == (DIM, DIM) and ds.n_labels == N_LABELS
    assert ds.feature_space == "joint"

    np.testing.assert_array_equal(ds.extras["offline_rows"], np.arange(N_OFF))
    np.testing.assert_array_equal(ds.extras["online_rows"], np.arange(N_OFF, N_OFF + N_ON))
    for key in FPO_INDEX_KEYS:
        offset = N_OFF if key.startswith("online") else 0
        np.testing.assert_array_equal(ds.extras[key.removesuffix("_index") + "_rows"], index[key] + offset)
    queries = np.concatenate([index["offline_test_index"], index["online_test_index"] + N_OFF])
    np.testing.assert_array_equal(np.flatnonzero(ds.split), np.sort(queries))


def test_fpo_index_file_beside_the_features_or_passed_explicitly(tmp_path):
    feats, index = fpo_arrays()
    path = write_v73(tmp_path / "NUSWIDE.mat", feats)
    write_v73(tmp_path / "NUSWIDE_index.mat", index)
    beside = load_dataset(path)
    other = write_v5(tmp_path / "elsewhere.mat", index)
    explicit = load_dataset(path, index_path=other)
    np.testing.assert_array_equal(beside.split, explicit.split)
    assert beside.fingerprint() == explicit.fingerprint()


def test_fpo_missing_index_file_names_every_place_looked(tmp_path):
    feats, _ = fpo_arrays()
    (tmp_path / "feature").mkdir()
    path = write_v73(tmp_path / "feature" / "MSCOCO.mat", feats)
    with pytest.raises(DatasetError, match="needs its index file") as err:
        load_dataset(path)
    assert str(tmp_path / "feature" / "MSCOCO_index.mat") in str(err.value)
    assert str(tmp_path / "split" / "MSCOCO_index.mat") in str(err.value)


def test_fpo_missing_key_is_named_with_the_keys_present(tmp_path):
    feats, _ = fpo_arrays()
    del feats["online_text"]
    path = write_v73(tmp_path / "MIRFlickr.mat", feats)
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['online_text'\]") as err:
        load_dataset(path)
    assert "'offline_text'" in str(err.value)


def test_fpo_one_based_indices_are_refused(tmp_path):
    feats, index = fpo_arrays()
    index["online_test_index"] = np.array([1.0, N_ON])
    write_v73(tmp_path / "X_index.mat", index)
    with pytest.raises(DatasetError, match=f"online_test_index holds indices 1..{N_ON} but its part has {N_ON} rows"):
        load_dataset(write_v73(tmp_path / "X.mat", feats))


def test_fpo_nan_rows_are_named_by_file_key_and_part_row(tmp_path):
    feats, index = fpo_arrays()
    feats["online_text"][2, 1] = np.nan
    write_v5(tmp_path / "X_index.mat", index)
    with pytest.raises(DatasetError, match=r"online_text has NaN or inf in 1 row\(s\): 2$"):
        load_dataset(write_v5(tmp_path / "X.mat", feats))


def test_fpo_parts_that_disagree_name_keys_and_shapes(tmp_path):
    feats, index = fpo_arrays()
    feats["online_image"] = feats["online_image"][:, :4]
    write_v73(tmp_path / "X_index.mat", index)
    with pytest.raises(DatasetError, match="column counts disagree") as err:
        load_dataset(write_v73(tmp_path / "X.mat", feats))
    assert f"offline_image ({N_OFF}, {DIM})" in str(err.value) and f"online_image ({N_ON}, 4)" in str(err.value)


# --- DCMH-style MIRFlickr layout ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mirflickr_slice(mirflickr):
    """40 real benchmark rows, written out the way DCMH's mirflickr25k-*all.mat files hold them."""
    rows = np.arange(0, 4000, 100)
    return {"FAll": mirflickr.image[rows], "YAll": mirflickr.text[rows], "LAll": mirflickr.labels[rows].astype(float)}


@WRITERS
def test_dcmh_single_file_round_trips_with_mirflickr_label_names(tmp_path, write, mirflickr, mirflickr_slice):
    ds = load_dataset(write(tmp_path / "FLICKR-25K.mat", mirflickr_slice))
    np.testing.assert_array_equal(ds.image, mirflickr_slice["FAll"])
    np.testing.assert_array_equal(ds.text, mirflickr_slice["YAll"])
    np.testing.assert_array_equal(ds.labels, mirflickr_slice["LAll"])
    assert ds.split is None and ds.feature_space == "separate"
    assert ds.label_names == mirflickr.label_names


@WRITERS
def test_dcmh_sibling_files_skip_raw_images_for_features(tmp_path, write, mirflickr_slice):
    n = len(mirflickr_slice["YAll"])
    write(tmp_path / "mirflickr25k-yall.mat", {"YAll": mirflickr_slice["YAll"]})
    write(tmp_path / "mirflickr25k-lall.mat", {"LAll": mirflickr_slice["LAll"]})
    write(tmp_path / "mirflickr25k-iall.mat", {"IAll": np.zeros((n, 3, 4, 4), dtype=np.uint8)})
    write(tmp_path / "mirflickr25k-fall.mat", {"FAll": mirflickr_slice["FAll"]})
    ds = load_dataset(tmp_path / "mirflickr25k-yall.mat")
    assert ds.name == "mirflickr25k"
    np.testing.assert_array_equal(ds.image, mirflickr_slice["FAll"])
    np.testing.assert_array_equal(ds.labels, mirflickr_slice["LAll"])


def test_dcmh_v5_sparse_tags_load_dense(tmp_path, mirflickr_slice):
    arrays = {**mirflickr_slice, "YAll": scipy.sparse.csc_matrix(mirflickr_slice["YAll"])}
    ds = load_dataset(write_v5(tmp_path / "FLICKR-25K.mat", arrays))
    np.testing.assert_array_equal(ds.text, mirflickr_slice["YAll"])


def test_dcmh_raw_images_alone_ask_for_features(tmp_path, mirflickr_slice):
    n = len(mirflickr_slice["YAll"])
    write_v73(tmp_path / "mirflickr25k-yall.mat", {"YAll": mirflickr_slice["YAll"]})
    write_v73(tmp_path / "mirflickr25k-lall.mat", {"LAll": mirflickr_slice["LAll"]})
    write_v73(tmp_path / "mirflickr25k-iall.mat", {"IAll": np.zeros((n, 3, 4, 4), dtype=np.uint8)})
    with pytest.raises(DatasetError, match=rf"only raw images found \(IAll \({n}, 3, 4, 4\).*precomputed 2-D"):
        load_dataset(tmp_path / "mirflickr25k-yall.mat")


def test_dcmh_missing_sibling_names_the_file_expected(tmp_path, mirflickr_slice):
    write_v5(tmp_path / "mirflickr25k-yall.mat", {"YAll": mirflickr_slice["YAll"]})
    write_v5(tmp_path / "mirflickr25k-fall.mat", {"FAll": mirflickr_slice["FAll"]})
    with pytest.raises(DatasetError, match="missing key 'LAll'") as err:
        load_dataset(tmp_path / "mirflickr25k-yall.mat")
    assert "mirflickr25k-lall.mat" in str(err.value) and str(tmp_path) in str(err.value)


def test_dcmh_rows_that_disagree_name_keys_and_shapes(tmp_path, mirflickr_slice):
    arrays = {**mirflickr_slice, "LAll": mirflickr_slice["LAll"][:-1]}
    with pytest.raises(DatasetError, match="row counts disagree") as err:
        load_dataset(write_v73(tmp_path / "FLICKR-25K.mat", arrays))
    for key in ("FAll", "YAll", "LAll"):
        assert f"{key} {arrays[key].shape}" in str(err.value)


def test_a_mat_file_of_no_known_layout_lists_its_keys(tmp_path):
    with pytest.raises(DatasetError, match=r"not a known layout.*the file has \['weights'\]"):
        load_dataset(write_v5(tmp_path / "model.mat", {"weights": np.ones((2, 2))}))


def test_a_file_that_is_not_mat_is_refused(tmp_path):
    path = tmp_path / "fake.mat"
    path.write_bytes(b"not a MATLAB file at all" * 8)
    with pytest.raises(DatasetError, match="not a MATLAB .mat or HDF5 file"):
        load_dataset(path)


def test_another_feature_array_of_the_file_can_stand_in_for_a_modality(mirflickr):
    minilm = mirflickr.with_features(text="txt_minilm")
    assert minilm.dims == (mirflickr.dims[0], 384) and minilm.text.dtype == np.float32
    assert np.array_equal(minilm.image, mirflickr.image) and np.array_equal(minilm.labels, mirflickr.labels)
    assert mirflickr.with_features(text="txt_feat") is mirflickr


def test_an_unknown_feature_key_names_the_file_and_the_arrays_it_has(mirflickr):
    with pytest.raises(DatasetError, match=r"mirflickr.*'txt_bert'.*text.*\['img_feat', 'txt_feat'.*'txt_minilm'"):
        mirflickr.with_features(text="txt_bert")
