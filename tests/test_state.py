"""Model state: the safetensors body, its checksum, checkpoints, and hash models rebuilt from it."""

from __future__ import annotations

import builtins
import io
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from fpocmh_core.nets import HashModel
from fpocmh_core.records import Modality
from fpocmh_core.state import ModelState, StateError, load_checkpoint, save_checkpoint, sha256


def make_state(parent: int | None = 2) -> ModelState:
    rs = np.random.RandomState(0)
    return ModelState(
        method="fpocmh",
        version=3,
        parent_version=parent,
        tensors={
            "model.image.body.0.weight": rs.randn(4, 3).astype(np.float32),
            "bank.counts": np.arange(5, dtype=np.int64),
            "bank.codes": rs.randint(0, 256, (5, 8)).astype(np.uint8),
        },
        meta={"arch": {"bits": 64, "hidden": [32]}, "metrics": {"i2t": 0.71}},
    )


def assert_same_state(a: ModelState, b: ModelState) -> None:
    assert (a.method, a.version, a.parent_version) == (b.method, b.version, b.parent_version)
    assert dict(a.meta) == dict(b.meta)
    assert set(a.tensors) == set(b.tensors)
    for key, arr in a.tensors.items():
        assert b.tensors[key].dtype == arr.dtype
        np.testing.assert_array_equal(b.tensors[key], arr)


@pytest.mark.parametrize("parent", [2, None])
def test_state_round_trips_through_bytes(parent):
    state = make_state(parent)
    body = state.to_bytes()
    assert_same_state(state, ModelState.from_bytes(body, checksum=sha256(body)))


def test_subset_strips_the_prefix():
    assert set(make_state().subset("bank")) == {"counts", "codes"}


def test_a_checksum_mismatch_is_refused():
    body = make_state().to_bytes()
    with pytest.raises(StateError, match="checksum mismatch"):
        ModelState.from_bytes(body, checksum=sha256(body + b"x"))


def test_bytes_that_are_not_safetensors_are_refused():
    with pytest.raises(StateError, match="not a readable fpocmh state"):
        ModelState.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")


def test_a_safetensors_file_of_another_format_is_refused():
    body = st_save({"w": np.ones(2, np.float32)}, metadata={"fpocmh": '{"format": "other/9"}'})
    with pytest.raises(StateError, match="unsupported state format 'other/9'"):
        ModelState.from_bytes(body)


class _Armed:
    """Unpickling this sets a flag on builtins: proof that a payload was executed."""

    def __reduce__(self):
        return exec, ("import builtins; builtins._fpocmh_unpickled = True",)


@pytest.mark.parametrize("dump", ["pickle", "torch.save"])
def test_a_pickle_payload_is_refused_and_never_run(dump):
    if dump == "pickle":
        payload = pickle.dumps({"w": _Armed()})
    else:
        buf = io.BytesIO()
        torch.save({"w": _Armed()}, buf)
        payload = buf.getvalue()
    with pytest.raises(StateError):
        ModelState.from_bytes(payload)
    assert not hasattr(builtins, "_fpocmh_unpickled")
    if dump == "pickle":  # the payload is live: plain pickle would have run it
        pickle.loads(payload)
        assert builtins._fpocmh_unpickled
        del builtins._fpocmh_unpickled


def test_checkpoint_round_trips_with_its_manifest(tmp_path):
    state = make_state()
    folder = save_checkpoint(state, tmp_path / "ckpt", manifest={"dataset": "abc123"})
    loaded, manifest = load_checkpoint(folder)
    assert_same_state(state, loaded)
    assert manifest["dataset"] == "abc123"
    assert manifest["sha256"] == sha256((folder / "state.safetensors").read_bytes())
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.safetensors"]


def test_a_tampered_checkpoint_is_refused(tmp_path):
    folder = save_checkpoint(make_state(), tmp_path / "ckpt")
    body = bytearray((folder / "state.safetensors").read_bytes())
    body[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(body))
    with pytest.raises(StateError, match="checksum mismatch"):
        load_checkpoint(folder)


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    with pytest.raises(StateError, match="no manifest.json"):
        load_checkpoint(tmp_path)


# --- hash models --------------------------------------------------------------------------------


@pytest.fixture()
def model_and_inputs():
    rs = np.random.RandomState(1)
    x_img, x_txt = rs.randn(64, 20).astype(np.float32), rs.rand(64, 30).astype(np.float32)
    model = HashModel.create((20, 30), bits=16, hidden=(32,), dropout=0.5, seed=3)
    model.image.fit_scaler(x_img)
    model.text.fit_scaler(x_txt)
    return model, x_img, x_txt


def test_hash_model_rebuilt_from_state_gives_identical_codes(model_and_inputs):
    model, x_img, x_txt = model_and_inputs
    state = ModelState("fpocmh", 1, None, model.tensors(), meta={"arch": model.arch()})
    loaded = ModelState.from_bytes(state.to_bytes())
    rebuilt = HashModel.from_tensors(loaded.meta["arch"], loaded.subset("model"))
    np.testing.assert_array_equal(rebuilt.encode(x_img, Modality.IMAGE), model.encode(x_img, Modality.IMAGE))
    np.testing.assert_array_equal(rebuilt.encode(x_txt, Modality.TEXT), model.encode(x_txt, Modality.TEXT))
    np.testing.assert_array_equal(rebuilt.image.mean.numpy(), model.image.mean.numpy())


@pytest.mark.parametrize("training", [True, False])
def test_encode_is_pure(model_and_inputs, training):
    model, x_img, _ = model_and_inputs
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.encode(x_img, Modality.IMAGE)
    second = model.encode(x_img, Modality.IMAGE)  # dropout 0.5 would change codes if left on
    np.testing.assert_array_equal(first, second)
    assert first.shape == (64, 2) and first.dtype == np.uint8
    assert model.training == training and model.image.training == training
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
