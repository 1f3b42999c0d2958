"""Queues: create and delete, consumer records, publish (with overflow and deduplication), and
the moves of a message out of a queue (drop, dead-letter). Leases, acks, nacks and extends of
queue messages are in `queue_leases`."""

from __future__ import annotations

from collections.abc import Sequence

from chasqui_node import limits, validation
from chasqui_node.commands import (
    Created,
    CreateQueue,
    DeleteQueue,
    Kind,
    Overflow,
    PublishBatch,
    QueueInfo,
    Receipts,
    Result,
    Subscribe,
    Subscribed,
    UserInfo,
)
from chasqui_node.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    QueueFull,
)
from chasqui_node.state import keys
from chasqui_node.state.access import (
    add_created,
    allowed,
    authorize,
    check_room,
    delete_owned,
    visible_lists,
)
from chasqui_node.state.context import EntryContext, lookup_user
from chasqui_node.state.dedup import plan_batch, remember_publishes
from chasqui_node.state.keys import QUEUE_MESSAGE, QueueMessage, QueueMeta, u64
from chasqui_node.state.store import Store, get_counter, scan_all
from chasqui_node.state.users import authenticate, key_hash_of

# -- create, delete, consumer records ---------------------------------------------------------


def create_queue(ctx: EntryContext, user: UserInfo, command: CreateQueue) -> Result:
    validation.check_create_queue(command, ctx.check_name)
    existing = ctx.queue_meta(command.name)
    if existing is not None:
        if command.exist_ok and existing.owner == user.user_id:
            return Created(Kind.QUEUE, command.name, created=False)
        raise AlreadyExists("queue", command.name)
    if command.dead_letter_queue:
        target = ctx.queue_meta(command.dead_letter_queue)
        if target is None:
            raise NotFound(
                f'dead-letter queue "{command.dead_letter_queue}" does not exist; '
                "create it before the queue that uses it"
            )
        if ctx.access_checked and not allowed(user, "publish", target):
            raise PermissionDenied(
                f"user {user.user_id} may not use queue "
                f'"{command.dead_letter_queue}" as a dead-letter queue: not on its '
                f"publishers list (owner {target.owner})"
            )
    check_room(ctx, user, Kind.QUEUE)
    meta = QueueMeta(
        incarnation=ctx.bump(keys.INCARNATION_KEY, 1),
        owner=user.user_id,
        visibility_timeout_ms=command.visibility_timeout_ms or limits.VISIBILITY_TIMEOUT_MS_DEFAULT,
        max_deliveries=command.max_deliveries,
        dead_letter_queue=command.dead_letter_queue,
        max_length=command.max_length,
        overflow=command.overflow.value,
        message_ttl_ms=command.message_ttl_ms,
        next_sequence=0,
        depth=0,
    )
    return add_created(ctx, Kind.QUEUE, command.name, meta)


def delete_queue(ctx: EntryContext, user: UserInfo, command: DeleteQueue) -> Result:
    validation.check_delete_queue(command, ctx.check_name)
    meta = ctx.existing_queue(command.name)
    return delete_owned(ctx, user, Kind.QUEUE, command.name, meta)


def subscribe_queue(ctx: EntryContext, user: UserInfo, command: Subscribe) -> Result:
    """Records the caller as a consumer (listings show it); consuming does not need it."""
    queue = ctx.existing_queue(command.name)
    authorize(user, "subscribe", Kind.QUEUE, command.name, queue)
    ctx.store.put(keys.consumer_key(queue.incarnation, user.user_id), b"")
    return Subscribed(Kind.QUEUE, command.name, 0)


# -- publish ----------------------------------------------------------------------------------


def publish_queue(ctx: EntryContext, user: UserInfo, command: PublishBatch) -> Receipts:
    """The batch is checked (`validation.check_publish_batch`); all or nothing from here."""
    queue = ctx.existing_queue(command.name)
    authorize(user, "publish", Kind.QUEUE, command.name, queue)
    next_sequence = queue.next_sequence
    plan = plan_batch(ctx, queue.incarnation, command, next_sequence)
    depth_max = min(queue.max_length or limits.QUEUE_DEPTH_MAX, limits.QUEUE_DEPTH_MAX)
    adding = len(plan.new_messages)
    if queue.depth + adding > depth_max and queue.overflow != Overflow.DROP_HEAD.value:
        raise QueueFull(command.name, queue.depth, depth_max, adding)
    items = [(message.body, message.delay_ms) for message in plan.new_messages]
    if queue.depth + adding <= depth_max:
        enqueue(ctx, queue, command.producer_id, items)
    else:
        # DROP_HEAD makes room one message at a time, as that many single publishes would:
        # a batch longer than the queue keeps only its own newest messages.
        for item in items:
            while queue.depth >= depth_max:
                if not drop_head(ctx, queue):
                    break
            enqueue(ctx, queue, command.producer_id, [item])
    assert queue.next_sequence == next_sequence + adding, "planned sequences are taken"
    remember_publishes(ctx, plan)
    if plan.new_messages:
        ctx.put_queue_meta(command.name, queue)
    return Receipts(tuple(plan.receipts))


