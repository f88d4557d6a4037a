"""``fpocmh run``: the whole pipeline on a protocol (P1, P2 or P3), from an empty broker to a summary.

Brings up a local broker (``--broker tansu|kafka``) unless Kafka is configured, creates the topics,
trains (or reuses) version 0 on the protocol's offline part, starts the learner, one encoder and one
query consumer as child processes, replays the protocol (offline part first, then the chunks), scores
the query set against the live store after each chunk (for P2 and P3 also over the queries with and
without a new label), and ends with items/s, model versions, mAP with the stored codes and query latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from fpocmh.commands.pipeline_args import (
    add_broker_argument,
    add_pipeline_arguments,
    add_secure_argument,
    broker_kind,
    load_config,
)
from fpocmh.commands.replay import add_protocol_arguments, replay_sets

HELP = "run the whole pipeline on P1, P2 or P3 (a local broker unless Kafka is configured) and print a summary"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    add_broker_argument(parser)
    add_secure_argument(parser)
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    add_protocol_arguments(parser)
    parser.add_argument("--rate", type=float, help="arrivals per second (default: replay.rate)")
    parser.add_argument("--init", metavar="DIR", help="version 0 from this checkpoint folder (fpocmh train)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--query-shards",
        type=int,
        metavar="N",
        help="query shards to start, each owning codes partitions (default: query.shards)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="after the replay, keep the stack up until Ctrl-C and print `fpocmh query` commands that reach it",
    )


def version_zero(cfg: Any, ds: Any, stream: Any) -> Path:
    """A checkpoint of version 0, trained on the protocol's offline part once and reused by later runs."""
    from fpocmh_core.config import CONFIG_DIR, to_dict
    from fpocmh_core.state import save_checkpoint

    # The defaults bootstrap reads are part of the recipe: a changed default retrains version 0.
    defaults = [path for path in (CONFIG_DIR / f"{cfg.method}.yaml", CONFIG_DIR / "offline.yaml") if path.is_file()]
    recipe = {
        "probe_items": cfg.model_check.probe_items,
        "method": cfg.method,
        "bits": cfg.bits,
        "data": ds.fingerprint(),
        stream.name: to_dict(stream.config),
        "overrides": to_dict(cfg.learner.bootstrap_overrides),
        "defaults": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in defaults},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cfg.run.work_dir) / "v0" / f"{cfg.method}-{cfg.bits}-{key}"
    if (directory / "manifest.json").is_file():
        print(f"version 0: reusing {directory}", flush=True)
        return directory
    offline = stream.split.offline
    print(f"version 0: training {cfg.method} ({cfg.bits} bits) on {offline.size} offline pairs", flush=True)
    import torch

    from consumers.learner.role import train_version_zero

    # As many threads as the learner gets: on a shared machine, more threads than free cores is slower.
    torch.set_num_threads(cfg.learner.threads)
    start = time.monotonic()
    save_checkpoint(train_version_zero(cfg, ds, offline), directory, {"recipe": recipe})
    print(f"version 0: trained in {time.monotonic() - start:.0f} s, saved to {directory}", flush=True)
    return directory


