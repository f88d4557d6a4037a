"""Snapshots of a query shard's store: each modality's index and the codes-topic offsets they reflect.

A snapshot is a folder ``snap-<time in ns>`` under the shard's own directory
(``<snapshot_dir>/<codes topic>/shard-<s>-of-<S>``) holding per modality the folder its index saves
(ids and codes sorted by id, and a multi-index's tables, so a restart rebuilds nothing) and ``meta.json``
(format, bits, topic, partitions, next offset per partition, model versions seen, and a CRC-32 and size
per file). A shard configured with another index kind than the snapshot's loads its codes and builds
its own index from them.
It is written into a temporary folder and renamed into place, so a crash leaves either the whole
snapshot or none. On start the shard loads the newest snapshot that checks out and replays only the
tail; a corrupt or foreign one (other bits, topic or partitions) is logged and skipped, never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consumers.query.store import CodeStore
from fpocmh_core.hamming import restore_index
from fpocmh_core.records import Modality

log = logging.getLogger(__name__)

FORMAT = "fpocmh.query-snapshot/2"
META = "meta.json"
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Snapshot:
    path: Path
    offsets: dict[int, int]  # next offset per owned codes partition
    model_versions: tuple[int, ...]
    created: float


def shard_dir(root: str | Path, topic: str, index: int, count: int) -> Path:
    return Path(root) / topic / f"shard-{index}-of-{count}"


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotDir:
    """The snapshots of one shard: write, list, load the newest valid one."""

    def __init__(self, path: str | Path, topic: str, partitions: list[int], bits: int, keep: int = 2) -> None:
        self.path = Path(path)
        self.topic = topic
        self.partitions = sorted(partitions)
        self.bits = bits
        self.keep = max(1, keep)

    def write(self, store: CodeStore, offsets: Mapping[int, int], model_versions: set[int]) -> Path:
        """Atomically write a snapshot of ``store`` reflecting ``offsets``; older ones beyond ``keep`` go."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        files = {}
        for m in Modality:
            store.modal[m].save(tmp / m.short)
            for file in sorted((tmp / m.short).iterdir()):
                _fsync(file)
                files[f"{m.short}/{file.name}"] = {"crc32": _crc(file), "size": file.stat().st_size}
            _fsync(tmp / m.short)
        meta = {
            "format": FORMAT,
            "bits": self.bits,
            "topic": self.topic,
            "partitions": self.partitions,
            "offsets": {str(p): int(offsets.get(p, 0)) for p in self.partitions},
            "model_versions": sorted(int(v) for v in model_versions),
            "counts": list(store.counts),
            "created": time.time(),
            "files": files,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync(tmp / META)
        # Named by time: after a reset topic the newest snapshot reflects smaller offsets than older ones.
        final = self.path / f"snap-{time.time_ns():020d}"
        tmp.rename(final)
        _fsync(self.path)
        for old in self.snapshots()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def snapshots(self) -> list[Path]:
        """Snapshot folders, newest first."""
        if not self.path.is_dir():
            return []
        return sorted((p for p in self.path.iterdir() if p.name.startswith("snap-")), reverse=True)

    def check(self, path: Path) -> dict:
        """The snapshot's metadata if it is whole and ours; raises ValueError saying why not."""
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable {META} ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        theirs = (meta.get("bits"), meta.get("topic"), meta.get("partitions"))
        if theirs != (self.bits, self.topic, self.partitions):
            raise ValueError(
                f"foreign: bits {theirs[0]}, topic {theirs[1]!r}, partitions {theirs[2]}; this shard has "
                f"{self.bits} bits, topic {self.topic!r}, partitions {self.partitions}"
            )
        for name, want in meta["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != want["size"] or _crc(file) != want["crc32"]:
                raise ValueError(f"{name} is missing or does not match its size and CRC-32")
        return meta

    def load_newest(self, store: CodeStore) -> Snapshot | None:
        """Fill ``store`` from the newest valid snapshot; None (store untouched) when there is none."""
        for path in self.snapshots():
            try:
                meta = self.check(path)
                for m in Modality:
                    saved = restore_index(path / m.short)
                    if saved.kind == store.index:
                        store.modal[m] = saved
                    else:
                        store.modal[m].load(*saved.arrays())
            except (ValueError, OSError, KeyError) as exc:
                log.warning("query: snapshot %s ignored: %s", path, exc)
                store.clear()
                continue
            offsets = {int(p): int(o) for p, o in meta["offsets"].items()}
            return Snapshot(path, offsets, tuple(meta["model_versions"]), float(meta["created"]))
        return None
