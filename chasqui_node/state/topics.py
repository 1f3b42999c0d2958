"""Topics: logs with retention, read through one durable cursor per subscriber. Consume hands
the next messages past the cursor out as a window leased for a visibility timeout; ack moves
the cursor (cumulative); nack and an expired lease hand the window out again."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chasqui_node import limits, validation
from chasqui_node.commands import (
    Consume,
    Created,
    CreateTopic,
    DeleteTopic,
    Deliveries,
    Delivery,
    Done,
    Extend,
    Kind,
    Nack,
    PublishBatch,
    Receipts,
    Result,
    StartPosition,
    Subscribe,
    Subscribed,
    TopicInfo,
    UserInfo,
)
from chasqui_node.errors import (
    AlreadyExists,
    ChasquiError,
    FailedPrecondition,
    NotFound,
)
from chasqui_node.state import keys
from chasqui_node.state.access import (
    add_created,
    authorize,
    check_room,
    delete_owned,
    visible_lists,
)
from chasqui_node.state.context import EntryContext, delivery_reply_bytes
from chasqui_node.state.dedup import plan_batch, remember_publishes
from chasqui_node.state.keys import TOPIC_MESSAGE, Cursor, TopicMeta, u64
from chasqui_node.state.store import Store, scan_all
from chasqui_node.state.users import authenticate

_TOPIC_PAGE = 16  # topic messages read per scan while consuming (bodies up to 1 MiB each)

# -- create, delete, subscribe ----------------------------------------------------------------


def create_topic(ctx: EntryContext, user: UserInfo, command: CreateTopic) -> Result:
    validation.check_create_topic(command, ctx.check_name)
    existing = ctx.topic_meta(command.name)
    if existing is not None:
        if command.exist_ok and existing.owner == user.user_id:
            return Created(Kind.TOPIC, command.name, created=False)
        raise AlreadyExists("topic", command.name)
    check_room(ctx, user, Kind.TOPIC)
    meta = TopicMeta(
        incarnation=ctx.bump(keys.INCARNATION_KEY, 1),
        owner=user.user_id,
        retention_ms=command.retention_ms or limits.TOPIC_RETENTION_MS_DEFAULT,
        retention_bytes=command.retention_bytes or limits.TOPIC_RETENTION_BYTES_DEFAULT,
        first_offset=0,
        next_offset=0,
        stored_bytes=0,
    )
    return add_created(ctx, Kind.TOPIC, command.name, meta)


def delete_topic(ctx: EntryContext, user: UserInfo, command: DeleteTopic) -> Result:
    validation.check_delete_topic(command, ctx.check_name)
    meta = ctx.existing_topic(command.name)
    return delete_owned(ctx, user, Kind.TOPIC, command.name, meta)


def subscribe_topic(ctx: EntryContext, user: UserInfo, command: Subscribe) -> Result:
    """A new cursor at the start asked for; an existing subscription is left as it is."""
    topic = ctx.existing_topic(command.name)
    authorize(user, "subscribe", Kind.TOPIC, command.name, topic)
    key = keys.subscription_key(topic.incarnation, user.user_id)
    value = ctx.store.get(key)
    if value is not None:
        return Subscribed(Kind.TOPIC, command.name, Cursor.decode(value).acked)
    if _purge_topic(ctx, topic):
        ctx.put_topic_meta(command.name, topic)
    if command.start is StartPosition.EARLIEST:
        offset = topic.first_offset
    elif command.start is StartPosition.OFFSET:
        offset = min(max(command.offset, topic.first_offset), topic.next_offset)
    else:
        offset = topic.next_offset
    ctx.store.put(key, Cursor(offset, offset, 0, offset, 0).encode())
    return Subscribed(Kind.TOPIC, command.name, offset)


# -- publish and retention --------------------------------------------------------------------


def publish_topic(ctx: EntryContext, user: UserInfo, command: PublishBatch) -> Receipts:
    """The batch is checked (`validation.check_publish_batch`); all or nothing from here."""
    topic = ctx.existing_topic(command.name)
    authorize(user, "publish", Kind.TOPIC, command.name, topic)
    plan = plan_batch(ctx, topic.incarnation, command, topic.next_offset)
    producer = command.producer_id.encode()
    header = TOPIC_MESSAGE.pack(ctx.clock, len(producer)) + producer
    key_prefix = keys.topic_message_prefix(topic.incarnation)
    for message in plan.new_messages:
        offset = topic.next_offset
        assert offset == message.position, "planned offsets are assigned in order"
        ctx.store.put(key_prefix + u64(offset), header + message.body)
        topic.next_offset += 1
        topic.stored_bytes += len(message.body)
        _purge_topic(ctx, topic)
    remember_publishes(ctx, plan)
    if plan.new_messages:
        ctx.put_topic_meta(command.name, topic)
    return Receipts(tuple(plan.receipts))


def _purge_topic(ctx: EntryContext, topic: TopicMeta) -> bool:
    """Drop messages past retention (age or bytes) from the head, at most
    RETENTION_PURGE_PER_COMMAND per call. Mutates `topic`; the caller stores it. True if
    anything was dropped.

    A publish calls this once per message, so the head's age is remembered for the entry
    (a stored message never changes, and the clock stands still): while the topic is within
    its bytes, a head known to be young answers without reading the store."""
    if topic.first_offset >= topic.next_offset:
        return False
    if topic.stored_bytes <= topic.retention_bytes:
        head_time_ms = ctx.topic_heads.get((topic.incarnation, topic.first_offset))
        if head_time_ms is not None and head_time_ms + topic.retention_ms > ctx.clock:
            return False
    budget = limits.RETENTION_PURGE_PER_COMMAND
    page_rows = 1  # usually the head stays: read one message, not a page of bodies
    start = keys.topic_message_key(topic.incarnation, topic.first_offset)
    prefix = start[: keys.INCARNATION_PREFIX_BYTES]
    dropped = False
    while budget > 0:
        asked = min(page_rows, budget)
        rows = ctx.store.scan(prefix, start, limit=asked)
        for key, value in rows:
            publish_time_ms, producer_len = TOPIC_MESSAGE.unpack_from(value)
            too_old = publish_time_ms + topic.retention_ms <= ctx.clock
            if not (too_old or topic.stored_bytes > topic.retention_bytes):
                offset = keys.topic_message_offset(key)
                ctx.topic_heads[(topic.incarnation, offset)] = publish_time_ms
                return dropped
            ctx.store.delete(key)
            topic.stored_bytes -= len(value) - TOPIC_MESSAGE.size - producer_len
            topic.first_offset = keys.topic_message_offset(key) + 1
            dropped = True
        if len(rows) < asked:
            return dropped
        budget -= len(rows)
        start = rows[-1][0] + b"\x00"
        page_rows = _TOPIC_PAGE
    return dropped


# -- consume ----------------------------------------------------------------------------------


def consume_topic(ctx: EntryContext, user: UserInfo, command: Consume) -> Result:
    topic = ctx.existing_topic(command.name)
    authorize(user, "consume", Kind.TOPIC, command.name, topic)
    key = keys.subscription_key(topic.incarnation, user.user_id)
    cursor = _cursor(ctx, key, command.name, user)
    if _purge_topic(ctx, topic):
        ctx.put_topic_meta(command.name, topic)
    before = cursor.encode()
    _expire_window(ctx, cursor, topic)
    if len(cursor.windows) >= limits.TOPIC_WINDOWS_MAX:
        cursor.rewind()  # that many unacked replies: start again from the last ack
    if command.next_offset >= 0:
        # The client has everything before next_offset. Anything handed out from there on
        # never reached it (a reply lost in a leader change): hand it out again first.
        resume = max(cursor.acked, min(command.next_offset, cursor.delivered))
        if resume < cursor.delivered:
            cursor.delivered = resume
            cursor.redeliveries += 1
            cursor.windows = [start for start in cursor.windows if start < resume]
    visibility_ms = command.visibility_timeout_ms or limits.VISIBILITY_TIMEOUT_MS_DEFAULT
    deadline_ms = ctx.clock + visibility_ms
    deliveries: list[Delivery] = []
    reply_bytes = 0
    more_ready = False
    for row_key, value in _topic_rows(ctx, topic, cursor.delivered, command.max_messages):
        offset = keys.topic_message_offset(row_key)
        publish_time_ms, producer_len = TOPIC_MESSAGE.unpack_from(value)
        header = TOPIC_MESSAGE.size
        producer_id = value[header : header + producer_len].decode()
        body = value[header + producer_len :]
        reply_bytes += delivery_reply_bytes(command.name, producer_id, body)
        if deliveries and reply_bytes > limits.CONSUME_BYTES_MAX:
            more_ready = True
            break  # the reply is full; the cursor stops before this message
        count = cursor.redeliveries + 1 if offset < cursor.high else 1
        deliveries.append(
            Delivery(
                Kind.TOPIC,
                command.name,
                offset,
                body,
                count,
                publish_time_ms,
                producer_id,
                deadline_ms,
            )
        )
    if deliveries:
        cursor.windows.append(deliveries[0].sequence)
        cursor.delivered = deliveries[-1].sequence + 1
        cursor.high = max(cursor.high, cursor.delivered)
        cursor.lease_deadline_ms = deadline_ms
    if cursor.encode() != before:
        ctx.store.put(key, cursor.encode())
    if more_ready or len(deliveries) == command.max_messages:  # the topic may hold more
        return Deliveries(tuple(deliveries), more_ready=True)
    # At the end of the topic: only the open window's lease ending rewinds the cursor.
    next_ready_ms = cursor.lease_deadline_ms if cursor.delivered > cursor.acked else 0
    return Deliveries(tuple(deliveries), next_ready_ms)


def _topic_rows(
    ctx: EntryContext, topic: TopicMeta, offset: int, count_max: int
) -> Iterator[tuple[bytes, bytes]]:
    """Stored messages from `offset` on, at most `count_max`, read a page at a time so a
    consume that stops early for size has not loaded hundreds of large bodies."""
    start = keys.topic_message_key(topic.incarnation, offset)
    prefix = start[: keys.INCARNATION_PREFIX_BYTES]
    while count_max > 0:
        page = ctx.store.scan(prefix, start, limit=min(count_max, _TOPIC_PAGE))
        yield from page
        if len(page) < min(count_max, _TOPIC_PAGE):
            return
        count_max -= len(page)
        start = page[-1][0] + b"\x00"


def _cursor(ctx: EntryContext, key: bytes, topic_name: str, user: UserInfo) -> Cursor:
    value = ctx.store.get(key)
    if value is None:
        raise NotFound(
            f'user {user.user_id} has no subscription to topic "{topic_name}"; subscribe first'
        )
    return Cursor.decode(value)


def _expire_window(ctx: EntryContext, cursor: Cursor, topic: TopicMeta) -> None:
    """Skip what retention dropped, and reopen a window whose lease expired."""
    cursor.acked = max(cursor.acked, topic.first_offset)
    cursor.delivered = max(cursor.delivered, cursor.acked)
    cursor.high = max(cursor.high, cursor.acked)
    cursor.windows = [start for start in cursor.windows if start >= cursor.acked]
    if cursor.delivered > cursor.acked and cursor.lease_deadline_ms <= ctx.clock:
        cursor.rewind()


# -- ack, nack, extend ------------------------------------------------------------------------


def ack_topic(
    ctx: EntryContext, user: UserInfo, name: str, items: Iterable[tuple[int, int]]
) -> Result:
    """Move the caller's cursor past each offset in turn (cumulative, idempotent); the
    first refusal is returned after the other items are applied."""
    first_refusal: Result | None = None
    for offset, _delivery_count in items:
        try:
            result = _ack_offset(ctx, user, name, offset)
        except ChasquiError as error:
            result = error
        if first_refusal is None and isinstance(result, ChasquiError):
            first_refusal = result
    return first_refusal or Done()


def _ack_offset(ctx: EntryContext, user: UserInfo, name: str, sequence: int) -> Result:
    key, cursor = _leased_window(ctx, user, name, sequence)
    if sequence < cursor.acked:
        return Done()  # acked before: acks are idempotent
    window_start = max(
        (start for start in cursor.windows if start <= sequence),
        default=cursor.acked,
    )
    if window_start > cursor.acked:
        # Offsets [acked, window_start) went out in an earlier reply that was never
        # acked, perhaps never received. Acking past them would lose them: hand
        # everything out again instead, and say so.
        skipped = cursor.acked
        cursor.rewind()
        ctx.store.put(key, cursor.encode())
        return FailedPrecondition(
            f'offsets {skipped} to {window_start - 1} of topic "{name}" were '
            f"handed out to user {user.user_id} by an earlier consume that was not "
            f"acked; offset {sequence} was not acked past them, and every "
            f"offset from {skipped} will be delivered again"
        )
    cursor.acked = sequence + 1
    cursor.windows = [start for start in cursor.windows if start > sequence]
    if cursor.acked >= cursor.high:
        cursor.redeliveries = 0
    ctx.store.put(key, cursor.encode())
    return Done()


def nack_topic(ctx: EntryContext, user: UserInfo, command: Nack) -> Result:
    key, cursor = _leased_window(ctx, user, command.name, command.sequence)
    if command.sequence < cursor.acked:
        return Done()  # already acked: nothing to give back
    _check_window_lease(ctx, command.name, command.sequence, cursor, user)
    if command.delay_ms:
        cursor.lease_deadline_ms = ctx.clock + command.delay_ms
    else:
        cursor.rewind()
    ctx.store.put(key, cursor.encode())
    return Done()


def extend_topic(ctx: EntryContext, user: UserInfo, command: Extend) -> Result:
    key, cursor = _leased_window(ctx, user, command.name, command.sequence)
    if command.sequence < cursor.acked:
        raise FailedPrecondition(
            f'offset {command.sequence} of topic "{command.name}" is already acked by '
            f"user {user.user_id}"
        )
    _check_window_lease(ctx, command.name, command.sequence, cursor, user)
    cursor.lease_deadline_ms = ctx.clock + command.extend_ms
    ctx.store.put(key, cursor.encode())
    return Done()


def _leased_window(
    ctx: EntryContext, user: UserInfo, topic_name: str, offset: int
) -> tuple[bytes, Cursor]:
    """The subscription key and its cursor; raises FailedPrecondition for an
    offset this subscription has not been handed."""
    topic = ctx.existing_topic(topic_name)
    authorize(user, "consume", Kind.TOPIC, topic_name, topic)
    key = keys.subscription_key(topic.incarnation, user.user_id)
    cursor = _cursor(ctx, key, topic_name, user)
    if offset >= cursor.delivered or offset < 0:
        raise FailedPrecondition(
            f'offset {offset} of topic "{topic_name}" is not leased to user {user.user_id}: '
            f"the next offset to deliver is {cursor.delivered}; consume it first"
        )
    return key, cursor


def _check_window_lease(
    ctx: EntryContext, topic_name: str, offset: int, cursor: Cursor, user: UserInfo
) -> None:
    if cursor.lease_deadline_ms <= ctx.clock:
        raise FailedPrecondition(
            f'offset {offset} of topic "{topic_name}" is no longer leased to user '
            f"{user.user_id}: its lease expired at {cursor.lease_deadline_ms} and it will be "
            "delivered again"
        )


# -- queries ----------------------------------------------------------------------------------


def list_topics(store: Store, key_hash: str, owned_only: bool) -> list[TopicInfo]:
    """Every topic sorted by name (only the caller's with `owned_only`)."""
    user = authenticate(store, key_hash)
    topics: list[TopicInfo] = []
    for name, value in scan_all(store, keys.TOPIC_META_PREFIX):
        meta = keys.decode_meta(TopicMeta, value)
        if owned_only and meta.owner != user.user_id:
            continue
        subscribed = store.get(keys.subscription_key(meta.incarnation, user.user_id)) is not None
        publishers, consumers = visible_lists(user, meta)
        topics.append(
            TopicInfo(
                name,
                meta.owner,
                subscribed,
                meta.first_offset,
                meta.next_offset,
                publishers,
                consumers,
            )
        )
    return topics
