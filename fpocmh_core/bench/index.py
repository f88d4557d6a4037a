"""In-process benchmark of the Hamming indexes of one shard (no Kafka): build, memory, search, restart.

Code sources: ``random`` (uniform bits) and ``learned``: the 64-bit codes an FPO-CMH offline model (the
model the online learner starts from) writes for every image and text of the benchmark file,
replicated to the size asked with independent bit flips. A bit that is 1 in a share mu of the codes
flips 1 -> 0 with probability flip / (2 mu) and 0 -> 1 with flip / (2 (1 - mu)): on average ``flip`` of
the bits change and every bit keeps its mean, so the replicas keep the model's skew and clusters.

Every answer of every index is compared with the flat scan's top-k, ties by (distance, item id)
included (``exact``: equal on every probe); faiss's hash indexes are approximate and report recall@k.

    fpocmh bench index --source learned random --sizes 1e6 1e7 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from fpocmh_core.hamming import FlatIndex, MIHIndex
from fpocmh_core.hamming.common import sort_by_distance_then_id

HELP = "one shard's Hamming index in process: flat scan against multi-index hashing, random and learned codes"

KS = (10, 100, 1000)
CHUNK = 1 << 20
SOURCES = ("learned", "random")
INDEX_KINDS = ("flat", "mih", "mih-contiguous", "faiss-hash", "faiss-multihash")
PARAMS = ("source", "sizes", "k", "index", "bits", "probes", "flat_probes_1e8", "flip", "catchup", "batch", "seed")


# --- code sources ---------------------------------------------------------------------------------


def learned_model(bits: int = 64, seed: int = 0, ds: Any = None, offline: dict[str, Any] | None = None) -> Any:
    """The offline FPO-CMH model the online learner starts from: trained on the P1 protocol's offline part
    of ``ds`` (default: the benchmark file) with the default offline config and ``offline``'s overrides."""
    import dataclasses

    from fpocmh_core import config
    from fpocmh_core.data import load_dataset
    from fpocmh_core.offline import TrainingSet, load_offline_config, train_offline
    from fpocmh_core.protocols import P1Config, p1_split

    ds = load_dataset() if ds is None else ds
    split = p1_split(ds, config.load(P1Config, "p1"))
    trainer = dataclasses.replace(load_offline_config(), **(offline or {}))
    return train_offline(TrainingSet.from_rows(ds, split.offline), bits, trainer, seed=seed, progress=False).model


def model_codes(model: Any, ds: Any) -> np.ndarray:
    """Packed codes of every image and text of ``ds`` under ``model``."""
    from fpocmh_core.records import Modality

    return np.concatenate([model.encode(ds.image, Modality.IMAGE), model.encode(ds.text, Modality.TEXT)])


def learned_base_codes(
    bits: int = 64, cache: Path | None = None, seed: int = 0, ds: Any = None, offline: dict[str, Any] | None = None
) -> np.ndarray:
    """:func:`model_codes` of :func:`learned_model`; cached in ``cache`` when given."""
    if cache is not None and cache.is_file():
        return np.load(cache, allow_pickle=False)
    from fpocmh_core.data import load_dataset

    ds = load_dataset() if ds is None else ds
    codes = model_codes(learned_model(bits, seed, ds, offline), ds)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, codes, allow_pickle=False)
    return codes


def replicate(base: np.ndarray, n: int, flip: float, rng: np.random.Generator, progress: bool = False) -> np.ndarray:
    """``n`` codes, each a random row of ``base`` with bits flipped so that each bit keeps its mean."""
    mu = np.unpackbits(base, axis=1).mean(axis=0).clip(1e-3, 1 - 1e-3)
    p_one = np.minimum(1.0, flip / (2 * mu))  # chance a 1 becomes 0
    p_zero = np.minimum(1.0, flip / (2 * (1 - mu)))  # chance a 0 becomes 1
    out = np.empty((n, base.shape[1]), np.uint8)
    for start in tqdm(range(0, n, CHUNK), desc="replicate", disable=not progress, leave=False):
        rows = base[rng.integers(0, base.shape[0], min(CHUNK, n - start))]
        x = np.unpackbits(rows, axis=1).astype(bool)
        u = rng.random(x.shape, np.float32)
        x ^= np.where(x, u < p_one, u < p_zero)
        out[start : start + rows.shape[0]] = np.packbits(x, axis=1)
    return out


def random_codes(n: int, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)


# --- faiss's approximate hash indexes, behind a search(q, k) of the same shape ----------------------


