"""The encoder role: arrivals in, one database code per (item, modality) out.

It codes each batch with the model version it holds, records that version in every code, and picks
up newer versions from the models topic between batches without stopping. Input offsets are committed
only after the codes are acknowledged (see :mod:`consumers.runtime`). More copies in the same group
share the arrivals' partitions.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from confluent_kafka import Message

from consumers.kafka import make_consumer
from consumers.metrics import Metrics
from consumers.models import ModelFollower, ModelVersion
from consumers.runtime import Decoded, Runtime
from consumers.settings import PipelineConfig
from fpocmh_core import schemas
from fpocmh_core.nets import HashModel
from fpocmh_core.records import ItemRecord, Modality

log = logging.getLogger(__name__)


def encode_records(model: HashModel, records: list[ItemRecord], version: int) -> list[schemas.CodeMessage]:
    """Codes for every modality each record carries: one forward pass per modality for the batch."""
    out: list[schemas.CodeMessage] = []
    for modality in Modality:
        rows = [r for r in records if (r.image if modality is Modality.IMAGE else r.text) is not None]
        if not rows:
            continue
        feats = np.stack([r.image if modality is Modality.IMAGE else r.text for r in rows])
        packed = model.encode(feats.astype(np.float32, copy=False), modality)
        out += [schemas.CodeMessage(r.item_id, modality, packed[i], version, _present(r)) for i, r in enumerate(rows)]
    return out


_BOTH = (Modality.IMAGE, Modality.TEXT)


def _present(record: ItemRecord) -> tuple[Modality, ...]:
    # ItemRecord.modalities, without iterating the enum for every item on the hot path.
    if record.image is None:
        return (Modality.TEXT,)
    return _BOTH if record.text is not None else (Modality.IMAGE,)


def check_dims(record: ItemRecord, dims: tuple[int, int]) -> None:
    """Feature lengths against the model's (image, text) input sizes; a mismatch is a shape error."""
    for modality, features, want in ((Modality.IMAGE, record.image, dims[0]), (Modality.TEXT, record.text, dims[1])):
        if features is not None and features.shape[0] != want:
            got = features.shape[0]
            raise schemas.SchemaError("shape", f"item {record.item_id}: {modality.short} has {got} dims, model {want}")


class Encoder:
    """The encoder's :class:`~consumers.runtime.Handler`."""

    def __init__(self, rt: Runtime, models: ModelFollower, first: ModelVersion) -> None:
        self.rt = rt
        self.models = models
        self.codes_topic = rt.cfg.topics.codes
        self._use(first)

    def _use(self, ready: ModelVersion) -> None:
        self.model = ready.model
        self.dims = (self.model.image.in_dim, self.model.text.in_dim)
        self.version = ready.version
        if self.model.bits != self.rt.cfg.bits:
            log.warning("model has %d bits, the pipeline config says %d", self.model.bits, self.rt.cfg.bits)

    def idle(self) -> None:
        ready = self.models.take()
        if ready is not None:
            self._use(ready)

    def decode(self, msg: Message) -> ItemRecord:
        record = schemas.decode_arrival(msg.value(), msg.headers())
        check_dims(record, self.dims)
        return record

    def process(self, batch: list[Decoded]) -> None:
        for code in encode_records(self.model, [d.value for d in batch], self.version):
            self.rt.produce(self.codes_topic, schemas.encode_code(code), key=code.key, headers=schemas.CODE_HEADERS)


def run_encoder(cfg: PipelineConfig, metrics: Metrics, stop: threading.Event | None = None) -> None:
    """Wait for a model on the models topic, then code arrivals until ``stop`` is set."""
    torch.set_num_threads(cfg.encoder.threads)
    rt = Runtime(cfg, "encoder", metrics, stop)
    models = ModelFollower(rt)
    try:
        first = models.wait_first(rt.stop)
        if first is None:
            return
        encoder = Encoder(rt, models, first)
        consumer = make_consumer(cfg, "encoder", cfg.encoder.group, cfg.encoder.fetch_wait_max_ms)
        consumer.subscribe([cfg.topics.arrivals])
        log.info("encoder: model version %d; consuming %s", first.version, cfg.topics.arrivals)
        rt.run(consumer, encoder, cfg.encoder.batch_size, cfg.encoder.poll_timeout_s, fill_batches=True)
    finally:
        models.close()
        rt.producer.flush(cfg.flush_timeout_s)
