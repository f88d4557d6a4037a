"""``fpocmh run``: the whole pipeline on protocol P1, from an empty broker to a summary.

Brings up the embedded broker unless Kafka is configured, creates the topics, trains (or reuses)
version 0, starts the learner, one encoder and one query consumer as child processes, replays P1
(offline part first, then the chunks), scores the query set against the live store after each chunk,
and ends with items/s, model versions, mAP with the stored codes and query latency.
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

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config

HELP = "run the whole pipeline on P1 (embedded broker unless Kafka is configured) and print a summary"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--rate", type=float, help="arrivals per second (default: replay.rate)")
    parser.add_argument("--unimodal-share", type=float, help="share of stream pairs split into two unimodal items")
    parser.add_argument("--label-share", type=float, help="share of stream items that carry their labels")
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


def version_zero(cfg: Any, ds: Any, split: Any, p1cfg: Any) -> Path:
    """A checkpoint of version 0, trained on the P1 offline part once and reused by later runs."""
    from fpocmh_core.config import CONFIG_DIR, to_dict
    from fpocmh_core.learners.registry import learner_class
    from fpocmh_core.state import save_checkpoint

    # The defaults bootstrap reads are part of the recipe: a changed default retrains version 0.
    defaults = [path for path in (CONFIG_DIR / f"{cfg.method}.yaml", CONFIG_DIR / "offline.yaml") if path.is_file()]
    recipe = {
        "method": cfg.method,
        "bits": cfg.bits,
        "data": ds.fingerprint(),
        "p1": to_dict(p1cfg),
        "overrides": to_dict(cfg.learner.bootstrap_overrides),
        "defaults": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in defaults},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cfg.run.work_dir) / "v0" / f"{cfg.method}-{cfg.bits}-{key}"
    if (directory / "manifest.json").is_file():
        print(f"version 0: reusing {directory}", flush=True)
        return directory
    print(f"version 0: training {cfg.method} ({cfg.bits} bits) on {split.offline.size} offline pairs", flush=True)
    import torch

    # As many threads as the learner gets: on a shared machine, more threads than free cores is slower.
    torch.set_num_threads(cfg.learner.threads)
    start = time.monotonic()
    overrides = json.loads(json.dumps(to_dict(cfg.learner.bootstrap_overrides)))
    learner = learner_class(cfg.method).bootstrap(ds, split.offline, cfg.bits, overrides, progress=True)
    save_checkpoint(learner.export_state(), directory, {"recipe": recipe})
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

    from consumers.query_client import Query
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


def stored_codes_map(cfg: Any, ds: Any, query_rows: Any, metrics: Any) -> dict[str, Any]:
    """mAP over the full ranking with the codes as stored on the codes topic, queries hashed by the
    newest model on the models topic; plus how many stored codes each model version wrote."""
    import collections

    from consumers.models import ModelFollower
    from consumers.runtime import Runtime, TopicReader
    from consumers.store import CodeStore
    from fpocmh_core import evaluation, schemas
    from fpocmh_core.records import Modality

    rt = Runtime(cfg, "replay", metrics)
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
        q = newest.model.encode(feats[query_rows], modality)
        scores[direction] = evaluation.mean_average_precision(q, packed, ds.labels[query_rows], ds.labels[ids])
    by_version = collections.Counter(c.model_version for c in latest.values())
    by_version = dict(sorted(by_version.items()))
    return {"model_version": newest.version, "codes": len(latest), "codes_by_version": by_version, **scores}


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
    from consumers.metrics import Metrics
    from consumers.processes import RoleProcess
    from consumers.query_client import QueryClient
    from consumers.runtime import install_signal_handlers
    from fpocmh.commands.replay import p1_overrides, score_printer
    from fpocmh_core import config
    from fpocmh_core.data import load_dataset
    from fpocmh_core.protocols import P1Config, p1_split
    from producers.replay import replay_p1

    wall = time.monotonic()
    cfg = load_config(args, *([f"replay.rate={args.rate}"] if args.rate is not None else []))
    ds = load_dataset(args.data)
    p1cfg = config.load(P1Config, "p1", overrides=p1_overrides(args))
    split = p1_split(ds, p1cfg)
    v0 = Path(args.init) if args.init else version_zero(cfg, ds, split, p1cfg)
    work = Path(cfg.run.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    stop = threading.Event()
    install_signal_handlers(stop)
    metrics = Metrics()
    metrics.serve(cfg.replay.metrics_port)

    with connect(cfg, work) as cfg:
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
            report, scores = replay_p1(
                cfg, ds, split, p1cfg, metrics, stop, client, not args.quiet, score_printer(cfg.replay.score_topk)
            )
            if stop.is_set():
                print("interrupted: " + report.summary())
                return 130
            latency = probe_latency(client, ds, split.query, cfg.run.latency_probes)
            stored = stored_codes_map(cfg, ds, split.query, metrics)
            summarize(args, cfg, work, report, scores, stored, latency, wall)
            if args.serve:
                serve_until_stopped(cfg, config_path, roles, stop, args.data)
        except InterruptedError:
            print("interrupted")
            return 130
        finally:
            if client is not None:
                client.close()
            for role in roles:
                role.stop()
    return 0


def summarize(
    args: argparse.Namespace,
    cfg: Any,
    work: Path,
    report: Any,
    scores: list[Any],
    stored: Any,
    latency: Any,
    wall: float,
) -> None:
    """Print the run's summary and write it to the work folder (and --json)."""
    lags = [s.catchup_s for s in scores]
    summary = {
        "arrivals": report.items,
        "replay_items_per_s": report.achieved,
        "rate_target": report.target,
        "worst_minute_rate_error": report.worst_window_error,
        # From a chunk's last arrival to the store holding all its codes (probed every 0.2 s).
        "store_lag_s": {"median": statistics.median(lags), "max": max(lags)},
        "model_versions_published": published_versions(work / "learner"),
        "live_map_at_k": {"k": cfg.replay.score_topk, "i2t": scores[-1].i2t, "t2i": scores[-1].t2i},
        "stored_codes": stored,
        "query_latency": latency,
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
        "summary",
        f"  replay            {rate_line}",
        f"  store lag         every chunk's codes stored within {s['store_lag_s']['max']:.1f} s of its last arrival "
        f"(median {s['store_lag_s']['median']:.1f} s)",
        f"  model versions    {s['model_versions_published']} published; store codes by version "
        f"{stored['codes_by_version']}",
        f"  mAP stored codes  I->T {stored['i2t']:.4f}  T->I {stored['t2i']:.4f}  (full ranking, "
        f"{stored['codes']} codes, queries hashed by v{stored['model_version']})",
        f"  live mAP@{live['k']:<7} I->T {live['i2t']:.4f}  T->I {live['t2i']:.4f}  (answers through Kafka)",
        f"  query latency     p50 {lat['p50_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  (top-{lat['k']}, "
        f"{lat['queries']} round trips)",
        f"  wall time         {s['wall_s']:.0f} s",
    ]
    print("\n".join(lines), flush=True)