class FaissBinary:
    """A faiss binary index over rows whose item id is the row (the benchmark's ids), for comparison."""

    def __init__(self, kind: str, bits: int, n: int) -> None:
        self.kind = kind
        self.bits = bits
        b = min(24, max(8, int(np.ceil(np.log2(max(n, 2)))) - 2))
        if kind == "faiss-hash":
            self.index = faiss.IndexBinaryHash(bits, b)
        elif kind == "faiss-multihash":
            self.index = faiss.IndexBinaryMultiHash(bits, max(1, bits // b), b)
        else:
            raise ValueError(kind)
        self.index.nflip = 2

    def add(self, codes: np.ndarray) -> None:
        self.index.add(codes)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = self.index.search(q, k)
        return sort_by_distance_then_id(d, i.astype(np.int64), k)

    @property
    def nbytes_held(self) -> int:
        return int(faiss.serialize_index_binary(self.index).nbytes)


# --- measurement ----------------------------------------------------------------------------------


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_searches(search: Callable, q: np.ndarray, k: int, progress: bool, label: str) -> dict[str, Any]:
    """One probe at a time, as a shard answers a request: latencies and the answers."""
    times = np.empty(q.shape[0])
    dist, ids = [], []
    for i in tqdm(range(q.shape[0]), desc=label, disable=not progress, leave=False):
        t0 = time.perf_counter()
        d, x = search(q[i : i + 1], k)
        times[i] = time.perf_counter() - t0
        dist.append(d[0])
        ids.append(x[0])
    return {"ms": times * 1e3, "dist": dist, "ids": ids}


def compare(run: dict[str, Any], truth: tuple[np.ndarray, np.ndarray], k: int) -> dict[str, Any]:
    td, ti = truth[0][:, :k], truth[1][:, :k]
    equal = [
        d.shape[0] == td.shape[1] and (d == td[j]).all() and (x == ti[j]).all()
        for j, (d, x) in enumerate(zip(run["dist"], run["ids"], strict=True))
    ]
    recall = [np.intersect1d(x, ti[j]).size / ti.shape[1] for j, x in enumerate(run["ids"])]
    return {"exact": bool(all(equal)), "probes_equal": int(sum(equal)), "recall_at_k": float(np.mean(recall))}


def latency(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def bench_one(
    kind: str,
    ids: np.ndarray,
    codes: np.ndarray,
    queries: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    n, bits = codes.shape[0], codes.shape[1] * 8
    res: dict[str, Any] = {"index": kind, "count": n}
    rss0 = rss_peak_bytes()
    t0 = time.perf_counter()
    if kind.startswith("faiss"):
        index: Any = FaissBinary(kind, bits, n)
        index.add(codes)
    elif kind == "flat":
        index = FlatIndex(bits)
        index.load(ids, codes.copy())
    else:
        index = MIHIndex(bits, assign="contiguous" if kind == "mih-contiguous" else "balanced")
        index.load(ids, codes)
    build_s = time.perf_counter() - t0
    res["build_s"] = build_s
    res["build_codes_per_s"] = n / build_s if build_s else None
    res["peak_rss_growth_bytes_per_code"] = max(0, rss_peak_bytes() - rss0) / n
    held = index.nbytes_held
    code_bytes = n * (8 + codes.shape[1])
    res["bytes_per_code_all"] = (held if not kind.startswith("faiss") else held + n * 8) / n
    res["bytes_per_code_index"] = (held - code_bytes) / n if not kind.startswith("faiss") else held / n
    if isinstance(index, MIHIndex):
        res["layout"] = index.stats()
    probes_n = queries.shape[0] if kind != "flat" or n < 5e7 else min(queries.shape[0], args.flat_probes_1e8)
    for k in args.k:
        run = timed_searches(index.search, queries[:probes_n], k, args.progress, f"{kind} n={n:.0e} k={k}")
        entry = latency(run["ms"]) | compare(run, (truth[0][:probes_n], truth[1][:probes_n]), k)
        if isinstance(index, MIHIndex):
            # The per-query statistics of the last probe only; rerun k's probes for their histogram.
            probes, cands = [], []
            for i in range(probes_n):
                index.search(queries[i : i + 1], k)
                probes.append(int(index.last_stats.probes[0]))
                cands.append(int(index.last_stats.candidates[0]))
            entry["probes"] = summary(np.array(probes))
            entry["candidates"] = summary(np.array(cands))
        res[f"k{k}"] = entry
    if kind in ("flat", "mih"):
        res.update(restart(index, workdir / kind, type(index)))
        if args.catchup:
            res.update(catch_up(index, codes, args, n))
    del index
    return res


def summary(x: np.ndarray) -> dict[str, float]:
    edges = [0, 1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
    hist = np.histogram(x, bins=edges + [max(edges[-1] + 1, int(x.max()) + 1)])[0]
    return {
        "mean": float(x.mean()),
        "p50": float(np.percentile(x, 50)),
        "p99": float(np.percentile(x, 99)),
        "histogram_le": {str(e): int(c) for e, c in zip(edges[1:] + ["inf"], hist, strict=True)},
    }


def restart(index: Any, path: Path, cls: type) -> dict[str, Any]:
    """Seconds to save, to restore the saved arrays (tables included) and to rebuild the tables from the
    ids and codes alone."""
    t0 = time.perf_counter()
    index.save(path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = cls.restore(path)
    restore_s = time.perf_counter() - t0
    ids, codes = restored.arrays()
    del restored
    t0 = time.perf_counter()
    rebuilt = cls(codes.shape[1] * 8)
    rebuilt.load(ids, codes)
    rebuild_s = time.perf_counter() - t0
    del rebuilt, ids, codes
    size = sum(f.stat().st_size for f in path.iterdir())
    shutil.rmtree(path, ignore_errors=True)
    return {"save_s": save_s, "restore_s": restore_s, "rebuild_s": rebuild_s, "snapshot_bytes": size}


def catch_up(index: Any, codes: np.ndarray, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Upserts in batches as a shard reads them: half replace known ids' codes, half are new ids."""
    total = int(min(args.catchup, n))
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    for start in range(0, total, args.batch):
        b = min(args.batch, total - start)
        ids = np.concatenate([rng.integers(0, n, b // 2), n + start + np.arange(b - b // 2)]).astype(np.int64)
        index.upsert(ids, codes[rng.integers(0, n, b)])
    seconds = time.perf_counter() - t0
    return {"catchup_codes": total, "catchup_codes_per_s": total / seconds}


def run_size(
    source: str, n: int, bits: int, base: np.ndarray | None, args: argparse.Namespace, workdir: Path
) -> list[dict]:
    rng = np.random.default_rng([args.seed, n])
    nbytes = bits // 8
    if source == "learned":
        assert base is not None
        codes = replicate(base, n, args.flip, rng, args.progress)
        queries = replicate(base, args.probes, args.flip, np.random.default_rng([args.seed, n, 1]))
    else:
        codes = random_codes(n, nbytes, rng)
        queries = random_codes(args.probes, nbytes, np.random.default_rng([args.seed, n, 1]))
    ids = np.arange(n, dtype=np.int64)
    # The flat scan's exact answer at the largest k; a prefix of it is the exact answer at a smaller k.
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    kmax = max(args.k)
    truth = sort_by_distance_then_id(*faiss.knn_hamming(queries, codes, kmax, "mc"), kmax)
    truth = (truth[0], truth[1].astype(np.int64))
    faiss.omp_set_num_threads(1)  # a shard answers each query on one thread
    truth_s = time.perf_counter() - t0
    out = []
    for kind in args.index:
        res = {"source": source, "size": n, "bits": bits, "truth_s": truth_s}
        res |= bench_one(kind, ids, codes, queries, truth, args, workdir)
        print(json.dumps(brief(res)), flush=True)
        out.append(res)
    return out


def brief(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("source", "size", "index", "build_codes_per_s", "bytes_per_code_all", "restore_s", "rebuild_s")
    b = {k: res[k] for k in keep if k in res}
    for k in KS:
        if f"k{k}" in res:
            e = res[f"k{k}"]
            b[f"k{k}"] = (round(e["p50_ms"], 3), round(e["p99_ms"], 3), e["exact"], round(e["recall_at_k"], 4))
    return b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fpocmh_core.bench.report import add_common_arguments

    add_common_arguments(parser)
    parser.add_argument("--source", nargs="+", choices=SOURCES, default=list(SOURCES), help="code sources to measure")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7], help="codes in the shard (1e8 fits)")
    parser.add_argument("--k", nargs="+", type=int, default=list(KS), help="top-k sizes to time")
    parser.add_argument("--index", nargs="+", default=["flat", "mih", "faiss-multihash"], choices=INDEX_KINDS)
    parser.add_argument("--probes", type=int, default=1000, help="query codes per size")
    parser.add_argument("--flat-probes-1e8", type=int, default=100, help="flat-scan probes at >= 5e7 codes")
    parser.add_argument("--flip", type=float, default=0.05, help="learned: mean share of bits flipped per replica")
    parser.add_argument("--catchup", type=float, default=1e6, help="codes upserted after the build (0: skip)")
    parser.add_argument("--batch", type=int, default=50_000, help="catch-up batch size")
    parser.add_argument("--codes-cache", type=Path, default=None, help="npy file caching the learned base codes")


def run(args: argparse.Namespace) -> int:
    from fpocmh_core.bench.report import dataset, write_json

    if any(b % 8 for b in args.bits):
        raise SystemExit(f"--bits {' '.join(map(str, args.bits))}: every code length must be a multiple of 8")
    args.progress = not args.quiet
    results = []
    bases = {}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        for bits in args.bits:
            base = None
            if "learned" in args.source:
                cache = args.codes_cache.with_suffix(f".b{bits}.npy") if args.codes_cache else None
                base = learned_base_codes(bits, cache, args.seed, dataset(args))
                bases[str(bits)] = int(base.shape[0])
            for size in args.sizes:
                for source in args.source:
                    results += run_size(source, int(size), bits, base, args, Path(tmp))
    params = {k: v for k, v in vars(args).items() if k in PARAMS}
    write_json(args.json, results, params=params, learned_base_codes=bases)
    return 0
