"""``fpocmh query``: one retrieval round trip through the query role, printed as a ranked list."""

from __future__ import annotations

import argparse

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker

HELP = "send a retrieval request (a dataset row's features, or a .npy file) and print the ranked items"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--row", type=int, help="query with this dataset row's features (see --data)")
    source.add_argument("--features", metavar="FILE.npy", help="query features: one vector, or one per row")
    source.add_argument("--status", action="store_true", help="only show the serving copy's model and store size")
    parser.add_argument("--data", help="dataset for --row (default: $FPOCMH_DATA, ./data, ../shared/data)")
    parser.add_argument("--modality", default="img", help="modality of the query features: img or txt")
    parser.add_argument("--target", help="modality of the stored codes to rank (default: the other one)")
    parser.add_argument("-k", type=int, default=10, help="items to return")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from consumers.query import Query, QueryClient
    from fpocmh_core.records import Modality

    cfg = load_config(args)
    require_broker(cfg, "fpocmh query")
    modality = Modality.parse(args.modality)
    with QueryClient(cfg) as client:
        if args.status:
            status = client.status()
            print(
                f"model version {status.model_version}; store: {status.store_codes[0]} image, "
                f"{status.store_codes[1]} text codes"
            )
            return 0
        if args.features:
            features = np.load(args.features, allow_pickle=False)
        else:
            from fpocmh_core.data import load_dataset

            ds = load_dataset(args.data)
            features = (ds.image if modality is Modality.IMAGE else ds.text)[args.row]
        target = None if args.target is None else Modality.parse(args.target)
        result = client.search(Query(features, modality, args.k, target))
    ms = 1e3 * result.search_seconds
    print(f"model version {result.model_version}; store (img, txt) {result.store_codes}; search {ms:.2f} ms")
    for q, (ids, dists) in enumerate(zip(result.ids, result.distances, strict=True)):
        print(f"query {q}: " + "  ".join(f"{i}:{d}" for i, d in zip(ids.tolist(), dists.tolist(), strict=True)))
    return 0