def wait_until_serving(client: Any, roles: list[Any], stop: threading.Event, timeout_s: float = 300.0) -> Any:
    """Status probes until a query consumer answers (it joins only once its store is ready); None if
    stopped first."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        for role in roles:
            role.check_alive()
        try:
            return client.status(timeout_s=2.0)
        except TimeoutError:
            continue
        except InterruptedError:
            return None
    if stop.is_set():
        return None
    raise TimeoutError(f"no query consumer was serving after {timeout_s:.0f} s")


def probe_latency(client: Any, ds: Any, rows: Any, n: int, k: int = 100) -> dict[str, float]:
    """Round trips of ``n`` single queries sent one after another (alternating modality): ms p50/p99."""
    import numpy as np

    from consumers.query.client import Query
    from fpocmh_core.records import Modality

    times = []
    for i in range(n):
        modality = Modality(i % 2)
        feats = (ds.image if modality is Modality.IMAGE else ds.text)[rows[i % rows.size]]
        start = time.perf_counter()
        client.search(Query(feats, modality, k))
        times.append(time.perf_counter() - start)
    ms = 1e3 * np.array(times)
    return {"queries": n, "k": k, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def stored_codes_map(cfg: Any, ds: Any, query_rows: Any, query_new: Any, metrics: Any) -> dict[str, Any]:
    """mAP over the full ranking with the codes as stored on the codes topic, queries hashed by the
    newest model on the models topic (``_new`` / ``_old``: queries with / without a new label, when the
    protocol has new labels); plus how many stored codes each model version, and each source (the encoder
    on arrival, the learner after learning the view), wrote."""
    import collections

    from consumers.models import ModelFollower
    from consumers.query.store import CodeStore
    from consumers.runtime import Runtime
    from consumers.topic_reader import TopicReader
    from fpocmh_core import evaluation, schemas
    from fpocmh_core.records import Modality
    from producers.replay import query_groups

    # The operator's reading (role audit: the admin principal when secured), not the replay's, which may
    # only write arrivals.
    rt = Runtime(cfg, "audit", metrics)
    models = ModelFollower(rt)
    reader = TopicReader(rt, cfg.topics.codes, lambda m: schemas.decode_code(m.value(), m.headers()), 50)
    try:
        newest = models.wait_first(rt.stop, timeout_s=60)
        latest: dict[bytes, schemas.CodeMessage] = {}
        while not reader.caught_up():
            latest.update((d.value.key, d.value) for d in reader.poll(50000, 0.2))
    finally:
        reader.close()
        models.close()
    store = CodeStore(cfg.bits)
    store.upsert_messages(list(latest.values()))
    if newest is None:
        raise TimeoutError(f"no model version on {cfg.topics.models} within 60 s")
    scores = {}
    for direction, modality in (("i2t", Modality.IMAGE), ("t2i", Modality.TEXT)):
        feats = ds.image if modality is Modality.IMAGE else ds.text
        ids, packed = store.codes(modality.other)
        q, q_labels = newest.model.encode(feats[query_rows], modality), ds.labels[query_rows]
        for group, mask in query_groups(query_new).items():
            key = direction if group == "all" else f"{direction}_{group}"
            scores[key] = evaluation.mean_average_precision(q[mask], packed, q_labels[mask], ds.labels[ids])
    by_version = dict(sorted(collections.Counter(c.model_version for c in latest.values()).items()))
    by_source = dict(sorted(collections.Counter(c.source for c in latest.values()).items()))
    return {
        "model_version": newest.version,
        "codes": len(latest),
        "codes_by_version": by_version,
        "codes_by_source": by_source,
        **scores,
    }


def dead_letters_by_reason(cfg: Any, metrics: Any) -> dict[str, int]:
    """Every message on the dead-letter topic now, counted by its reason header."""
    import collections

    from consumers.runtime import Runtime
    from consumers.topic_reader import TopicReader
    from fpocmh_core import schemas

    def reason(msg: Any) -> str:
        return (schemas.header(msg.headers(), schemas.DLQ_REASON) or b"?").decode(errors="replace")

    reader = TopicReader(Runtime(cfg, "audit", metrics), cfg.topics.dead_letters, reason, 50)
    counts: collections.Counter[str] = collections.Counter()
    try:
        while not reader.caught_up():
            counts.update(d.value for d in reader.poll(10_000, 0.2))
    finally:
        reader.close()
    return dict(sorted(counts.items()))


def published_versions(checkpoint_dir: Path) -> int | None:
    pointer = checkpoint_dir / "LATEST"
    return int(pointer.read_text().strip().lstrip("v")) + 1 if pointer.is_file() else None


def metrics_line(cfg: Any) -> str:
    from consumers.metrics import metrics_addr

    ports = {
        "run": cfg.replay.metrics_port,
        "encoder": cfg.encoder.metrics_port,
        "learner": cfg.learner.metrics_port,
        "query": cfg.query.metrics_port,
    }
    served = [f"{name} http://{metrics_addr()}:{port}/metrics" for name, port in ports.items() if port]
    return "metrics: " + (", ".join(served) if served else "off (every metrics_port is 0)")


def serve_until_stopped(cfg: Any, config_path: Path, roles: list[Any], stop: threading.Event, data: str | None) -> None:
    """Keep the stack up for exploring it from another terminal until Ctrl-C (or a role dies)."""
    base = f"python -m fpocmh query --config {config_path} --bootstrap {cfg.bootstrap_servers}"
    if data:
        base += f" --data {data}"
    print(
        "\nserving until Ctrl-C; from another terminal:\n"
        f"  {base} --status\n"
        f'  {base} --text "sunset beach clouds" -k 10\n'
        f"  {base} --image-row 42 -k 10\n"
        f"  {base} --text-row 42 -k 10 --consistency strong\n",
        flush=True,
    )
    while not stop.wait(1.0):
        for role in roles:
            role.check_alive()


def run(args: argparse.Namespace) -> int:
    from consumers import settings
    from consumers.kafka import connect, ensure_topics
    from consumers.lifecycle import install_signal_handlers
    from consumers.metrics import Metrics
    from consumers.processes import RoleProcess
    from consumers.query.client import QueryClient
    from fpocmh.commands.replay import load_protocol, score_printer
    from fpocmh_core.data import load_dataset
    from producers.replay import expected_codes, replay_stream, schedule

    wall = time.monotonic()
    cfg = load_config(args, *replay_sets(args))
    kind = broker_kind(args, cfg)
    ds = load_dataset(args.data).with_features(cfg.features.image, cfg.features.text)
    stream = load_protocol(args, ds)
    split = stream.split
    v0 = Path(args.init) if args.init else version_zero(cfg, ds, stream)
    work = Path(cfg.run.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    stop = threading.Event()
    install_signal_handlers(stop)
    metrics = Metrics()
    metrics.serve(cfg.replay.metrics_port)

    with connect(cfg, work, kind, brokers=args.brokers, secure=args.secure) as cfg:
        # The run's learner starts from version 0 and keeps only its newest checkpoint (~30 MB each).
        learner = dataclasses.replace(
            cfg.learner, checkpoint_dir=str(work / "learner"), init=str(v0), keep_checkpoints=1
        )
        # The run's broker is new, so are its codes: snapshots of an earlier run's topic would not fit.
        query = dataclasses.replace(cfg.query, snapshot_dir=str(work / "query-snapshots"))
        cfg = dataclasses.replace(cfg, learner=learner, query=query)
        ensure_topics(cfg)
        config_path = settings.dump(cfg, work / "pipeline.yaml")
        shards = args.query_shards or cfg.query.shards
        if shards > cfg.partitions.codes:
            raise ValueError(f"--query-shards {shards}: at most partitions.codes = {cfg.partitions.codes}")
        roles = [RoleProcess(name, config_path, work / f"{name}.log").start() for name in ("learn", "encode")]
        roles += [
            RoleProcess(
                "serve-queries", config_path, work / f"query-{s}of{shards}.log", "--shard", f"{s}/{shards}"
            ).start()
            for s in range(shards)
        ]
        print(f"roles started (logs in {work}); bootstrap {cfg.bootstrap_servers}", flush=True)
        print(metrics_line(cfg), flush=True)
        client = None
        try:
            client = QueryClient(cfg, metrics=metrics, stop=stop)
            if wait_until_serving(client, roles, stop) is None:
                print("interrupted before the query consumer was serving")
                return 130
            report, scores = replay_stream(
                cfg, ds, stream, metrics, stop, client, not args.quiet, score_printer(cfg.replay.score_topk)
            )
            if stop.is_set():
                print("interrupted: " + report.summary())
                return 130
            latency = probe_latency(client, ds, split.query, cfg.run.latency_probes)
            stored = stored_codes_map(cfg, ds, split.query, split.query_new, metrics)
            stored["codes_expected"] = sum(expected_codes(schedule(ds, stream, cfg.replay.offline)))
            dead = dead_letters_by_reason(cfg, metrics)
            if args.serve:
                summarize(args, cfg, work, stream, report, scores, stored, latency, dead, None, wall)
                serve_until_stopped(cfg, config_path, roles, stop, args.data)
        except InterruptedError:
            print("interrupted")
            return 130
        finally:
            if client is not None:
                client.close()
            exits = {role.log_path.stem: role.stop() for role in roles}
    if args.serve:
        print(f"roles stopped; exit codes {exits}", flush=True)
    else:
        summarize(args, cfg, work, stream, report, scores, stored, latency, dead, exits, wall)
    return 0


def summarize(
    args: argparse.Namespace,
    cfg: Any,
    work: Path,
    stream: Any,
    report: Any,
    scores: list[Any],
    stored: dict[str, Any],
    latency: dict[str, float],
    dead: dict[str, int],
    exits: dict[str, int | None] | None,
    wall: float,
) -> None:
    """Print the run's summary and write it to the work folder (and --json); ``exits``: None while the
    roles still run (``--serve``)."""
    from producers.replay import SCORE_KEYS

    lags = [s.catchup_s for s in scores]
    last = scores[-1]
    from fpocmh_core.bench.report import provenance

    summary = {
        **provenance(),
        "protocol": stream.name,
        "arrivals": report.items,
        "replay_items_per_s": report.achieved,
        "rate_target": report.target,
        "worst_minute_rate_error": report.worst_window_error,
        # From a chunk's last arrival to the store holding all its codes (probed every 0.2 s).
        "store_lag_s": {"median": statistics.median(lags), "max": max(lags)},
        "model_versions_published": published_versions(work / "learner"),
        "live_map_at_k": {
            "k": cfg.replay.score_topk,
            **{key: getattr(last, key) for key in SCORE_KEYS if getattr(last, key) is not None},
        },
        "stored_codes": stored,
        "query_latency": latency,
        # The fault drill's bad arrivals by kind, dead letters by reason, and how the roles ended (0: clean).
        "faults": {"bad_sent": report.bad_sent, "dead_letters": dead, "role_exit_codes": exits},
        "wall_s": time.monotonic() - wall,
        "chunks": [dataclasses.asdict(s) for s in scores],
    }
    print_summary(summary, report.summary())
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


def print_summary(s: dict[str, Any], rate_line: str) -> None:
    stored, lat, live = s["stored_codes"], s["query_latency"], s["live_map_at_k"]
    lines = [
        "",
        f"summary ({s['protocol']})",
        f"  replay            {rate_line}",
        f"  store lag         every chunk's codes stored within {s['store_lag_s']['max']:.1f} s of its last arrival "
        f"(median {s['store_lag_s']['median']:.1f} s)",
        f"  model versions    {s['model_versions_published']} published; store codes by version "
        f"{stored['codes_by_version']}; by source {stored['codes_by_source']}",
        f"  mAP stored codes  I->T {stored['i2t']:.4f}  T->I {stored['t2i']:.4f}  (full ranking, "
        f"{stored['codes']} codes of {stored['codes_expected']} expected, "
        f"queries hashed by v{stored['model_version']})",
        f"  live mAP@{live['k']:<7} I->T {live['i2t']:.4f}  T->I {live['t2i']:.4f}  (answers through Kafka)",
        f"  query latency     p50 {lat['p50_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  (top-{lat['k']}, "
        f"{lat['queries']} round trips)",
        f"  dead letters      {s['faults']['dead_letters'] or 'none'}"
        + (f" (fault drill sent {s['faults']['bad_sent']})" if s["faults"]["bad_sent"] else ""),
        "  roles             "
        + (f"exit codes {s['faults']['role_exit_codes']}" if s["faults"]["role_exit_codes"] else "running"),
        f"  wall time         {s['wall_s']:.0f} s",
    ]
    if "i2t_new" in stored:
        lines[6:6] = [
            f"    new-label queries I->T {stored['i2t_new']:.4f}  T->I {stored['t2i_new']:.4f}",
            f"    other queries     I->T {stored['i2t_old']:.4f}  T->I {stored['t2i_old']:.4f}",
        ]
    print("\n".join(lines), flush=True)
