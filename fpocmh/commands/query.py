"""``fpocmh query``: one retrieval round trip through the query tier, printed as a ranked list.

The query is a dataset row's image or text features, a bag of words over the dataset's tag
vocabulary (``--text "sunset beach clouds"``), or features from a .npy file. Answers print item ids
with their distance and, when the dataset has them, the item's tags and labels.
"""

from __future__ import annotations

import argparse
from typing import Any

from fpocmh.commands.pipeline_args import add_pipeline_arguments, load_config, require_broker

HELP = "send a retrieval request (dataset row, words, or a .npy file) and print the ranked items"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pipeline_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-row", type=int, metavar="ROW", help="query with this dataset row's image features")
    source.add_argument("--text-row", type=int, metavar="ROW", help="query with this dataset row's text features")
    source.add_argument("--text", metavar="WORDS", help='query with these tags, e.g. "sunset beach clouds"')
    source.add_argument("--features", metavar="FILE.npy", help="query features: one vector, or one per row")
    source.add_argument("--status", action="store_true", help="only show the model version and the store size")
    parser.add_argument(
        "--data", help="dataset of rows, words and tags (default: $FPOCMH_DATA, ./data, ../shared/data)"
    )
    parser.add_argument("--modality", default="img", help="modality of --features: img or txt")
    parser.add_argument("--target", help="modality of the stored codes to rank (default: the other one)")
    parser.add_argument("-k", type=int, default=10, help="items to return")
    parser.add_argument(
        "--consistency",
        choices=("eventual", "session", "strong"),
        default="eventual",
        help="eventual: what the stores hold now; session: at least the codes at --after; strong: at least "
        "the codes topic's end when the request is sent (exact on Apache Kafka, see docs/operations.md for tansu)",
    )
    parser.add_argument(
        "--after",
        metavar="P:OFFSET,...",
        default="",
        help="for --consistency session: codes partition:next offset pairs your writes reached",
    )
    parser.add_argument(
        "--partial", action="store_true", help="print what the other shards found when one is silent (default: error)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds to wait for the shards (default: query.client_timeout_s)"
    )


def parse_after(text: str) -> list[tuple[int, int]]:
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        partition, sep, offset = part.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ValueError(f"--after {part!r}: expected PARTITION:OFFSET, e.g. 0:1200")
        pairs.append((int(partition), int(offset)))
    return pairs


def tag_vocabulary(path: Any) -> tuple[list[str], list[str]]:
    """(vocabulary, each item's raw comma-joined tags) from a dataset .npz; empty lists if it has none."""
    import numpy as np

    from fpocmh_core.data import find_dataset

    found = find_dataset(path)
    if found.suffix != ".npz":
        return [], []
    with np.load(found, allow_pickle=False) as npz:
        vocab = [str(w) for w in npz["tag_vocab"]] if "tag_vocab" in npz.files else []
        tags = [str(t) for t in npz["tags_raw"]] if "tags_raw" in npz.files else []
    return vocab, tags


def words_to_features(words: str, vocab: list[str]) -> tuple[Any, list[str]]:
    """A binary bag of words over ``vocab`` and the words it does not know (never silently dropped)."""
    import numpy as np

    index = {w.lower(): i for i, w in enumerate(vocab)}
    features = np.zeros(len(vocab), np.float32)
    unknown = []
    for word in words.lower().replace(",", " ").split():
        if word in index:
            features[index[word]] = 1.0
        else:
            unknown.append(word)
    return features, unknown


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from consumers.query.client import Query, QueryClient, SessionOffsets
    from fpocmh_core.records import Modality

    cfg = load_config(args)
    require_broker(cfg, "fpocmh query")
    session = None
    if args.consistency == "session":
        session = SessionOffsets(cfg.topics.codes)
        for partition, offset in parse_after(args.after):
            session.record(partition, offset - 1)
        if not session.next:
            raise ValueError("--consistency session needs --after PARTITION:OFFSET,... (where your codes reached)")
    ds, vocab, tags = None, [], []
    if args.image_row is not None or args.text_row is not None or args.text is not None:
        from fpocmh_core.data import load_dataset

        ds = load_dataset(args.data).with_features(cfg.features.image, cfg.features.text)
        if args.text is not None and cfg.features.text != "txt_feat":
            raise ValueError(
                f"--text builds a bag of tags, but the text modality is {cfg.features.text!r}: "
                "query with --text-row N instead"
            )
        vocab, tags = tag_vocabulary(args.data)
    modality = Modality.parse(args.modality)
    if args.image_row is not None:
        modality, features = Modality.IMAGE, ds.image[args.image_row]
    elif args.text_row is not None:
        modality, features = Modality.TEXT, ds.text[args.text_row]
    elif args.text is not None:
        if len(vocab) != ds.text.shape[1]:
            raise ValueError(f"{ds.source}: no tag vocabulary for its {ds.text.shape[1]} text dims; use --features")
        features, unknown = words_to_features(args.text, vocab)
        if unknown:
            print(f"unknown words (not in the {len(vocab)}-tag vocabulary, left out): {', '.join(unknown)}")
        if not features.any():
            raise ValueError(f"none of the words {args.text!r} is in the tag vocabulary")
        modality = Modality.TEXT
    elif args.features:
        features = np.load(args.features, allow_pickle=False)
    missing = "partial" if args.partial else None
    with QueryClient(cfg, missing_shards=missing) as client:
        if args.status:
            status = client.status(args.timeout)
            print(
                f"model version {status.model_version}; store: {status.store_codes[0]} image, "
                f"{status.store_codes[1]} text codes over {status.shard_count} shard(s); offsets {dict(status.offsets)}"
            )
            return 0
        target = None if args.target is None else Modality.parse(args.target)
        result = client.search(Query(features, modality, args.k, target), args.timeout, args.consistency, session)
    ms = 1e3 * result.search_seconds
    print(
        f"model version {result.model_version}; store (img, txt) {result.store_codes} over {result.shard_count} "
        f"shard(s); search {ms:.2f} ms ({1e3 * result.hash_seconds:.2f} of them hashing); "
        f"reflects offsets {dict(result.offsets)}"
    )
    if result.status == "partial":
        print(f"PARTIAL answer: {result.error}")
    for q, (ids, dists) in enumerate(zip(result.ids, result.distances, strict=True)):
        print(f"query {q}:")
        for rank, (item, dist) in enumerate(zip(ids.tolist(), dists.tolist(), strict=True), 1):
            print(f"  {rank:3d}. item {item:<8d} distance {dist:<3d}{describe(ds, tags, item)}")
    return 0


def describe(ds: Any, tags: list[str], item: int) -> str:
    """The item's tags and labels when the dataset has them (item ids are dataset rows)."""
    if ds is None or not 0 <= item < len(ds):
        return ""
    parts = []
    if tags:
        parts.append(f"tags: {tags[item].replace(',', ' ') or '-'}")
    if ds.label_names:
        parts.append("labels: " + " ".join(n for n, on in zip(ds.label_names, ds.labels[item], strict=True) if on))
    return "  " + "; ".join(parts) if parts else ""