def enqueue(
    ctx: EntryContext, queue: QueueMeta, producer_id: str, items: Sequence[tuple[bytes, int]]
) -> None:
    """Store (body, delay_ms) items at the queue's next sequences, in order. The header
    and keys that all ready (undelayed) items share are built once for the batch."""
    clock, put = ctx.clock, ctx.store.put
    producer = producer_id.encode()
    message_prefix = keys.queue_message_prefix(queue.incarnation)
    visibility_prefix = keys.visibility_prefix(queue.incarnation)
    # The encoding of QueueMessage(clock, visible_at_ms, 0, False, producer_id, body).
    ready_header = QUEUE_MESSAGE.pack(clock, clock, 0, False, len(producer)) + producer
    ready_prefix = visibility_prefix + u64(clock)
    sequence = queue.next_sequence
    for body, delay_ms in items:
        sequence_bytes = u64(sequence)
        if delay_ms:
            visible_at_ms = clock + delay_ms
            header = QUEUE_MESSAGE.pack(clock, visible_at_ms, 0, False, len(producer))
            put(message_prefix + sequence_bytes, header + producer + body)
            put(visibility_prefix + u64(visible_at_ms) + sequence_bytes, b"")
        else:
            put(message_prefix + sequence_bytes, ready_header + body)
            put(ready_prefix + sequence_bytes, b"")
        sequence += 1
    queue.depth += sequence - queue.next_sequence
    queue.next_sequence = sequence


# -- messages leaving a queue -----------------------------------------------------------------


def remove_message(
    ctx: EntryContext, queue: QueueMeta, sequence: int, message: QueueMessage
) -> None:
    ctx.store.delete(keys.queue_message_key(queue.incarnation, sequence))
    ctx.store.delete(keys.visibility_key(queue.incarnation, message.visible_at_ms, sequence))
    queue.depth -= 1


def drop_head(ctx: EntryContext, queue: QueueMeta) -> bool:
    """Delete the oldest stored message (overflow DROP_HEAD); False if the queue is empty."""
    head = ctx.store.scan(keys.queue_message_prefix(queue.incarnation), limit=1)
    if not head:
        return False
    key, value = head[0]
    remove_message(ctx, queue, keys.queue_message_sequence(key), QueueMessage.decode(value))
    return True


def dead_letter(
    ctx: EntryContext, queue_name: str, queue: QueueMeta, message: QueueMessage
) -> None:
    """Move a removed message to the queue's dead-letter queue, if it still has one that
    can take it; otherwise the message is dropped.

    The move is a publish by the queue's owner, decided here on every replica: the owner
    must still be allowed to publish to the dead-letter queue (its access list may have
    changed since), and it must be the queue that existed when this one was created
    (CreateQueue checks that it did). A dead-letter queue deleted and re-created by anyone
    since has a later incarnation than this queue: the new one does not get these."""
    target_name = queue.dead_letter_queue
    if not target_name or target_name == queue_name:
        return
    target = ctx.queue_meta(target_name)
    if target is None:
        return
    if ctx.access_checked and not (
        target.incarnation < queue.incarnation and _may_dead_letter(ctx.store, queue, target)
    ):
        return
    depth_max = min(target.max_length or limits.QUEUE_DEPTH_MAX, limits.QUEUE_DEPTH_MAX)
    if target.depth >= depth_max:
        if target.overflow != Overflow.DROP_HEAD.value:
            return  # a full dead-letter queue cannot refuse a consume: drop
        drop_head(ctx, target)
    enqueue(ctx, target, message.producer_id, [(message.body, 0)])
    ctx.put_queue_meta(target_name, target)


def _may_dead_letter(store: Store, queue: QueueMeta, target: QueueMeta) -> bool:
    """Whether `queue`'s owner may publish its dead letters to `target`: as a publish of
    its own. A revoked owner keeps only its own queues as dead-letter queues."""
    owner = lookup_user(store, key_hash_of(store, queue.owner))
    assert owner is not None, "the user index points at a missing user"
    if owner.revoked:
        return owner.user_id == target.owner
    return allowed(owner, "publish", target)


# -- queries ----------------------------------------------------------------------------------


def list_queues(store: Store, key_hash: str, owned_only: bool) -> list[QueueInfo]:
    """Every queue sorted by name (only the caller's with `owned_only`). `in_flight` counts
    leases still running at the last applied clock, up to limits.IN_FLIGHT_COUNT_MAX."""
    user = authenticate(store, key_hash)
    clock = get_counter(store, keys.CLOCK_KEY)
    queues: list[QueueInfo] = []
    for name, value in scan_all(store, keys.QUEUE_META_PREFIX):
        meta = keys.decode_meta(QueueMeta, value)
        if owned_only and meta.owner != user.user_id:
            continue
        subscribed = store.get(keys.consumer_key(meta.incarnation, user.user_id)) is not None
        prefix = keys.visibility_prefix(meta.incarnation)
        later = store.scan(prefix, prefix + u64(clock + 1), limit=limits.IN_FLIGHT_COUNT_MAX)
        in_flight = sum(1 for _, mark in later if mark[:1] == keys.LEASED)
        publishers, consumers = visible_lists(user, meta)
        queues.append(
            QueueInfo(name, meta.owner, subscribed, meta.depth, in_flight, publishers, consumers)
        )
    return queues
