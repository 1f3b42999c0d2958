"""The asyncio Chasqui client: the sync client's methods as coroutines, on `grpc.aio`.

    from chasqui_client import aio
    async with aio.Client(["127.0.0.1:7101", "127.0.0.1:7102"]) as c:   # key=None: new user
        await c.create_queue("jobs", exist_ok=True)
        await c.publish_queue("jobs", b"payload")
        async for message in c.iter_queue("jobs"):
            async with message.process():        # acks on success, nacks on an exception
                ...

Same routing and retry rules as `chasqui_client.Client` (the decisions come from the shared
`chasqui_client.routing.CallPlan`, the requests and checks from `chasqui_client.calls`), same
typed exceptions, same budgets. With `key=None` the user is registered by `connect()`, which
`async with` and the first call run for you; `.key` is None until then.

One `Client` belongs to one event loop. `close()` ends calls in flight; iterators then stop
without an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType

import grpc
import grpc.aio

from chasqui_client import calls, errors, limits, routing
from chasqui_client.calls import ResponseT, ResultT
from chasqui_client.models import (
    ClusterStatus,
    Kind,
    Message,
    Overflow,
    QueueInfo,
    Receipt,
    Start,
    TopicInfo,
    WhoAmI,
)
from chasqui_proto import chasqui_pb2, chasqui_pb2_grpc

__all__ = ["Client"]


class _Endpoint:
    """One node address with its `grpc.aio` channel (see the sync client's `_Endpoint`)."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=routing.CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(
                address, credentials, options=routing.CHANNEL_OPTIONS
            )
        self.stub = chasqui_pb2_grpc.BrokerStub(self.channel)
        self._was_ready = False

    def _state(self) -> grpc.ChannelConnectivity:
        state: grpc.ChannelConnectivity = self.channel.get_state(try_to_connect=True)
        self._was_ready = self._was_ready or state is grpc.ChannelConnectivity.READY
        return state

    @property
    def connected(self) -> bool:
        return self._state() is grpc.ChannelConnectivity.READY

    async def wait_settled(self, timeout_s: float) -> bool:
        """True once the channel is READY, failing fast, or idle after use; False on timeout."""
        deadline = time.monotonic() + timeout_s
        state = self._state()
        while not (
            state in routing.SETTLED_STATES
            or (state is grpc.ChannelConnectivity.IDLE and self._was_ready)
        ):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            try:
                await asyncio.wait_for(self.channel.wait_for_state_change(state), remaining_s)
            except TimeoutError:
                return False
            state = self._state()
        return True

    async def close(self) -> None:
        await self.channel.close()


