"""The offline trainer: learns cross-modal retrieval from paired or unpaired labelled items, is
deterministic, warm-starts, early-stops, and round-trips through a checkpoint folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fpocmh import cli
from fpocmh_core import codes
from fpocmh_core.baselines import CCAHasher
from fpocmh_core.evaluation import cross_modal_map
from fpocmh_core.offline import (
    TrainingSet,
    load_offline_config,
    load_offline_model,
    save_offline_checkpoint,
    train_offline,
)
from fpocmh_core.records import Modality
from fpocmh_core.state import StateError

IMG, TXT = Modality.IMAGE, Modality.TEXT
SMALL = {"hidden": [256], "epochs": 6, "patience": 6}


@pytest.fixture(scope="module")
def evaluation_rows(p1):
    """500 queries against ~2,700 database rows that were not trained on."""
    return p1.query[:500], np.concatenate(p1.chunks[:2])


def query_map(encode, ds, rows) -> tuple[float, float]:
    q, db = rows
    s = cross_modal_map(
        encode(ds.image[q], IMG), encode(ds.text[q], TXT), ds.labels[q],
        encode(ds.image[db], IMG), encode(ds.text[db], TXT), ds.labels[db],
    )  # fmt: skip
    return s.i2t, s.t2i


def random_codes_map(ds, rows, bits: int) -> float:
    rng = np.random.default_rng(0)

    def encode(x, modality):
        return codes.pack(codes.sign_codes(rng.standard_normal((len(x), bits))))

    return max(query_map(encode, ds, rows))


@pytest.fixture(scope="module")
def paired_result(mirflickr, p1):
    data = TrainingSet.from_rows(mirflickr, p1.offline[:1500])
    return train_offline(data, 32, load_offline_config(overrides=SMALL), progress=False, seed=0)


def test_trained_model_beats_cca_and_random_codes(mirflickr, p1, paired_result, evaluation_rows):
    model_map = query_map(paired_result.model.encode, mirflickr, evaluation_rows)
    cca = CCAHasher(32).fit(TrainingSet.from_rows(mirflickr, p1.offline[:1500]))
    cca_map = query_map(cca.encode, mirflickr, evaluation_rows)
    chance = random_codes_map(mirflickr, evaluation_rows, 32)
    for direction in range(2):
        assert model_map[direction] > cca_map[direction] + 0.05
        assert model_map[direction] > chance + 0.12
    assert paired_result.val_map > 0.7
    assert paired_result.history[0]["epoch"] == 0 and paired_result.history[-1]["epoch"] == SMALL["epochs"]


def test_training_is_deterministic_for_a_seed(mirflickr, p1):
    data = TrainingSet.from_rows(mirflickr, p1.offline[:300])
    cfg = load_offline_config(overrides={"hidden": [64], "epochs": 2})
    global_rng_before = torch.random.get_rng_state()
    first, second = (train_offline(data, 16, cfg, progress=False, seed=3) for _ in range(2))
    other = train_offline(data, 16, cfg, progress=False, seed=4)
    assert torch.equal(global_rng_before, torch.random.get_rng_state()), "the global torch RNG must be left alone"
    a, b, c = first.model.tensors(), second.model.tensors(), other.model.tensors()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)

    def untimed(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert untimed(first.history) == untimed(second.history)


def test_unpaired_items_learn_cross_modal_retrieval(mirflickr, p1, evaluation_rows):
    """Images and texts from disjoint rows, no pairs: shared labels alone relate the modalities."""
    rows = p1.offline[:2400]
    img_rows, txt_rows = rows[:1200], rows[1200:]
    ds = mirflickr
    data = TrainingSet(ds.image[img_rows], ds.labels[img_rows], ds.text[txt_rows], ds.labels[txt_rows], None)
    result = train_offline(data, 16, load_offline_config(overrides=SMALL), progress=False)
    i2t, t2i = query_map(result.model.encode, ds, evaluation_rows)
    chance = random_codes_map(ds, evaluation_rows, 16)
    assert min(i2t, t2i) > chance + 0.1
    assert len(data.units()) == 2400 and (data.units() >= 0).sum(axis=1).max() == 1


def test_warm_start_begins_from_the_given_weights(mirflickr, p1, paired_result):
    data = TrainingSet.from_rows(mirflickr, p1.offline[1500:2500])
    init = paired_result.model
    before = init.tensors()
    frozen = train_offline(data, 32, load_offline_config(overrides={"epochs": 0}), init=init, progress=False)
    assert frozen.model is not init
    assert all(np.array_equal(v, frozen.model.tensors()[k]) for k, v in before.items())

    cfg = load_offline_config(overrides={**SMALL, "epochs": 1})
    warm = train_offline(data, 32, cfg, init=init, progress=False)
    cold = train_offline(data, 32, cfg, progress=False)
    # Before any step the warm model already retrieves well; a fresh one is at chance.
    assert warm.history[0]["val_map"] > cold.history[0]["val_map"] + 0.1
    assert all(np.array_equal(v, init.tensors()[k]) for k, v in before.items()), "init must not be modified"
    # The scaler comes with the init; it is not refitted on the new data.
    assert torch.equal(warm.model.text.scale, init.text.scale)


def test_early_stopping_stops_and_keeps_the_best_weights(mirflickr, p1):
    data = TrainingSet.from_rows(mirflickr, p1.offline[:300])
    # lr 0: validation never improves on epoch 0, so training stops after `patience` epochs.
    cfg = load_offline_config(overrides={"hidden": [64], "epochs": 50, "lr": 0.0, "patience": 2, "eval_every": 1})
    result = train_offline(data, 16, cfg, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.epochs == 0
    assert result.val_map == result.history[0]["val_map"]


def test_without_a_hold_out_every_epoch_runs(mirflickr, p1):
    data = TrainingSet.from_rows(mirflickr, p1.offline[:300])
    cfg = load_offline_config(overrides={"hidden": [64], "epochs": 2, "val_share": 0.0})
    result = train_offline(data, 16, cfg, progress=False)
    assert result.epochs == 2 and np.isnan(result.val_map)


def test_checkpoint_round_trip_and_tamper_detection(mirflickr, p1, paired_result, tmp_path):
    cfg = load_offline_config(overrides=SMALL)
    rows = p1.offline[:1500]
    folder = save_offline_checkpoint(
        paired_result, tmp_path / "ckpt", cfg, TrainingSet.from_rows(mirflickr, rows), mirflickr, rows
    )
    model, manifest = load_offline_model(folder)
    x_img, x_txt = mirflickr.image[p1.query[:200]], mirflickr.text[p1.query[:200]]
    assert np.array_equal(model.encode(x_img, IMG), paired_result.model.encode(x_img, IMG))
    assert np.array_equal(model.encode(x_txt, TXT), paired_result.model.encode(x_txt, TXT))
    assert manifest["method"] == "offline" and manifest["version"] == 0
    assert manifest["dims"] == [1024, 1386] and manifest["bits"] == 32
    assert manifest["training"]["dataset_fingerprint"] == mirflickr.fingerprint()
    assert manifest["training"]["rows"] == 1500
    assert manifest["config"]["hidden"] == [256]

    body = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(StateError, match="checksum"):
        load_offline_model(folder)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="text_scaler"):
        load_offline_config(overrides={"text_scaler": "minmax"})
    with pytest.raises(ValueError, match="val_share"):
        load_offline_config(overrides={"val_share": 1.0})


def test_training_set_rejects_inconsistent_input(mirflickr):
    x, y = mirflickr.image[:10], mirflickr.labels[:10]
    t = mirflickr.text[:10]
    with pytest.raises(ValueError, match="outside"):
        TrainingSet(x, y, t, y, np.array([[0, 10]]))
    with pytest.raises(ValueError, match="more than one pair"):
        TrainingSet(x, y, t, y, np.array([[0, 1], [0, 2]]))
    with pytest.raises(ValueError, match="label columns"):
        TrainingSet(x, y, t, y[:, :5], None)


def test_train_command_writes_a_loadable_checkpoint(benchmark_path, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", "--data", str(benchmark_path), "--bits", "16", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--set", "hidden=[64]", "epochs=1"]) == 0
    model, manifest = load_offline_model(out)
    assert model.bits == 16 and manifest["train_on"] == "offline"
    assert 0.0 < manifest["query_map"]["i2t"] <= 1.0
    assert json.loads((out / "manifest.json").read_text())["sha256"] == manifest["sha256"]
    assert "I->T" in capsys.readouterr().out
