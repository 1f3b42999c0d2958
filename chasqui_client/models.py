"""Plain values the client returns: frozen dataclasses mirroring the proto messages.

They are built from proto messages here, so callers never handle protobuf objects.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, cast

from chasqui_proto import chasqui_pb2


class Kind(enum.StrEnum):
    """What a message belongs to; compares equal to the strings "queue" and "topic"."""

    QUEUE = "queue"
    TOPIC = "topic"

    def to_proto(self) -> chasqui_pb2.Kind.ValueType:
        return chasqui_pb2.QUEUE if self is Kind.QUEUE else chasqui_pb2.TOPIC

    @staticmethod
    def from_proto(kind: chasqui_pb2.Kind.ValueType) -> Kind:
        if kind == chasqui_pb2.QUEUE:
            return Kind.QUEUE
        if kind == chasqui_pb2.TOPIC:
            return Kind.TOPIC
        raise ValueError(f"delivery of unknown kind {int(kind)}")


class Overflow(enum.StrEnum):
    """What a queue at its `max_length` does with one more publish."""

    REJECT_PUBLISH = "reject_publish"
    DROP_HEAD = "drop_head"


class Start(enum.StrEnum):
    """Where a new topic subscription begins."""

    LATEST = "latest"
    EARLIEST = "earliest"
    OFFSET = "offset"


@dataclass(frozen=True)
class Receipt:
    """The outcome of one publish: `duplicate` marks the original receipt of a retried publish."""

    sequence: int
    duplicate: bool

    @staticmethod
    def from_proto(receipt: chasqui_pb2.Receipt) -> Receipt:
        return Receipt(sequence=receipt.sequence, duplicate=receipt.duplicate)


class ClosedOnExit:
    """`with resource:` calls its `close()` on leaving the block, however it is left."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class SyncOwner(Protocol):
    """The sync client, as `Message.process()` sees it."""

    def ack(self, messages: Message) -> None: ...

    def nack(self, message: Message, delay_s: float = 0) -> None: ...


class AsyncOwner(Protocol):
    """The asyncio client, as `Message.process()` sees it."""

    def ack(self, messages: Message) -> Awaitable[None]: ...

    def nack(self, message: Message, delay_s: float = 0) -> Awaitable[None]: ...


MessageOwner = SyncOwner | AsyncOwner


class DeliverySink(Protocol):
    """A streaming subscription, told when one of its deliveries was acked (`acked=True`) or
    given back so it can grant the broker more credit."""

    def settled(self, messages: Sequence[Message], *, acked: bool) -> None: ...


@dataclass(frozen=True)
class Message:
    """One delivery of one message; pass it back to `ack`, `nack` or `extend`, or handle it in
    `with message.process():` (`async with` for messages of the asyncio client)."""

    kind: Kind
    name: str
    sequence: int
    body: bytes
    delivery_count: int
    publish_time_ms: int
    producer_id: str
    lease_deadline_ms: int
    # The client that consumed it (for `process()`), and the stream it came from (for credit).
    # Not part of the value: two deliveries are equal whoever received them.
    _client: MessageOwner | None = field(default=None, compare=False, repr=False)
    _stream: DeliverySink | None = field(default=None, compare=False, repr=False)

    def process(self) -> Processing:
        """A context manager that acks this delivery on normal exit and nacks it (at once, no
        delay) when the block raises, then lets the exception through. A failed nack does not
        hide the block's exception: it is added to it as a note, and the lease still expires.
        """
        if self._client is None:
            raise RuntimeError("this message was not received by a client; ack it explicitly")
        return Processing(self, self._client)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (raises `UnicodeDecodeError` for other bodies)."""
        return self.body.decode("utf-8")

    @property
    def id(self) -> str:
        """Identifies the message (not the delivery) across redeliveries."""
        return f"{self.kind}:{self.name}:{self.sequence}"

    @staticmethod
    def from_proto(
        delivery: chasqui_pb2.Delivery,
        *,
        owner: MessageOwner | None = None,
        stream: DeliverySink | None = None,
    ) -> Message:
        return Message(
            kind=Kind.from_proto(delivery.kind),
            name=delivery.name,
            sequence=delivery.sequence,
            body=delivery.body,
            delivery_count=delivery.delivery_count,
            publish_time_ms=delivery.publish_time_ms,
            producer_id=delivery.producer_id,
            lease_deadline_ms=delivery.lease_deadline_ms,
            _client=owner,
            _stream=stream,
        )

    def to_ref(self) -> chasqui_pb2.DeliveryRef:
        return chasqui_pb2.DeliveryRef(**self.ref_fields())

    def ref_fields(self) -> dict[str, Any]:
        """The fields of this delivery's DeliveryRef (for adding one in place to a request)."""
        return {
            "kind": self.kind.to_proto(),
            "name": self.name,
            "sequence": self.sequence,
            "delivery_count": self.delivery_count,
        }


def settle_streams(messages: Iterable[Message], *, acked: bool) -> None:
    """Tells the streams the acked or nacked deliveries came from (each grants credit back)."""
    by_stream: dict[int, tuple[DeliverySink, list[Message]]] = {}
    for message in messages:
        if message._stream is not None:
            by_stream.setdefault(id(message._stream), (message._stream, []))[1].append(message)
    for stream, settled in by_stream.values():
        stream.settled(settled, acked=acked)


class Processing:
    """What `Message.process()` returns: `with` for the sync client, `async with` for asyncio."""

    def __init__(self, message: Message, owner: MessageOwner) -> None:
        self.message = message
        self._owner = owner
        self._is_async = inspect.iscoroutinefunction(owner.ack)

    def __enter__(self) -> Message:
        if self._is_async:
            raise TypeError("a message of the asyncio client needs `async with message.process()`")
        return self.message

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        owner = cast(SyncOwner, self._owner)
        if exc is None:
            owner.ack(self.message)
        elif isinstance(exc, Exception):
            try:
                owner.nack(self.message)
            except Exception as nack_error:
                exc.add_note(f"nack of {self.message.id} failed too: {nack_error}")

    async def __aenter__(self) -> Message:
        if not self._is_async:
            raise TypeError("a message of the sync client needs `with message.process()`")
        return self.message

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        owner = cast(AsyncOwner, self._owner)
        if exc is None:
            await owner.ack(self.message)
        elif isinstance(exc, Exception):
            try:
                await owner.nack(self.message)
            except Exception as nack_error:
                exc.add_note(f"nack of {self.message.id} failed too: {nack_error}")


@dataclass(frozen=True)
class TopicInfo:
    name: str
    owner: str
    subscribed: bool
    first_offset: int
    next_offset: int

    @staticmethod
    def from_proto(info: chasqui_pb2.TopicInfo) -> TopicInfo:
        return TopicInfo(
            name=info.name,
            owner=info.owner,
            subscribed=info.subscribed,
            first_offset=info.first_offset,
            next_offset=info.next_offset,
        )


@dataclass(frozen=True)
class QueueInfo:
    name: str
    owner: str
    subscribed: bool
    depth: int  # stored messages: ready, delayed or leased
    in_flight: int  # leased now

    @staticmethod
    def from_proto(info: chasqui_pb2.QueueInfo) -> QueueInfo:
        return QueueInfo(
            name=info.name,
            owner=info.owner,
            subscribed=info.subscribed,
            depth=info.depth,
            in_flight=info.in_flight,
        )


@dataclass(frozen=True)
class WhoAmI:
    user_id: str
    admin: bool


@dataclass(frozen=True)
class MemberStatus:
    node_id: str
    client_address: str
    raft_address: str
    connected: bool  # as seen from the answering node
    match_index: int  # leader only: highest entry known replicated there


@dataclass(frozen=True)
class ClusterStatus:
    """One node's view of the cluster (reads are local, so a follower's view may lag)."""

    node_id: str
    role: str  # "leader", "follower" or "candidate"
    term: int
    leader_id: str
    leader_address: str
    commit_index: int
    applied_index: int
    log_length: int
    members: tuple[MemberStatus, ...]
    has_quorum: bool

    @staticmethod
    def from_proto(status: chasqui_pb2.ClusterStatusResponse) -> ClusterStatus:
        return ClusterStatus(
            node_id=status.node_id,
            role=status.role,
            term=status.term,
            leader_id=status.leader_id,
            leader_address=status.leader_address,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            log_length=status.log_length,
            members=tuple(
                MemberStatus(
                    node_id=member.node_id,
                    client_address=member.client_address,
                    raft_address=member.raft_address,
                    connected=member.connected,
                    match_index=member.match_index,
                )
                for member in status.members
            ),
            has_quorum=status.has_quorum,
        )