class Client:
    """A connection to a Chasqui cluster as one user, for asyncio; see `chasqui_client.Client`
    for the meaning of every argument and method."""

    def __init__(
        self,
        endpoints: Sequence[str],
        key: str | None = None,
        *,
        call_timeout_s: float = limits.CALL_TIMEOUT_S_DEFAULT,
        attempt_timeout_s: float | None = None,
        connect_timeout_s: float = limits.CONNECT_TIMEOUT_S_DEFAULT,
        backoff_initial_s: float = limits.BACKOFF_INITIAL_S,
        backoff_max_s: float = limits.BACKOFF_MAX_S,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timing = routing.Timing(
            call_timeout_s=call_timeout_s,
            attempt_timeout_s=call_timeout_s if attempt_timeout_s is None else attempt_timeout_s,
            connect_timeout_s=connect_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self._router = routing.Router(routing.check_endpoints(endpoints))
        self._credentials = credentials
        self._endpoints: dict[str, _Endpoint] = {}
        self._sequences = itertools.count(1)
        self._topic_offsets: dict[str, int] = {}  # topic -> offset after the last received
        self._connecting: asyncio.Lock | None = None
        self.producer_id = uuid.uuid4().hex
        self.key: str | None = key
        self.user_id: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Registers a new user when the client has no key yet (once); otherwise does nothing."""
        if self.key is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.key is None:
                created = await self._run(calls.create_user())
                self.key, self.user_id = created.key, created.user_id

    async def close(self) -> None:
        """Closes every channel: calls in flight fail, iterators end, later calls raise
        `RuntimeError`."""
        self._router.close()
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        await asyncio.gather(*(endpoint.close() for endpoint in endpoints))

    @property
    def closed(self) -> bool:
        return self._router.closed

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def endpoints(self) -> list[str]:
        return self._router.addresses

    @property
    def leader(self) -> str | None:
        return self._router.leader

    # ---- users and cluster -----------------------------------------------------------------

    async def whoami(self) -> WhoAmI:
        identity = await self._run(calls.whoami())
        self.user_id = identity.user_id
        return identity

    async def cluster_status(self) -> ClusterStatus:
        return await self._run(calls.cluster_status())

    # ---- topics and queues -----------------------------------------------------------------

    async def create_queue(
        self,
        name: str,
        exist_ok: bool = False,
        *,
        visibility_timeout_s: float | None = None,
        max_deliveries: int = 0,
        dead_letter_queue: str = "",
        max_length: int = 0,
        overflow: Overflow | str = Overflow.REJECT_PUBLISH,
        message_ttl_s: float | None = None,
    ) -> bool:
        return await self._run(
            calls.create_queue(
                name,
                exist_ok,
                visibility_timeout_s=visibility_timeout_s,
                max_deliveries=max_deliveries,
                dead_letter_queue=dead_letter_queue,
                max_length=max_length,
                overflow=overflow,
                message_ttl_s=message_ttl_s,
            )
        )

    async def create_topic(self, name: str, exist_ok: bool = False) -> bool:
        return await self._run(calls.create_topic(name, exist_ok))

    async def delete_queue(self, name: str) -> None:
        await self._run(calls.delete_queue(name))

    async def delete_topic(self, name: str) -> None:
        await self._run(calls.delete_topic(name))

    async def list_queues(self, owned_only: bool = False) -> list[QueueInfo]:
        return await self._run(calls.list_queues(owned_only))

    async def list_topics(self, owned_only: bool = False) -> list[TopicInfo]:
        return await self._run(calls.list_topics(owned_only))

    # ---- subscriptions ---------------------------------------------------------------------

    async def subscribe_topic(
        self, name: str, start: Start | str = Start.LATEST, offset: int = 0
    ) -> int:
        return await self._run(calls.subscribe_topic(name, start, offset))

    async def subscribe_queue(self, name: str) -> None:
        await self._run(calls.subscribe_queue(name))

    async def unsubscribe_topic(self, name: str) -> None:
        await self._run(calls.unsubscribe(Kind.TOPIC, name))

    async def unsubscribe_queue(self, name: str) -> None:
        await self._run(calls.unsubscribe(Kind.QUEUE, name))

    # ---- publishing ------------------------------------------------------------------------

    async def publish_queue(self, name: str, body: bytes | str, *, delay_s: float = 0) -> Receipt:
        return await self._publish(Kind.QUEUE, name, body, calls.delay_ms("delay", delay_s))

    async def publish_topic(self, name: str, body: bytes | str) -> Receipt:
        return await self._publish(Kind.TOPIC, name, body, 0)

    async def publish_many_queue(
        self, name: str, bodies: Iterable[bytes | str], *, delay_s: float = 0
    ) -> list[Receipt]:
        return await self._publish_many(Kind.QUEUE, name, bodies, calls.delay_ms("delay", delay_s))

    async def publish_many_topic(self, name: str, bodies: Iterable[bytes | str]) -> list[Receipt]:
        return await self._publish_many(Kind.TOPIC, name, bodies, 0)

    async def _publish(self, kind: Kind, name: str, body: bytes | str, delay_ms: int) -> Receipt:
        calls.check_name(kind.value, name)
        payload = calls.encode_body(body)
        sequence = next(self._sequences)
        return await self._run(
            calls.publish(kind, name, payload, delay_ms, self.producer_id, sequence)
        )

    async def _publish_many(
        self, kind: Kind, name: str, bodies: Iterable[bytes | str], delay_ms: int
    ) -> list[Receipt]:
        calls.check_name(kind.value, name)
        payloads = [calls.encode_body(body) for body in bodies]
        receipts: list[Receipt] = []
        for batch in calls.split_batches(payloads):
            sequences = [next(self._sequences) for _ in batch]
            call = calls.publish_batch(kind, name, batch, delay_ms, self.producer_id, sequences)
            batch_receipts = await self._run(call)
            receipts.extend(batch_receipts)
        return receipts

    # ---- consuming -------------------------------------------------------------------------

    async def consume_queue(
        self, name: str, timeout_s: float = 0, *, visibility_timeout_s: float | None = None
    ) -> Message | None:
        messages = await self.consume_many_queue(
            name, 1, timeout_s, visibility_timeout_s=visibility_timeout_s
        )
        return messages[0] if messages else None

    async def consume_topic(self, name: str, timeout_s: float = 0) -> Message | None:
        messages = await self.consume_many_topic(name, 1, timeout_s)
        return messages[0] if messages else None

    async def consume_many_queue(
        self,
        name: str,
        max_messages: int,
        timeout_s: float = 0,
        *,
        visibility_timeout_s: float | None = None,
    ) -> list[Message]:
        visibility_timeout_ms = calls.optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        return await self._run(
            calls.consume(Kind.QUEUE, name, max_messages, timeout_s, visibility_timeout_ms, self)
        )

    async def consume_many_topic(
        self, name: str, max_messages: int, timeout_s: float = 0
    ) -> list[Message]:
        """See `chasqui_client.Client.consume_many_topic` (it resumes at the next offset)."""
        next_offset = self._topic_offsets.get(name)
        messages = await self._run(
            calls.consume(Kind.TOPIC, name, max_messages, timeout_s, 0, self, next_offset)
        )
        if messages:
            self._topic_offsets[name] = messages[-1].sequence + 1
        return messages

    def iter_queue(
        self,
        name: str,
        *,
        batch: int = limits.ITER_BATCH_DEFAULT,
        wait_s: float = limits.ITER_WAIT_S_DEFAULT,
        visibility_timeout_s: float | None = None,
    ) -> AsyncIterator[Message]:
        """`async for` over the queue's messages forever; see `chasqui_client.Client.iter_queue`."""
        visibility_timeout_ms = calls.optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        calls.consume(Kind.QUEUE, name, batch, wait_s, visibility_timeout_ms, self)
        return self._iterate(Kind.QUEUE, name, batch, wait_s, visibility_timeout_ms)

    def iter_topic(
        self,
        name: str,
        *,
        batch: int = limits.ITER_BATCH_DEFAULT,
        wait_s: float = limits.ITER_WAIT_S_DEFAULT,
    ) -> AsyncIterator[Message]:
        """`async for` over the topic past this user's cursor; acks are cumulative."""
        calls.consume(Kind.TOPIC, name, batch, wait_s, 0, self)
        return self._iterate(Kind.TOPIC, name, batch, wait_s, 0)

    async def _iterate(
        self, kind: Kind, name: str, batch: int, wait_s: float, visibility_timeout_ms: int
    ) -> AsyncIterator[Message]:
        next_offset: int | None = None  # topics: the offset after the last one yielded
        while not self.closed:
            try:
                messages = await self._run(
                    calls.consume(
                        kind, name, batch, wait_s, visibility_timeout_ms, self, next_offset
                    )
                )
                if kind is Kind.TOPIC and messages and next_offset is not None:
                    if messages[0].sequence > next_offset:
                        # Offsets skipped by a lost reply: rewind rather than ack past them
                        # (see the sync client's `_rewound_after_gap`).
                        with contextlib.suppress(errors.FailedPrecondition):
                            await self.nack(messages[0])
                        continue
                    messages = [m for m in messages if m.sequence >= next_offset]
            except (errors.ChasquiError, RuntimeError):
                if self.closed:
                    return  # close() cut the long-poll short
                raise
            for message in messages:
                next_offset = message.sequence + 1
                yield message

    # ---- acknowledging ---------------------------------------------------------------------

    async def ack(self, messages: Message | Iterable[Message]) -> None:
        """Acks one delivery or many (split into calls of at most 1000). Idempotent."""
        for _, call in calls.acks(messages):
            await self._run(call)

    async def nack(self, message: Message, delay_s: float = 0) -> None:
        await self._run(calls.nack(message, delay_s))

    async def extend(self, message: Message, seconds: float) -> None:
        await self._run(calls.extend(message, seconds))

    # ---- routing ---------------------------------------------------------------------------

    def _endpoint(self, address: str) -> _Endpoint:
        self._router.check_open()
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = _Endpoint(address, self._credentials)
            self._endpoints[address] = endpoint
        return endpoint

    async def _run(self, call: calls.Call[ResponseT, ResultT]) -> ResultT:
        """The sync client's `_run` with awaits: `routing.CallPlan` decides every step."""
        metadata: tuple[tuple[str, str], ...] = ()
        if call.authenticated:
            await self.connect()
            metadata = (("authorization", f"Bearer {self.key}"),)
        plan = routing.CallPlan(call.rpc, self._router, self.timing, call.idempotent, call.wait_s)
        request = call.request
        while True:
            step = plan.next_step()
            if isinstance(step, routing.Pause):
                await asyncio.sleep(step.seconds)
                continue
            endpoint = self._endpoint(step.address)
            if isinstance(request, chasqui_pb2.ConsumeRequest):
                request.timeout_s = step.wait_s
            if not endpoint.connected and not await endpoint.wait_settled(step.connect_timeout_s):
                plan.on_unreachable(step.address)
                continue
            plan.on_sent()
            try:
                response = await getattr(endpoint.stub, call.rpc)(
                    request, timeout=step.send_timeout_s(), metadata=metadata
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self.closed and task is not None and not task.cancelling():
                    # close() cancelled the call, not the caller's task: report it as closed.
                    raise RuntimeError("client is closed") from None
                raise
            except grpc.RpcError as error:
                self._router.check_open()  # closed meanwhile: say so, not CANCELLED
                plan.on_failure(
                    step.address,
                    errors.status_code_of(error),
                    errors.details_of(error),
                    hint=routing.rpc_error_hint(error),
                    connected=endpoint.connected,
                )
                continue
            plan.succeeded(step.address)
            return call.result(response)
