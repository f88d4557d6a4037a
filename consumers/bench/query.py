"""``fpocmh bench query``: the sharded query tier on random or learned-statistics codes, measured in one run.

Per store size (default 10^6 and 10^7 64-bit text codes): ``--codes random`` draws them uniformly;
``--codes learned`` publishes the offline FPO-CMH model (trained on P1's offline part) and stores its
codes of the benchmark file's images and texts, replicated to the size with bit flips that keep every
bit's mean (:func:`fpocmh_core.bench.index.replicate`), so the shards see the model's skew and clusters
and the image queries it hashes fall among them. ``--index`` picks the shards' index (``query.index``);
the bare processes of step 4 always scan.

1. Memory: resident-set growth while the shard's index takes the codes in batches of 20,000 (ids, codes,
   the id lookup and any tables, all included), per code.
2. The codes go to a codes topic of their own (round-robin over its partitions); one in-process
   shard reader (:class:`~consumers.query.code_log.CodeLog` + store, as the role runs them) reads them all:
   the catch-up rate, codes/s.
3. Snapshots: each shard layout's snapshots are written from the same codes, with the offsets the
   topic holds; restart time = loading the whole-store snapshot (CRC check included), and the time
   from starting a shard process to its first answer.
4. For 1, 2 and 4 shards: every layout's shard processes start from their snapshots and serve side by
   side (one layout after another on tansu, which seven idle shard processes saturate); then rounds of
   sequential top-100 image queries through Kafka, interleaved over the layouts (probe i goes to every
   layout in turn, in an order that rotates), so a stretch of host noise falls on every layout alike
   rather than on whichever one it happened to be running. Per layout: round trip p50/p99, and the
   slowest shard's in-process search time per query. Each probe then goes to the layout's bare
   scanning processes too (:mod:`consumers.bench.scan_floor`, no broker between): their p50/p99 are the
   floor this host sets at the same moments. The merged answers of the first queries are compared with
   one in-process store's.

One module: its steps share one run's topics, snapshots and shard processes, and read top to bottom as
the run goes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from consumers.bench.scan_floor import BareLayouts, interleaved, round_percentiles, shard_masks
from fpocmh_core.hamming import KINDS

HELP = "query tier benchmark: bytes/code, catch-up, snapshot restart, p50/p99 over 1/2/4 shards, exact merge"

log = logging.getLogger(__name__)

BATCH = 20_000
CHECKED_QUERIES = 20
PROBES = 1000
# tansu stops answering 4-shard requests after 700-1,400 probes in one run (`git show 088051d:README.md`, "Query tier").
TANSU_PROBES = 300
CODE_SOURCES = ("random", "learned")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fpocmh.commands.pipeline_args import add_broker_argument, add_pipeline_arguments
    from fpocmh_core.bench.report import add_common_arguments

    add_common_arguments(parser)
    add_pipeline_arguments(parser)
    add_broker_argument(parser)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7], help="stored codes per measurement")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="shard counts to compare")
    parser.add_argument(
        "--probes",
        type=int,
        default=None,
        help=f"top-100 queries per round, each sent to every layout in turn (default {PROBES}; {TANSU_PROBES} on "
        "tansu, which stops answering 4-shard requests after 700-1,400 in one run)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds per shard count; the best p99 is reported")
    parser.add_argument("--index", choices=KINDS, help="the shards' Hamming index (default: query.index)")
    parser.add_argument(
        "--codes",
        choices=CODE_SOURCES,
        default="random",
        help="stored codes: uniformly random, or the offline model's codes of the benchmark file replicated "
        "with bit flips (the model is published, so queries are hashed by it too)",
    )
    parser.add_argument("--flip", type=float, default=0.05, help="learned codes: mean share of bits flipped per copy")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_query"), help="snapshots and role logs")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def database(size: int, bits: int, seed: int, base: np.ndarray | None, flip: float) -> tuple[np.ndarray, np.ndarray]:
    """Item ids 0..size-1 and their codes: uniformly random, or copies of ``base`` with bits flipped."""
    from fpocmh_core.bench.index import replicate

    rng = np.random.default_rng(seed)
    ids = np.arange(size, dtype=np.int64)
    if base is None:
        return ids, rng.integers(0, 256, (size, bits // 8), dtype=np.uint8)
    return ids, replicate(base, size, flip, rng)


def bytes_per_code(ids: np.ndarray, codes: np.ndarray, index: str) -> float:
    """Resident growth per code while an index takes ``codes`` in batches (shuffled: ids arrive unordered)."""
    from fpocmh_core.hamming import make_index

    order = np.random.default_rng(1).permutation(ids.size)
    shuffled_ids, shuffled_codes = ids[order], codes[order]
    make_index(index, codes.shape[1] * 8)  # what the kind costs once per process (mih: its compiled search)
    gc.collect()
    before = rss_bytes()
    store = make_index(index, codes.shape[1] * 8)
    for i in range(0, ids.size, BATCH):
        store.upsert(shuffled_ids[i : i + BATCH], shuffled_codes[i : i + BATCH])
    store.compact()
    gc.collect()
    grown = rss_bytes() - before
    del store
    return grown / ids.size


def produce_codes(cfg: Any, ids: np.ndarray, codes: np.ndarray, metrics: Any) -> dict[int, int]:
    """Text code records round-robin over the codes partitions; the message count per partition."""
    from consumers.kafka import partitions_of
    from consumers.runtime import Runtime
    from fpocmh_core import schemas
    from fpocmh_core.records import Modality

    rt = Runtime(cfg, "replay", metrics, producer_props={"linger.ms": 100, "batch.size": cfg.message_max_bytes})
    partitions = partitions_of(rt.producer, cfg.topics.codes)
    text_only = schemas.modality_mask((Modality.TEXT,))
    for start in range(0, ids.size, 100_000):
        chunk = ids[start : start + 100_000]
        present = [text_only] * chunk.size
        bodies = schemas.encode_code_rows(chunk, Modality.TEXT, present, codes[start : start + chunk.size], 0)
        keys = schemas.code_keys(chunk.tolist(), Modality.TEXT)
        for j, (key, body) in enumerate(zip(keys, bodies, strict=True)):
            item = start + j
            rt.produce(
                cfg.topics.codes,
                body,
                key=key,
                headers=schemas.CODE_HEADERS,
                partition=partitions[item % len(partitions)],
            )
        rt.producer.poll(0)
    rt.flush()
    return {p: len(range(i, ids.size, len(partitions))) for i, p in enumerate(partitions)}


def catch_up(cfg: Any, partitions: list[int], expected: int, metrics: Any) -> float:
    """codes/s for one in-process reader + store taking every partition from the beginning."""
    from consumers.query.code_log import CodeLog
    from consumers.query.store import CodeStore
    from consumers.runtime import Runtime

    rt = Runtime(cfg, "query", metrics)
    reader = CodeLog(rt, cfg.topics.codes, partitions)
    store = CodeStore(cfg.bits, cfg.query.index)
    start = time.perf_counter()
    try:
        while sum(store.counts) < expected:
            store.upsert_rows(reader.poll(cfg.query.codes_batch_size, 1.0))
            if time.perf_counter() - start > 900:
                raise TimeoutError(f"catch-up read {sum(store.counts)} of {expected} codes in 900 s")
    finally:
        reader.close()
    return expected / (time.perf_counter() - start)


def write_snapshots(
    cfg: Any, ids: np.ndarray, codes: np.ndarray, ends: dict[int, int], shards: int
) -> tuple[float, float]:
    """Every shard's snapshot for ``shards`` shards; (seconds to write, seconds to load shard 0's)."""
    from consumers.query.shards import ShardSpec
    from consumers.query.snapshots import SnapshotDir, shard_dir
    from consumers.query.store import CodeStore
    from fpocmh_core.records import Modality

    partitions = sorted(ends)
    written = 0.0
    for s, mine in enumerate(shard_masks(ids, partitions, shards)):
        owned = ShardSpec(s, shards).owns(partitions)
        store = CodeStore(cfg.bits, cfg.query.index)
        store.modal[Modality.TEXT].load(ids[mine], codes[mine])
        snaps = SnapshotDir(
            shard_dir(cfg.query.snapshot_dir, cfg.topics.codes, s, shards), cfg.topics.codes, owned, cfg.bits
        )
        start = time.perf_counter()
        snaps.write(store, {p: ends[p] for p in owned}, {0})
        written += time.perf_counter() - start
        del store
    snaps = SnapshotDir(
        shard_dir(cfg.query.snapshot_dir, cfg.topics.codes, 0, shards),
        cfg.topics.codes,
        ShardSpec(0, shards).owns(partitions),
        cfg.bits,
    )
    gc.collect()
    start = time.perf_counter()
    if snaps.load_newest(CodeStore(cfg.bits, cfg.query.index)) is None:
        raise RuntimeError(f"the snapshot just written under {snaps.path} did not load")
    return written, time.perf_counter() - start


def fresh_request_topics(cfg: Any, tag: str) -> Any:
    """``cfg`` with queries and results topics of its own (created), the codes topic unchanged."""
    import dataclasses

    from consumers.kafka import ensure_topics

    topics = dataclasses.replace(
        cfg.topics, queries=f"{cfg.topics.queries}.{tag}", results=f"{cfg.topics.results}.{tag}"
    )
    cfg = dataclasses.replace(cfg, topics=topics)
    ensure_topics(cfg)
    return cfg


def serve(cfg: Any, shards: int, work: Path, size: int, stop: threading.Event) -> tuple[list[Any], float]:
    """``shards`` shard processes, started from their snapshots; (roles, seconds to the first full answer)."""
    from consumers import settings
    from consumers.processes import RoleProcess
    from consumers.query.client import QueryClient

    config_path = settings.dump(cfg, work / f"query{size}-{shards}.yaml")
    start = time.perf_counter()
    roles = [
        RoleProcess(
            "serve-queries", config_path, work / f"query{size}-s{s}of{shards}.log", "--shard", f"{s}/{shards}"
        ).start()
        for s in range(shards)
    ]
    with QueryClient(cfg, stop=stop) as client:
        deadline = time.monotonic() + 600
        while True:
            for role in roles:
                role.check_alive()
            try:
                status = client.status(timeout_s=2)
                if status.status == "ok" and status.store_codes[1] >= size:
                    return roles, time.perf_counter() - start
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shards} shard(s) did not serve {size} codes within 600 s")


def probe(
    layouts: dict[int, Any],
    queries: tuple[np.ndarray, np.ndarray],
    rounds: tuple[int, int],
    expected: tuple[np.ndarray, np.ndarray],
    bare: BareLayouts,
) -> dict[int, dict[str, Any]]:
    """Per shard count in ``layouts``: latencies of ``rounds`` = (probes, repeats) of interleaved
    queries (features, and their codes for ``bare``), each answered by the layout's shard roles and then
    by its bare processes."""
    from contextlib import ExitStack

    from consumers.query.client import Query, QueryClient
    from fpocmh_core.records import Modality

    q_features, q_codes = queries
    probes, repeats = rounds
    order = sorted(layouts)
    times = {n: [[] for _ in range(repeats)] for n in order}
    bare_times = {n: [[] for _ in range(repeats)] for n in order}
    searched: dict[int, list[float]] = {n: [] for n in order}
    hashed: dict[int, list[float]] = {n: [] for n in order}
    lost = dict.fromkeys(order, 0)
    with ExitStack() as stack:
        clients = {n: stack.enter_context(QueryClient(layouts[n])) for n in order}
        equal = {n: merged_equal(clients[n], q_features, expected) for n in order}
        for r in range(repeats):
            for i, n in interleaved(order, probes):
                query = Query(q_features[i % len(q_features)], Modality.IMAGE, 100)
                start = time.perf_counter()
                try:
                    answer = clients[n].search(query)
                except TimeoutError as exc:  # counted, and in the percentiles at the full timeout
                    log.warning("%d shard(s), probe %d: %s", n, i, exc)
                    lost[n] += 1
                else:
                    searched[n].append(answer.search_seconds)
                    hashed[n].append(answer.hash_seconds)
                times[n][r].append(time.perf_counter() - start)
                bare_times[n][r].append(bare.round_trip(n, q_codes[i % len(q_codes)]))
    measured = {}
    for n in order:
        per_round = round_percentiles(times[n])
        best = min(per_round, key=lambda r: r[1])
        bare_best = min(round_percentiles(bare_times[n]), key=lambda r: r[1])
        measured[n] = {
            "p50_ms": best[0],
            "p99_ms": best[1],
            "rounds_p50_p99_ms": per_round,
            # the same probes through bare scanning processes, no broker: the floor on this host
            "bare_p50_ms": bare_best[0],
            "bare_p99_ms": bare_best[1],
            # hashing + search in the slowest shard, median and p99 over all probes: the rest of a round
            # trip is the broker and the clients
            **percentile_ms("search", searched[n]),
            # of it, hashing the query and the index search alone
            **percentile_ms("hash", hashed[n]),
            **percentile_ms("index", np.subtract(searched[n], hashed[n])),
            "merge_equal": equal[n],
            # round trips without every shard's answer within query.client_timeout_s
            "answers_lost": lost[n],
        }
    return measured


def percentile_ms(name: str, seconds: Any) -> dict[str, float]:
    """``<name>_ms`` and ``<name>_p99_ms``: the median and p99 of ``seconds``, in ms."""
    p50, p99 = round_percentiles([seconds])[0]
    return {f"{name}_ms": p50, f"{name}_p99_ms": p99}


def merged_equal(client: Any, q_features: np.ndarray, expected: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether the tier's merged answers to the first queries equal one in-process store's, ties included."""
    from consumers.query.client import Query
    from fpocmh_core.records import Modality

    equal = True
    for i in range(CHECKED_QUERIES):
        answer = client.search(Query(q_features[i], Modality.IMAGE, 100))
        equal &= bool(
            np.array_equal(answer.ids[0], expected[1][i]) and np.array_equal(answer.distances[0], expected[0][i])
        )
    return equal


