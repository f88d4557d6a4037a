"""Immutable configuration objects loaded from the YAML files in ``config/``.

The YAML files are the one place where defaults live: every dataclass here is built from its file,
then from a user file, then from ``FPOCMH_<SECTION>__<KEY>`` environment variables, then from
``key=value`` overrides. Unknown or missing keys are errors that name the file.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

CONFIG_DIR = Path(os.environ.get("FPOCMH_CONFIG_DIR", Path(__file__).resolve().parents[1] / "config"))


class ConfigError(ValueError):
    """A configuration file or override does not fit its schema."""


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a.b": 3, "c": [1, 2]}``; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {dotted!r} does not name a config section")
        node = child
    if leaf not in node:
        raise ConfigError(f"{where}: unknown key {dotted!r}; known: {', '.join(sorted(node))}")
    node[leaf] = value


def _env_overrides(section: str) -> dict[str, Any]:
    prefix = f"FPOCMH_{section.upper()}__"
    return {
        key[len(prefix) :].lower().replace("__", "."): yaml.safe_load(value)
        for key, value in os.environ.items()
        if key.startswith(prefix)
    }


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any], where: str) -> None:
    for key, value in extra.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and isinstance(value, Mapping) and base[key]:
            _deep_merge(base[key], value, where)
        else:
            base[key] = value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        return build(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(member, value, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(inner, v, where) for v in value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("1e-3") as strings; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    # bool is a subclass of int, but `true` is never a count
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build the frozen dataclass ``cls`` from a mapping, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    missing = sorted(set(names) - set(data))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {names}")
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing} for {cls.__name__}")
    return cls(**{n: _coerce(hints[n], data[n], f"{where}: {n}") for n in names})


def load(
    cls: type[T],
    section: str,
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Defaults from ``config/<section>.yaml``, then ``path``, env and ``overrides`` (dotted keys)."""
    default_path = CONFIG_DIR / f"{section}.yaml"
    data = read_yaml(default_path)
    if path is not None:
        _deep_merge(data, read_yaml(Path(path)), str(path))
    for source, extra in (("environment", _env_overrides(section)), ("overrides", overrides or {})):
        for key, value in extra.items():
            _set_dotted(data, key, value, source)
    return build(cls, data, str(path or default_path))


def to_dict(obj: Any) -> Any:
    """A JSON-able view of a config object (for manifests and reports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj
