"""What a role gives the poll loop: how to decode a message and process a batch of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Message


@dataclass(frozen=True, slots=True)
class Decoded:
    msg: Message
    value: Any


class Handler(Protocol):
    """What a role plugs into :meth:`Runtime.run`."""

    def decode(self, msg: Message) -> Any:
        """The message's value, or raise :class:`schemas.SchemaError` (it goes to the dead-letter topic)."""

    def process(self, batch: list[Decoded]) -> None:
        """Handle a batch; produce outputs with :meth:`Runtime.produce`.

        All or nothing: a handler whose state changes must leave it as it was when it raises, because
        the batch is then processed again one message at a time (the one that raises is dead-lettered).
        """

    def idle(self) -> None:
        """Called before every poll, batch or not (model hot swaps, store updates, publishing)."""


class Pipelined(Handler, Protocol):
    """A handler whose batches the at-least-once loop overlaps: :meth:`prepare` runs while the broker
    acknowledges the previous batch's outputs, which are then committed before this batch produces."""

    def prepare(self, batch: list[Decoded]) -> Callable[[], None]:
        """The batch's work up to its first produce (nothing visible yet), and the call that produces
        its outputs. ``process(batch)`` is ``prepare(batch)()``."""
