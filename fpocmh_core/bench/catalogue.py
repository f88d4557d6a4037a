"""The headline benchmarks: one entry per results file, with the command that makes it and how long it takes.

One place for each fact: ``fpocmh bench all`` runs these commands, ``fpocmh bench report`` turns the files they
write into ``docs/benchmarks.md``, and a test checks that every file in ``docs/results/`` is one of them. The
``--quick`` entries are smaller versions (one seed, fewer sizes) whose files live in ``quick/`` beside the full
ones, so a quick check never overwrites a full result. Minutes are measured on the reference machine (2 cores,
24 GB); ``bench all`` prints their sum before it starts.

One module: it is one table, read top to bottom; its length is its entries, one argument per line.
"""

from __future__ import annotations

from dataclasses import dataclass

SEEDS = ("--seeds", "0", "1", "2")
ONE_THREAD = ("--threads", "1", "--quiet")


@dataclass(frozen=True)
class Entry:
    """One results file: ``name`` (its path under the results folder, without ``.json``), the table's title,
    the renderer that reads it (:mod:`fpocmh_core.bench.tables`), the ``fpocmh`` arguments that write it
    (``--json`` is added), and the measured minutes that takes."""

    name: str
    title: str
    kind: str
    args: tuple[str, ...]
    minutes: float
    section: str

    @property
    def plots(self) -> bool:
        """Its benchmark draws mAP curves (``--plot``), shown under its table."""
        return self.kind in ("stream", "lifelong")

    @property
    def quick(self) -> bool:
        return self.name.startswith("quick/")


def _stream(*args: str) -> tuple[str, ...]:
    return ("bench", "stream", "--bits", "64", *args, *ONE_THREAD)


def _minilm(offline_share: str, *args: str) -> tuple[str, ...]:
    """P1 with the tags' sentence embeddings as text, all labels."""
    return _stream("--text-feature", "txt_minilm", "--offline-share", offline_share, "--label-share", "1.0", *args)


def _query_1e7(index: str) -> tuple[str, ...]:
    return (
        "bench",
        "query",
        "--broker",
        "kafka",
        "--sizes",
        "1e7",
        "--shards",
        "1",
        "--index",
        index,
        "--codes",
        "learned",
        "--quiet",
    )


P1 = "Stream, protocol P1 (partial-modal arrivals, 10 chunks)"
P3 = "Stream, protocol P3 (new categories in the last 5 chunks)"
OFFLINE = "Offline model"
LIFELONG = "Lifelong, protocol P2 (DLCH)"
PIPELINE = "Pipeline through a broker"
QUERY = "Query tier"
INDEX = "Search inside one shard"
RUNS = "The main job (`fpocmh run`)"
QUICK = "Quick check (`fpocmh bench all --quick`)"

