"""Versioned, checksummed model state: the one format for checkpoints on disk and updates on the wire.

The body is a safetensors file (raw little-endian tensors plus a JSON header), so nothing that crosses
the wire is ever unpickled. The checksum is the SHA-256 of that body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "fpocmh-state/1"


class StateError(ValueError):
    """A serialized state is corrupt, of another format, or does not match its checksum."""


@dataclass(frozen=True, eq=False)
class ModelState:
    """Everything needed to rebuild a learner or an encoder at one version.

    ``tensors`` holds arrays under dotted names (``model.image.body.0.weight``, ``bank.anchors.image``);
    ``meta`` is JSON-able (architecture, config, metrics).
    """

    method: str
    version: int
    parent_version: int | None
    tensors: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        header = {
            "format": FORMAT,
            "method": self.method,
            "version": self.version,
            "parent_version": self.parent_version,
            "meta": self.meta,
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        return st_save(tensors, metadata={"fpocmh": json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, checksum: str | None = None) -> ModelState:
        if checksum is not None and sha256(data) != checksum:
            raise StateError(f"checksum mismatch: expected {checksum}, got {sha256(data)}")
        try:
            tensors = st_load(data)
            header = json.loads(_safetensors_metadata(data)["fpocmh"])
        except Exception as exc:  # safetensors raises its own error types
            raise StateError(f"not a readable fpocmh state ({exc})") from exc
        if header.get("format") != FORMAT:
            raise StateError(f"unsupported state format {header.get('format')!r}; expected {FORMAT}")
        return cls(
            method=header["method"],
            version=int(header["version"]),
            parent_version=header["parent_version"],
            tensors=tensors,
            meta=header["meta"],
        )

    def detached(self) -> ModelState:
        """A copy sharing no array with whoever exported it: a learner's exported state may hold live arrays
        that ``learn`` keeps updating in place (e.g. anchor bank rows)."""
        tensors = {name: np.array(value, copy=True) for name, value in self.tensors.items()}
        return replace(self, tensors=tensors, meta=json.loads(json.dumps(self.meta)))

    def only(self, *prefixes: str) -> ModelState:
        """The same version with only the tensors under ``prefixes`` (meta kept whole)."""
        starts = tuple(p + "." for p in prefixes)
        return replace(self, tensors={k: v for k, v in self.tensors.items() if k.startswith(starts)})

    def subset(self, prefix: str) -> dict[str, np.ndarray]:
        """Tensors under ``prefix.`` with the prefix stripped."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def save_checkpoint(state: ModelState, directory: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``state.safetensors`` and ``manifest.json`` (version, checksum and ``manifest`` extras)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = state.to_bytes()
    tmp = directory / "state.safetensors.tmp"
    tmp.write_bytes(body)
    tmp.replace(directory / "state.safetensors")
    doc = {
        "format": FORMAT,
        "method": state.method,
        "version": state.version,
        "parent_version": state.parent_version,
        "sha256": sha256(body),
        **(manifest or {}),
    }
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    tmp.replace(directory / "manifest.json")
    return directory


def load_checkpoint(directory: str | Path) -> tuple[ModelState, dict[str, Any]]:
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise StateError(f"{directory}: no manifest.json; not a checkpoint folder")
    manifest = json.loads(manifest_path.read_text())
    state = ModelState.from_bytes((directory / "state.safetensors").read_bytes(), checksum=manifest["sha256"])
    return state, manifest
