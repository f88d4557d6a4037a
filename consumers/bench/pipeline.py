"""``fpocmh bench pipeline``: what the broker costs, measured against bounds taken in the same run.

1. Ingest: arrivals -> encoder process(es) -> codes topic, in items/s, next to (a) the encoder's
   in-process throughput on the same message bytes (decode, hash, encode the code record) and (b) the
   broker's raw produce -> consume throughput for messages of the same bytes.
2. Query latency for top-100 through Kafka (request topic -> query process -> reply topic) at growing
   store sizes (synthetic codes), against in-process faiss search on the same codes and the
   memory-bandwidth bound of one scan.
3. Ingest with two encoder processes over one.
4. Where the broker has transactions (not tansu): one-encoder ingest with ``delivery=exactly_once``, on
   the same stream (the other rounds run at least once).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from consumers.bench.workload import Counter, model_state, produce_all, publish, stream_messages, tagged

HELP = "pipeline benchmark: ingest vs encoder and broker bounds, query latency vs in-process search, 2 encoders"

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 180.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fpocmh.commands.pipeline_args import add_broker_argument, add_pipeline_arguments, add_secure_argument
    from fpocmh_core.bench.report import add_common_arguments

    add_common_arguments(parser)
    add_pipeline_arguments(parser)
    add_broker_argument(parser)
    add_secure_argument(parser)
    parser.add_argument("--items", type=int, default=100_000, help="arrivals per ingest measurement")
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="stored codes for the query latency sweep"
    )
    parser.add_argument("--probes", type=int, default=300, help="sequential queries per store size and round")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of every measurement; the best round is reported (the machine is shared), all go to --json",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_pipeline"), help="logs of the roles")


# ------------------------------------------------------------------------------------------- ingest


def encoder_in_process(
    cfg: Any, state: Any, messages: list[tuple[bytes, bytes, list]], repeats: int
) -> dict[str, list[float]]:
    """The encoder's work without the broker, on the same bytes (decode, check, hash, encode the code
    records), and the hash network alone on the same items in the same batches, their features stacked
    beforehand: what decoding and encoding cost is the gap between the two. Measured with the heap
    frozen, as in a role process (undone afterwards: this process goes on)."""
    import gc

    import torch

    from consumers.lifecycle import freeze_startup_heap

    torch.set_num_threads(cfg.encoder.threads)
    freeze_startup_heap()
    try:
        return _encoder_rates(cfg, state, messages, repeats)
    finally:
        gc.unfreeze()


def _encoder_rates(
    cfg: Any, state: Any, messages: list[tuple[bytes, bytes, list]], repeats: int
) -> dict[str, list[float]]:
    from consumers.encoder.role import encode_records
    from fpocmh_core import schemas
    from fpocmh_core.learners.base import model_from_state
    from fpocmh_core.records import Modality
    from fpocmh_core.validation import ArrivalCheck

    model = model_from_state(state)
    model.eval()
    batch = cfg.encoder.batch_size
    check = ArrivalCheck(model.image.in_dim, model.text.in_dim)
    full = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(messages), batch):
            records = [check.check(schemas.decode_arrival(v, h)) for _k, v, h in messages[i : i + batch]]
            encode_records(model, records, 0)
        full.append(len(messages) / (time.perf_counter() - start))
    records = [schemas.decode_arrival(v, h) for _k, v, h in messages]
    stacked = [
        (np.stack(feats).astype(np.float32), modality)
        for i in range(0, len(records), batch)
        for modality in Modality
        if (feats := [f for r in records[i : i + batch] if (f := r.features(modality)) is not None])
    ]
    network = []
    for _ in range(repeats):
        start = time.perf_counter()
        for feats, modality in stacked:
            model.encode(feats, modality)
        network.append(len(records) / (time.perf_counter() - start))
    # The MLP alone on image items, for comparison with the design note (~30,000 items/s on one core).
    images = np.concatenate([f for f, m in stacked if m is Modality.IMAGE][:20])
    mlp = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            model.encode(images[i : i + batch], Modality.IMAGE)
        mlp.append(images.shape[0] / (time.perf_counter() - start))
    return {"encoder_items_per_s": full, "network_items_per_s": network, "mlp_image_items_per_s": mlp}


def broker_raw(cfg: Any, messages: list[tuple[bytes, bytes, list]], metrics: Any, repeats: int) -> list[float]:
    """Produce -> consume items/s for the same message bytes, no processing in between."""
    from consumers.kafka import ensure_topics

    cfg = tagged(cfg, "raw-" + uuid.uuid4().hex[:6])
    ensure_topics(cfg)
    counter = Counter(cfg, cfg.topics.arrivals)
    counter.start()
    rates = []
    try:
        for r in range(1, repeats + 1):
            start = produce_all(cfg, cfg.topics.arrivals, messages, metrics)
            rates.append(len(messages) / (counter.wait_for(r * len(messages), 300) - start))
    finally:
        counter.halt.set()
    return rates


def ingest(
    cfg: Any,
    state: Any,
    messages: list[tuple[bytes, bytes, list]],
    encoders: int,
    work: Path,
    metrics: Any,
    repeats: int,
) -> list[float | None]:
    """Arrivals -> ``encoders`` encoder processes -> codes topic, in items/s (one code per item here),
    for ``repeats`` bursts of the same messages (upserts of the same keys after the first). A burst
    whose codes don't all arrive within ``ROUND_TIMEOUT_S`` counts as None (and is logged)."""
    from consumers import settings
    from consumers.kafka import ensure_topics
    from consumers.processes import RoleProcess

    cfg = tagged(cfg, f"ingest{encoders}-" + uuid.uuid4().hex[:6])
    ensure_topics(cfg)
    publish(cfg, state, metrics)
    config_path = settings.dump(cfg, work / f"ingest{encoders}.yaml")
    roles = [
        RoleProcess("encode", config_path, work / f"ingest{encoders}-encoder{i}.log").start() for i in range(encoders)
    ]
    counter = Counter(cfg, cfg.topics.codes)
    counter.start()
    rates: list[float | None] = []
    try:
        # Warm-up: the model is loaded once these are coded. With several encoders, a second warm-up
        # after the group has had time to rebalance, so no timed burst pays for a rebalance.
        warm = messages[:4000]
        for _ in range(1 if encoders == 1 else 2):
            base = counter.count
            produce_all(cfg, cfg.topics.arrivals, warm, metrics)
            counter.wait_for(base + len(warm), 180)
            time.sleep(1.0 if encoders == 1 else cfg.session_timeout_ms / 1000 + 2)
        for _ in range(repeats):
            base = counter.count
            start = produce_all(cfg, cfg.topics.arrivals, messages, metrics)
            try:
                rates.append(len(messages) / (counter.wait_for(base + len(messages), ROUND_TIMEOUT_S) - start))
            except TimeoutError as exc:
                log.warning("ingest with %d encoder(s): a burst stalled: %s", encoders, exc)
                rates.append(None)
            time.sleep(1.0)
    finally:
        counter.halt.set()
        for role in roles:
            role.stop()
    return rates