FULL: tuple[Entry, ...] = (
    Entry(
        "offline_b16-128_seeds012",
        "Offline hashing on P1's offline part, per code length",
        "offline",
        ("bench", "offline", "--bits", "16", "32", "64", "128", *SEEDS, *ONE_THREAD),
        9,
        OFFLINE,
    ),
    Entry(
        "stream_p1_off030_label1_seeds012",
        "P1, offline share 0.3, label share 1.0",
        "stream",
        _stream(
            "--offline-share",
            "0.3",
            "--label-share",
            "1.0",
            *SEEDS,
            "--methods",
            "frozen",
            "naive",
            "retrain",
            "fpocmh",
            "--retrain-seeds",
            "0",
        ),
        17,
        P1,
    ),
    Entry(
        "stream_p1_off005_label1_seeds012",
        "P1, offline share 0.05, label share 1.0",
        "stream",
        _stream(
            "--offline-share",
            "0.05",
            "--label-share",
            "1.0",
            *SEEDS,
            "--methods",
            "frozen",
            "naive",
            "retrain",
            "fpocmh",
            "--retrain-seeds",
            "0",
        ),
        17,
        P1,
    ),
    Entry(
        "stream_p1_off030_label0_seeds012",
        "P1, offline share 0.3, no labels on the stream",
        "stream",
        _stream("--offline-share", "0.3", "--label-share", "0.0", *SEEDS, "--methods", "frozen", "fpocmh"),
        3,
        P1,
    ),
    Entry(
        "stream_p1_off005_label0_seeds012",
        "P1, offline share 0.05, no labels on the stream",
        "stream",
        _stream("--offline-share", "0.05", "--label-share", "0.0", *SEEDS, "--methods", "frozen", "fpocmh"),
        3,
        P1,
    ),
    Entry(
        "stream_p1_minilm_off030_label1_seed0",
        "P1 with sentence-embedding text (`txt_minilm`), offline share 0.3",
        "stream",
        _minilm(
            "0.3",
            "--seed",
            "0",
            "--methods",
            "frozen",
            "naive",
            "retrain",
            "fpocmh",
        ),
        12,
        P1,
    ),
    Entry(
        "stream_p1_minilm_off030_label1_seeds012",
        "P1 with sentence-embedding text (`txt_minilm`), offline share 0.3, three seeds",
        "stream",
        _minilm(
            "0.3",
            *SEEDS,
            "--methods",
            "frozen",
            "naive",
            "fpocmh",
        ),
        7,
        P1,
    ),
    Entry(
        "stream_p1_minilm_off030_label1_never_seeds012",
        "P1 with `txt_minilm` text, offline share 0.3, learner codes never held back",
        "stream",
        _minilm(
            "0.3",
            *SEEDS,
            "--methods",
            "frozen",
            "naive",
            "fpocmh",
            "--fpocmh-set",
            "code_rehearsal.self_check.hold_codes=never",
        ),
        7,
        P1,
    ),
    Entry(
        "stream_p1_minilm_off005_label1_hold_seeds012",
        "P1 with `txt_minilm` text, offline share 0.05, three seeds, learner codes always held back when ahead",
        "stream",
        _minilm(
            "0.05",
            *SEEDS,
            "--methods",
            "frozen",
            "naive",
            "retrain",
            "fpocmh",
            "--fpocmh-set",
            "code_rehearsal.self_check.hold_codes=always",
        ),
        60,
        P1,
    ),
    Entry(
        "stream_p1_minilm_off005_label1_seed0",
        "P1 with sentence-embedding text (`txt_minilm`), offline share 0.05",
        "stream",
        _minilm(
            "0.05",
            "--seed",
            "0",
            "--methods",
            "frozen",
            "naive",
            "retrain",
            "fpocmh",
        ),
        12,
        P1,
    ),
    Entry(
        "stream_p3_off030_seeds012",
        "P3, offline share 0.3, both learners",
        "stream",
        _stream("--protocol", "p3", *SEEDS, "--methods", "frozen", "naive", "fpocmh", "dlch"),
        19,
        P3,
    ),
    Entry(
        "stream_p3_off005_seeds012",
        "P3, offline share 0.05",
        "stream",
        _stream("--protocol", "p3", "--offline-share", "0.05", *SEEDS, "--methods", "frozen", "fpocmh"),
        3,
        P3,
    ),
    Entry(
        "stream_p3_off030_b128_seeds012",
        "P3, offline share 0.3, 128 bits",
        "stream",
        ("bench", "stream", "--protocol", "p3", "--bits", "128", *SEEDS, "--methods", "frozen", "fpocmh", *ONE_THREAD),
        3,
        P3,
    ),
    Entry(
        "stream_p3_off005_b128_seeds012",
        "P3, offline share 0.05, 128 bits",
        "stream",
        (
            "bench",
            "stream",
            "--protocol",
            "p3",
            "--offline-share",
            "0.05",
            "--bits",
            "128",
            *SEEDS,
            "--methods",
            "frozen",
            "fpocmh",
            *ONE_THREAD,
        ),
        3,
        P3,
    ),
    Entry(
        "lifelong_p2_b64_seeds012",
        "P2: DLCH against naive fine-tuning and the frozen model",
        "lifelong",
        ("bench", "lifelong", "--bits", "64", *SEEDS, "--methods", "dlch", "naive", "frozen", *ONE_THREAD),
        6,
        LIFELONG,
    ),
    Entry(
        "lifelong_p2_b64_retrain_seeds012",
        "P2: full retraining",
        "lifelong",
        ("bench", "lifelong", "--bits", "64", *SEEDS, "--methods", "retrain", *ONE_THREAD),
        12,
        LIFELONG,
    ),
    Entry(
        "pipeline_kafka",
        "Apache Kafka, one node",
        "pipeline",
        ("bench", "pipeline", "--broker", "kafka", "--quiet"),
        12,
        PIPELINE,
    ),
    Entry(
        "pipeline_tansu",
        "tansu (embedded)",
        "pipeline",
        ("bench", "pipeline", "--broker", "tansu", "--repeats", "2", "--quiet"),
        8,
        PIPELINE,
    ),
    Entry(
        "pipeline_kafka_brokers1",
        "Apache Kafka, one node (the pair with three)",
        "pipeline",
        (
            "bench",
            "pipeline",
            "--broker",
            "kafka",
            "--brokers",
            "1",
            "--sizes",
            "1e4",
            "1e5",
            "--probes",
            "100",
            "--repeats",
            "3",
            "--quiet",
        ),
        10,
        PIPELINE,
    ),
    Entry(
        "pipeline_kafka_brokers3",
        "Apache Kafka, three nodes, replication factor 3",
        "pipeline",
        (
            "bench",
            "pipeline",
            "--broker",
            "kafka",
            "--brokers",
            "3",
            "--sizes",
            "1e4",
            "1e5",
            "--probes",
            "100",
            "--repeats",
            "3",
            "--quiet",
        ),
        12,
        PIPELINE,
    ),
    Entry(
        "pipeline_kafka_plaintext",
        "Apache Kafka, plaintext (the pair with secured)",
        "pipeline",
        (
            "bench",
            "pipeline",
            "--broker",
            "kafka",
            "--items",
            "20000",
            "--repeats",
            "2",
            "--sizes",
            "10000",
            "--probes",
            "50",
            "--quiet",
        ),
        4,
        PIPELINE,
    ),
    Entry(
        "pipeline_kafka_secure",
        "Apache Kafka, SASL/SCRAM over TLS with ACLs",
        "pipeline",
        (
            "bench",
            "pipeline",
            "--broker",
            "kafka",
            "--secure",
            "--items",
            "20000",
            "--repeats",
            "2",
            "--sizes",
            "10000",
            "--probes",
            "50",
            "--quiet",
        ),
        4,
        PIPELINE,
    ),
    Entry(
        "query_kafka",
        "Sharded query tier through Apache Kafka, flat scans",
        "query",
        ("bench", "query", "--broker", "kafka", "--quiet"),
        45,
        QUERY,
    ),
    Entry(
        "query_tansu", "Sharded query tier through tansu, flat scans", "query", ("bench", "query", "--quiet"), 30, QUERY
    ),
    Entry(
        "index_inprocess_1e6_random_learned",
        "Flat scan against multi-index hashing at 10^6 codes, random and learned-statistics codes",
        "index",
        (
            "bench",
            "index",
            "--source",
            "random",
            "learned",
            "--sizes",
            "1e6",
            "--k",
            "10",
            "100",
            "--index",
            "flat",
            "mih",
            "--probes",
            "100",
            "--quiet",
        ),
        1,
        INDEX,
    ),
    Entry(
        "index_inprocess_learned_1e7",
        "Flat scan against multi-index hashing at 10^7 learned-statistics codes",
        "index",
        (
            "bench",
            "index",
            "--source",
            "learned",
            "--sizes",
            "1e7",
            "--k",
            "100",
            "--index",
            "flat",
            "mih",
            "--probes",
            "1000",
            "--quiet",
        ),
        3,
        INDEX,
    ),
    Entry(
        "index_inprocess_learned_1e8",
        "Flat scan against multi-index hashing at 10^8 learned-statistics codes, one shard",
        "index",
        (
            "bench",
            "index",
            "--source",
            "learned",
            "--sizes",
            "1e8",
            "--index",
            "flat",
            "mih",
            "--probes",
            "100",
            "--quiet",
        ),
        6,
        INDEX,
    ),
    Entry(
        "query_kafka_learned_1e7_mih",
        "One multi-index shard at 10^7 learned-statistics codes through Apache Kafka",
        "query",
        _query_1e7("mih"),
        15,
        INDEX,
    ),
    Entry(
        "query_kafka_learned_1e7_flat",
        "One flat-scan shard at 10^7 learned-statistics codes through Apache Kafka",
        "query",
        _query_1e7("flat"),
        15,
        INDEX,
    ),
    Entry("run_p1_clean", "P1 on tansu", "run", ("run", "--quiet"), 2, RUNS),
    Entry(
        "run_p1_bad_share_001",
        "P1 on tansu, 1% bad arrivals (the fault drill)",
        "run",
        ("run", "--bad-share", "0.01", "--quiet"),
        3,
        RUNS,
    ),
    Entry("run_p1_kafka_plaintext", "P1 on Apache Kafka", "run", ("run", "--broker", "kafka", "--quiet"), 2, RUNS),
    Entry(
        "run_p1_kafka_secure",
        "P1 on Apache Kafka, secured",
        "run",
        ("run", "--broker", "kafka", "--secure", "--quiet"),
        3,
        RUNS,
    ),
    Entry("run_p3_fpocmh", "P3 on tansu", "run", ("run", "--protocol", "p3", "--quiet"), 2, RUNS),
)