def serve_and_probe(
    sized: Any,
    counts: list[int],
    topic: tuple[np.ndarray, np.ndarray, dict[int, int]],
    work: Path,
    stop: threading.Event,
    queries: tuple[np.ndarray, np.ndarray],
    expected: tuple[np.ndarray, np.ndarray],
    rounds: tuple[int, int],
) -> dict[int, dict[str, Any]]:
    """Each shard count in ``counts`` started from its snapshots and serving at once (and as bare
    processes), then probed with the queries interleaved: per count, its start-up times and latencies."""
    ids, codes, ends = topic
    layouts, roles, started = {}, [], {}
    try:
        for shards in counts:
            write_s, load_s = write_snapshots(sized, ids, codes, ends, shards)
            # Request and answer topics per layout: a shard group must answer only its own layout's requests.
            layouts[shards] = fresh_request_topics(sized, f"layout{shards}")
            served, ready_s = serve(layouts[shards], shards, work, ids.size, stop)
            roles += served
            started[shards] = {"ready_s": ready_s, "snapshot_load_s": load_s, "snapshot_write_s": write_s}
        with BareLayouts(ids, codes, sorted(ends), counts) as bare:
            measured = probe(layouts, queries, rounds, expected, bare)
    finally:
        for role in roles:
            role.stop()
    return {n: {**started[n], **measured[n]} for n in counts}


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import faiss
    from confluent_kafka.admin import AdminClient
    from prometheus_client import CollectorRegistry

    from consumers.bench.workload import model_state, publish, state_of, tagged
    from consumers.kafka import admin_config, connect, ensure_topics, is_tansu
    from consumers.metrics import Metrics
    from consumers.query.store import CodeStore, return_freed_arrays_to_os
    from fpocmh.commands.pipeline_args import broker_kind, load_config
    from fpocmh_core.bench.report import format_table, write_json
    from fpocmh_core.data import load_dataset
    from fpocmh_core.learners.base import model_from_state
    from fpocmh_core.records import Modality

    if len(args.bits) != 1:
        raise ValueError("bench query measures one code length at a time")
    cfg = load_config(args, f"bits={args.bits[0]}", *([f"query.index={args.index}"] if args.index else []))
    kind = broker_kind(args, cfg)
    if max(args.shards) > cfg.partitions.codes:
        raise ValueError(f"{max(args.shards)} shards need partitions.codes >= {max(args.shards)}")
    faiss.omp_set_num_threads(1)
    return_freed_arrays_to_os()  # as the query role does
    ds = load_dataset(args.data)
    metrics = Metrics(CollectorRegistry())
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    base = None
    if args.codes == "learned":
        from fpocmh_core.bench.index import learned_model, model_codes

        print("training the offline model whose codes the shards will hold", flush=True)
        trained = learned_model(cfg.bits, args.seed, ds)
        state, base = state_of(trained), model_codes(trained, ds)
    else:
        state = model_state(ds, cfg.bits)
    model = model_from_state(state)
    stop = threading.Event()
    sizes = [int(s) for s in sorted(args.sizes)]
    summary: dict[str, Any] = {
        "broker": "external" if cfg.bootstrap_servers else kind,
        "bits": cfg.bits,
        "index": cfg.query.index,
        "codes": args.codes,
        "sizes": {},
    }
    rounds: list[dict[str, Any]] = []
    with connect(cfg, work, kind, args.brokers) as cfg:
        # Side by side where idle readers cost the broker little (long polls); tansu holds every empty
        # fetch for its 2 ms wait, and seven idle shard processes saturate it.
        tansu = is_tansu(cfg)
        probes = args.probes or (TANSU_PROBES if tansu else PROBES)
        summary["probes"] = probes
        q_features = ds.image[: max(probes, CHECKED_QUERIES)]
        q_codes = model.encode(q_features, Modality.IMAGE)
        for size in sizes:
            ids, codes = database(size, cfg.bits, args.seed, base, args.flip)
            per_code = bytes_per_code(ids, codes, cfg.query.index)
            print(f"{size:,} codes: {per_code:.1f} bytes per code resident (ids, codes, id lookup)", flush=True)
            tag = f"q{size}-" + uuid.uuid4().hex[:6]
            sized = tagged(cfg, tag)
            sized = dataclasses.replace(
                sized,
                query=dataclasses.replace(
                    sized.query, snapshot_dir=str(work / "snapshots"), snapshot_every_codes=10**12
                ),
            )
            ensure_topics(sized)
            publish(sized, state, metrics)
            start = time.perf_counter()
            ends = produce_codes(sized, ids, codes, metrics)
            produce_s = time.perf_counter() - start
            rate = catch_up(sized, sorted(ends), size, metrics)
            print(f"  produced in {produce_s:.0f} s; catch-up read {rate:,.0f} codes/s", flush=True)
            single = CodeStore(cfg.bits)
            single.modal[Modality.TEXT].load(ids, codes)
            expected = single.search(q_codes[:CHECKED_QUERIES], Modality.TEXT, 100)
            del single
            row: dict[str, Any] = {"bytes_per_code": per_code, "catchup_codes_per_s": rate, "produce_s": produce_s}
            counts = sorted(args.shards)
            waves = [[n] for n in counts] if tansu else [counts]
            measured: dict[int, dict[str, Any]] = {}
            for wave in waves:
                measured |= serve_and_probe(
                    sized, wave, (ids, codes, ends), work, stop, (q_features, q_codes), expected, (probes, args.repeats)
                )
            if 1 in measured:
                row["snapshot_write_s"] = measured[1]["snapshot_write_s"]
                row["restart_seconds"] = measured[1]["snapshot_load_s"]
            for shards, m in measured.items():
                rounds.append({"codes": size, "shards": shards, "index": cfg.query.index, "source": args.codes, **m})
                print(
                    f"  {shards} shard(s): p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, "
                    f"search {m['search_ms']:.1f} ms (index {m['index_ms']:.1f}, hashing {m['hash_ms']:.1f}), "
                    f"bare scans p50 {m['bare_p50_ms']:.1f} / p99 "
                    f"{m['bare_p99_ms']:.1f} ms, ready {m['ready_s']:.1f} s after start, "
                    f"{m['answers_lost']} answers lost, merge equal {m['merge_equal']}",
                    flush=True,
                )
            summary["sizes"][str(size)] = row
            del ids, codes
            # The embedded broker keeps every message in memory: drop this size's codes before the next.
            admin = AdminClient(admin_config(sized))
            admin.delete_topics([sized.topics.codes])[sized.topics.codes].result(60)
    largest = summary["sizes"][str(sizes[-1])]
    one = {r["codes"]: r for r in rounds if r["shards"] == 1}
    two = {r["codes"]: r for r in rounds if r["shards"] == 2}
    summary.update(
        bytes_per_code=max(s["bytes_per_code"] for s in summary["sizes"].values()),
        catchup_codes_per_s=largest["catchup_codes_per_s"],
        restart_seconds=largest.get("restart_seconds"),
        merge_equal=all(r["merge_equal"] for r in rounds),
        p99_two_over_one={str(n): two[n]["p99_ms"] / one[n]["p99_ms"] for n in one if n in two},
        # the same ratio with bare scanning processes and no broker: the floor on this host
        bare_p99_two_over_one={str(n): two[n]["bare_p99_ms"] / one[n]["bare_p99_ms"] for n in one if n in two},
        rounds=rounds,
    )
    print()
    columns = [
        "codes",
        "shards",
        "index",
        "source",
        "p50_ms",
        "p99_ms",
        "search_ms",
        "search_p99_ms",
        "index_p99_ms",
        "hash_p99_ms",
        "bare_p50_ms",
        "bare_p99_ms",
        "ready_s",
        "answers_lost",
        "merge_equal",
    ]
    print(format_table(rounds, columns))
    print(
        f"bytes/code {summary['bytes_per_code']:.1f}; catch-up {summary['catchup_codes_per_s']:,.0f} codes/s; "
        f"restart from snapshot {summary['restart_seconds'] or float('nan'):.2f} s at {sizes[-1]:,} codes; "
        f"p99 2 shards / 1: {summary['p99_two_over_one']}; with bare scans and no broker: "
        f"{summary['bare_p99_two_over_one']}"
    )
    write_json(args.json, rounds, **summary)
    return 0