# -------------------------------------------------------------------------------------------- query


def read_bandwidth_gb_s() -> float:
    """Single-thread memory read bandwidth: the best of a few reductions over 256 MiB."""
    data = np.ones(2**25, dtype=np.uint64)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        np.bitwise_or.reduce(data)
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best / 1e9


def query_sweep(
    cfg: Any,
    state: Any,
    ds: Any,
    query_rows: np.ndarray,
    sizes: list[int],
    probes: int,
    work: Path,
    metrics: Any,
    repeats: int,
) -> list[dict[str, Any]]:
    """Query latency per store size, each size with topics and a query consumer of its own: on the
    embedded broker a topic slows down as its record batches accumulate, and each probe adds a request
    and a result batch, so sizes measured one after another on shared topics would measure the order."""
    import faiss

    bandwidth = read_bandwidth_gb_s()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    out = []
    for size in sizes:
        codes = rng.integers(0, 256, (size, cfg.bits // 8), dtype=np.uint8)
        row = query_latency(cfg, state, ds, query_rows, codes, probes, work, metrics, repeats)
        index = faiss.IndexBinaryFlat(cfg.bits)
        index.add(codes)
        medians = []
        for _ in range(repeats):
            local = []
            for q in codes[rng.integers(0, size, probes)]:
                start = time.perf_counter()
                index.search(q[None, :], 100)
                local.append(time.perf_counter() - start)
            medians.append(float(1e3 * np.median(local)))
        # Best round's median, as for every other measure here (the machine may be shared).
        row["inprocess_ms"] = min(medians)
        row["inprocess_rounds_ms"] = medians
        row["bound_ms"] = float(1e3 * codes.nbytes / (bandwidth * 1e9))
        row["bandwidth_gb_s"] = bandwidth
        out.append(row)
        log.info("query sweep: %s", row)
    return out


def query_latency(
    cfg: Any,
    state: Any,
    ds: Any,
    query_rows: np.ndarray,
    codes: np.ndarray,
    probes: int,
    work: Path,
    metrics: Any,
    repeats: int,
) -> dict[str, Any]:
    """A query consumer holding ``codes`` (as text codes), then ``repeats`` rounds of ``probes``
    sequential top-100 image queries through Kafka."""
    from consumers import settings
    from consumers.kafka import ensure_topics
    from consumers.processes import RoleProcess
    from consumers.query.role import Query, QueryClient
    from consumers.runtime import Runtime
    from fpocmh_core import schemas
    from fpocmh_core.records import Modality

    size = codes.shape[0]
    cfg = tagged(cfg, f"query{size}-" + uuid.uuid4().hex[:6])
    ensure_topics(cfg)
    publish(cfg, state, metrics)
    config_path = settings.dump(cfg, work / f"query{size}.yaml")
    role = RoleProcess("serve-queries", config_path, work / f"query{size}.log").start()
    # Few, large record batches: tansu's in-memory store slows down as a topic's batch count grows.
    # The codes stand in for an encoder's: written by the benchmark (the operator's login when secured).
    rt = Runtime(cfg, "bench", metrics, producer_props={"linger.ms": 100, "batch.size": cfg.message_max_bytes})
    try:
        with QueryClient(cfg) as client:
            fill_start = time.perf_counter()
            for i, code in enumerate(codes):
                msg = schemas.CodeMessage(i, Modality.TEXT, code, 0, (Modality.TEXT,))
                rt.produce(cfg.topics.codes, schemas.encode_code(msg), key=msg.key, headers=schemas.CODE_HEADERS)
            rt.flush()
            deadline = time.monotonic() + 600
            while True:
                role.check_alive()
                try:
                    if client.status(timeout_s=5).store_codes[1] >= size:
                        break
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"query store did not reach {size} codes")
                time.sleep(0.2)
            fill_s = time.perf_counter() - fill_start
            rounds, served = [], []
            for _ in range(repeats):
                times = []
                for i in range(probes):
                    start = time.perf_counter()
                    answer = client.search(Query(ds.image[query_rows[i % query_rows.size]], Modality.IMAGE, 100))
                    times.append(time.perf_counter() - start)
                    served.append(answer.search_seconds)
                ms = 1e3 * np.array(times)
                rounds.append((float(np.percentile(ms, 50)), float(np.percentile(ms, 99))))
    finally:
        role.stop()
    best = min(rounds, key=lambda r: r[1])
    return {
        "codes": size,
        "p50_ms": best[0],
        "p99_ms": best[1],
        "rounds_p50_p99_ms": rounds,
        # hashing + search inside the query process, median over all rounds
        "served_ms": float(1e3 * np.median(served)),
        # produce -> codes topic -> query store
        "fill_codes_per_s": float(size / fill_s),
    }


# ---------------------------------------------------------------------------------------------- run


def brokers_of(cfg: Any) -> int:
    """Brokers in the cluster's metadata: what the topics' replication is chosen from."""
    from confluent_kafka.admin import AdminClient

    from consumers.kafka import admin_config

    return len(AdminClient(admin_config(cfg)).list_topics(timeout=cfg.broker.connect_timeout_s).brokers)


def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from consumers.kafka import connect
    from consumers.metrics import Metrics
    from fpocmh.commands.pipeline_args import broker_kind, load_config
    from fpocmh_core import config
    from fpocmh_core.bench.report import format_table, write_json
    from fpocmh_core.data import load_dataset
    from fpocmh_core.protocols import P1Config, p1_split

    if len(args.bits) != 1:
        raise ValueError("bench pipeline measures one code length at a time")
    cfg = load_config(args, f"bits={args.bits[0]}")
    kind = broker_kind(args, cfg)
    broker_name = "external" if cfg.bootstrap_servers else kind
    ds = load_dataset(args.data)
    p1cfg = config.load(P1Config, "p1")
    split = p1_split(ds, p1cfg)
    metrics = Metrics(CollectorRegistry())
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    state = model_state(ds, cfg.bits)
    messages = stream_messages(ds, split, p1cfg, args.items)
    bytes_per_item = float(np.mean([len(v) + len(k) for k, v, _h in messages]))
    print(f"{len(messages)} arrivals, {bytes_per_item:.0f} bytes each on average (key + value)", flush=True)

    def best(rates: list[float | None]) -> float:
        done = [r for r in rates if r is not None]
        if not done:
            raise RuntimeError("every round of a measurement stalled; see the log")
        return max(done)

    def shown(rates: list[float | None]) -> str:
        rounds = ", ".join("stalled" if r is None else f"{r:,.0f}" for r in rates)
        return f"{best(rates):,.0f} items/s (rounds: {rounds})"

    repeats = args.repeats
    bound = encoder_in_process(cfg, state, messages, repeats)
    print(f"encoder in-process: {shown(bound['encoder_items_per_s'])}", flush=True)
    print(f"hash network alone, same items: {shown(bound['network_items_per_s'])}", flush=True)
    print(f"MLP alone, image items: {shown(bound['mlp_image_items_per_s'])}", flush=True)
    with connect(cfg, work, kind, brokers=args.brokers, secure=args.secure) as cfg:
        brokers = brokers_of(cfg)
        replication_factor = cfg.replication(brokers)[0]
        print(f"{brokers} broker(s), topics with {replication_factor} replica(s)", flush=True)
        broker = broker_raw(cfg, messages, metrics, repeats)
        print(f"broker raw produce -> consume: {shown(broker)}", flush=True)
        # At least once here on every broker; the transactional mode gets its own round below.
        least = dataclasses.replace(cfg, delivery="at_least_once")
        ones = ingest(least, state, messages, 1, work, metrics, repeats)
        print(f"ingest, 1 encoder: {shown(ones)}", flush=True)
        twos = ingest(least, state, messages, 2, work, metrics, repeats)
        print(f"ingest, 2 encoders: {shown(twos)}", flush=True)
        exactly_once = None
        # The encoder's transactional mode, where the broker honours transactions.
        if broker_name != "tansu":
            eos_cfg = dataclasses.replace(cfg, delivery="exactly_once")
            exactly_once = ingest(eos_cfg, state, messages, 1, work, metrics, repeats)
            print(f"ingest, 1 encoder, exactly once: {shown(exactly_once)}", flush=True)
        sizes = [int(s) for s in sorted(args.sizes)]
        query = query_sweep(cfg, state, ds, split.query, sizes, args.probes, work, metrics, repeats)

    one, two = best(ones), best(twos)
    encoder_best, broker_best = max(bound["encoder_items_per_s"]), max(broker)
    lower = min(encoder_best, broker_best)
    summary = {
        "broker": broker_name,
        "secure": args.secure,
        "brokers": brokers,
        "replication_factor": replication_factor,
        "bits": cfg.bits,
        "items": len(messages),
        "bytes_per_item": bytes_per_item,
        "repeats": repeats,
        "ingest_items_per_s": one,
        "encoder_items_per_s": encoder_best,
        "network_items_per_s": max(bound["network_items_per_s"]),
        "encoder_share_of_network": encoder_best / max(bound["network_items_per_s"]),
        "mlp_image_items_per_s": max(bound["mlp_image_items_per_s"]),
        "broker_items_per_s": broker_best,
        "ingest_share_of_lower_bound": one / lower,
        "two_encoder_items_per_s": two,
        "two_encoder_ratio": two / one,
        "ingest_items_per_s_exactly_once": None if exactly_once is None else best(exactly_once),
        "rounds": {
            "ingest_items_per_s": ones,
            "two_encoder_items_per_s": twos,
            "encoder_items_per_s": bound["encoder_items_per_s"],
            "network_items_per_s": bound["network_items_per_s"],
            "mlp_image_items_per_s": bound["mlp_image_items_per_s"],
            "broker_items_per_s": broker,
            "ingest_items_per_s_exactly_once": exactly_once,
        },
        "query": query,
    }
    print()
    print(
        format_table(
            [
                {"measure": "ingest via broker, 1 encoder", "items/s": one, "share of lower bound": one / lower},
                {"measure": "ingest via broker, 2 encoders", "items/s": two, "share of lower bound": two / lower},
                *(
                    [{"measure": "ingest via broker, 1 encoder, exactly once", "items/s": best(exactly_once)}]
                    if exactly_once
                    else []
                ),
                {"measure": "bound: encoder in-process", "items/s": encoder_best},
                {"measure": "hash network alone, same items", "items/s": max(bound["network_items_per_s"])},
                {"measure": f"bound: broker ({broker_name}) produce->consume", "items/s": broker_best},
            ],
            ["measure", "items/s", "share of lower bound"],
        )
    )
    print(f"two encoders / one: {two / one:.2f}   (best of {repeats} rounds each; every round in --json)")
    print()
    print(
        format_table(
            [{**r, "inprocess/bound": r["inprocess_ms"] / r["bound_ms"]} for r in query],
            ["codes", "p50_ms", "p99_ms", "inprocess_ms", "bound_ms", "inprocess/bound"],
        )
    )
    write_json(args.json, query, **summary)
    return 0
