"""Configuration: defaults from config/<section>.yaml, then a user file, env vars and key=value overrides."""

from __future__ import annotations

import pytest

from fpocmh_core import config
from fpocmh_core.config import ConfigError
from fpocmh_core.protocols import P1Config, P2Config


def test_defaults_come_from_the_section_file():
    defaults = config.read_yaml(config.CONFIG_DIR / "p1.yaml")
    assert config.to_dict(config.load(P1Config, "p1")) == defaults
    p2 = config.load(P2Config, "p2")
    assert p2.new_labels == tuple(config.read_yaml(config.CONFIG_DIR / "p2.yaml")["new_labels"])


def test_a_user_file_overrides_only_the_keys_it_names(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("label_share: 0.25\nn_chunks: 4\n")
    cfg = config.load(P1Config, "p1", user)
    default = config.load(P1Config, "p1")
    assert (cfg.label_share, cfg.n_chunks) == (0.25, 4)
    assert (cfg.seed, cfg.offline_share, cfg.unimodal_share) == (
        default.seed,
        default.offline_share,
        default.unimodal_share,
    )


def test_env_var_overrides_the_user_file_and_overrides_win_over_both(tmp_path, monkeypatch):
    user = tmp_path / "mine.yaml"
    user.write_text("label_share: 0.25\n")
    monkeypatch.setenv("FPOCMH_P1__LABEL_SHARE", "0.5")
    assert config.load(P1Config, "p1").label_share == 0.5
    assert config.load(P1Config, "p1", user).label_share == 0.5
    assert config.load(P1Config, "p1", user, {"label_share": 0.75}).label_share == 0.75


def test_set_style_overrides_are_parsed_as_yaml():
    parsed = config.parse_overrides(["n_chunks=5", "label_share=0.1", "new_labels=[sky, sea]"])
    assert parsed == {"n_chunks": 5, "label_share": 0.1, "new_labels": ["sky", "sea"]}
    cfg = config.load(P2Config, "p2", overrides=config.parse_overrides(["new_labels=[sky, sea]", "increments=2"]))
    assert (cfg.new_labels, cfg.increments) == (("sky", "sea"), 2)


def test_an_exponent_without_a_dot_is_a_number_though_yaml_reads_a_string():
    assert config.parse_overrides(["label_share=1e-1"]) == {"label_share": "1e-1"}  # YAML 1.1
    assert config.load(P1Config, "p1", overrides=config.parse_overrides(["label_share=1e-1"])).label_share == 0.1


def test_an_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="override 'n_chunks': expected key=value"):
        config.parse_overrides(["n_chunks"])


def test_an_unknown_key_in_a_user_file_names_key_and_file(tmp_path):
    user = tmp_path / "typo.yaml"
    user.write_text("n_chunk: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'n_chunk'") as err:
        config.load(P1Config, "p1", user)
    assert str(user) in str(err.value)


def test_an_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="overrides: unknown key 'seeds'"):
        config.load(P1Config, "p1", overrides={"seeds": 1})


def test_a_missing_key_in_the_defaults_names_key_and_file(tmp_path, monkeypatch):
    (tmp_path / "p1.yaml").write_text("seed: 0\nn_query: 10\noffline_share: 0.3\nn_chunks: 2\nunimodal_share: 1.0\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['label_share'\] for P1Config") as err:
        config.load(P1Config, "p1")
    assert str(tmp_path / "p1.yaml") in str(err.value)


@pytest.mark.parametrize(("key", "value"), [("label_share", "half"), ("n_chunks", 2.5), ("n_chunks", True)])
def test_a_value_of_the_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"{key}: expected"):
        config.load(P1Config, "p1", overrides={key: value})


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as err:
        config.load(P1Config, "p1", tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(err.value)
