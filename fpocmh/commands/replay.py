"""``fpocmh replay``: a benchmark protocol as an arrival stream at a set rate, optionally scored live."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker, role_setup

if TYPE_CHECKING:
    from fpocmh_core.data import CrossModalDataset
    from fpocmh_core.protocols import Stream
    from producers.replay import ChunkScore

HELP = "replay protocol P1, P2 or P3 as an arrival stream at a set rate; --score: live mAP per chunk"


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--protocol`` and the two arrival shares, for every command that replays a protocol."""
    parser.add_argument(
        "--protocol",
        default="p1",
        choices=["p1", "p2", "p3"],
        help="p1: partial-modal stream; p2: the seen items offline, then the new-label increments as paired, "
        "labelled arrivals; p3: new labels arriving late in a partial-modal stream (config/<protocol>.yaml; "
        "any key also from FPOCMH_<PROTOCOL>__<KEY>, e.g. FPOCMH_P3__NEW_CHUNKS=3)",
    )
    parser.add_argument(
        "--text-feature",
        metavar="KEY",
        help="the dataset's array to use as text (default: features.text, txt_feat; e.g. txt_minilm)",
    )
    parser.add_argument(
        "--image-feature", metavar="KEY", help="the dataset's array to use as image (default: features.image)"
    )
    parser.add_argument("--unimodal-share", type=float, help="p1/p3: share of pairs split into two unimodal items")
    parser.add_argument("--label-share", type=float, help="p1/p3: share of stream items that carry their labels")
    parser.add_argument(
        "--bad-share",
        type=float,
        help="fault drill: also send about this share of bad arrivals of every kind, which must all end in the "
        "dead-letter topic (default: replay.bad_share, 0)",
    )


def replay_sets(args: argparse.Namespace) -> list[str]:
    """``--rate``, ``--bad-share`` and the feature keys as config overrides."""
    flags = (
        ("replay.rate", args.rate),
        ("replay.bad_share", args.bad_share),
        ("features.image", args.image_feature),
        ("features.text", args.text_feature),
    )
    return [f"{key}={value}" for key, value in flags if value is not None]


def load_protocol(args: argparse.Namespace, ds: CrossModalDataset) -> Stream:
    """The protocol named by ``--protocol`` with the share flags, as a stream over ``ds``."""
    from fpocmh_core.protocols import load_stream

    shares = {
        key: value
        for key, value in (("unimodal_share", args.unimodal_share), ("label_share", args.label_share))
        if value is not None
    }
    if shares and args.protocol == "p2":
        flags = ", ".join("--" + key.replace("_", "-") for key in shares)
        raise ValueError(f"{flags}: p2 streams paired, labelled increments; the shares apply to p1 and p3")
    return load_stream(ds, args.protocol, shares)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    parser.add_argument("--data", help="dataset file or folder (default: $FPOCMH_DATA, ./data, ../shared/data)")
    add_protocol_arguments(parser)
    parser.add_argument("--rate", type=float, help="items per second, 0 = unthrottled (default: replay.rate)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline part (chunk -1)")
    parser.add_argument(
        "--score", action="store_true", help="after each chunk, send the query set as requests and print mAP@K"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def score_printer(k: int) -> Callable[[ChunkScore], None]:
    """``replay_stream``'s ``on_chunk``: each chunk's live mAP@k line, printed as soon as it is measured."""
    from producers.replay import format_score

    return lambda score: print(format_score(score, k), flush=True)


def run(args: argparse.Namespace) -> int:
    from consumers.query.role import QueryClient
    from fpocmh_core.data import load_dataset
    from producers.replay import replay_stream

    sets = ["replay.offline=false"] if args.no_offline else []
    cfg = load_config(args, *replay_sets(args), *sets)
    require_broker(cfg, "fpocmh replay")
    ds = load_dataset(args.data).with_features(cfg.features.image, cfg.features.text)
    stream = load_protocol(args, ds)
    metrics, stop = role_setup(cfg, cfg.replay.metrics_port)
    client = QueryClient(cfg, metrics=metrics, stop=stop) if args.score else None
    try:
        report, _scores = replay_stream(
            cfg, ds, stream, metrics, stop, client, not args.quiet, score_printer(cfg.replay.score_topk)
        )
    finally:
        if client is not None:
            client.close()
    print(("interrupted: " if stop.is_set() else "replayed ") + report.summary())
    return 130 if stop.is_set() else 0