QUICK_ENTRIES: tuple[Entry, ...] = (
    Entry(
        "quick/offline_b64_seed0",
        "Offline hashing, 64 bits, seed 0",
        "offline",
        ("bench", "offline", "--bits", "64", "--seed", "0", *ONE_THREAD),
        1,
        QUICK,
    ),
    Entry(
        "quick/stream_p1_off005_label1_seed0",
        "P1, offline share 0.05, seed 0",
        "stream",
        _stream(
            "--offline-share", "0.05", "--label-share", "1.0", "--seed", "0", "--methods", "frozen", "naive", "fpocmh"
        ),
        2,
        QUICK,
    ),
    Entry(
        "quick/stream_p3_off030_seed0",
        "P3, offline share 0.3, seed 0, both learners",
        "stream",
        _stream("--protocol", "p3", "--seed", "0", "--methods", "frozen", "fpocmh", "dlch"),
        4,
        QUICK,
    ),
    Entry(
        "quick/pipeline_tansu_20k",
        "Pipeline through tansu, 20,000 arrivals",
        "pipeline",
        (
            "bench",
            "pipeline",
            "--broker",
            "tansu",
            "--items",
            "20000",
            "--repeats",
            "1",
            "--sizes",
            "10000",
            "--probes",
            "50",
            "--quiet",
        ),
        1,
        QUICK,
    ),
    Entry(
        "quick/query_tansu_1e5",
        "Query tier through tansu, 10^5 codes",
        "query",
        ("bench", "query", "--sizes", "1e5", "--shards", "1", "2", "--probes", "100", "--repeats", "1", "--quiet"),
        1,
        QUICK,
    ),
    Entry("quick/run_p1", "P1 on tansu (`fpocmh run`)", "run", ("run", "--quiet"), 1, QUICK),
)

ENTRIES: tuple[Entry, ...] = FULL + QUICK_ENTRIES
SECTIONS: tuple[str, ...] = (OFFLINE, P1, P3, LIFELONG, PIPELINE, QUERY, INDEX, RUNS, QUICK)


def by_name(name: str) -> Entry:
    for entry in ENTRIES:
        if entry.name == name:
            return entry
    raise KeyError(f"no benchmark named {name!r}; known: {', '.join(e.name for e in ENTRIES)}")
