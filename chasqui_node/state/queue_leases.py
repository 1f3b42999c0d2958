"""Queue leases: consume hands ready messages out for a visibility timeout; ack deletes a
message whose delivery still holds its lease; nack gives it back; extend moves its deadline.
A lease belongs to the user that consumed it (under the access-checked rules)."""

from __future__ import annotations

from collections.abc import Iterable

from chasqui_node import limits
from chasqui_node.commands import (
    Consume,
    Deliveries,
    Delivery,
    Done,
    Extend,
    Kind,
    Nack,
    Result,
    UserInfo,
)
from chasqui_node.errors import ChasquiError, FailedPrecondition, NotFound, PermissionDenied
from chasqui_node.state import keys
from chasqui_node.state.access import authorize
from chasqui_node.state.context import EntryContext, delivery_reply_bytes
from chasqui_node.state.keys import LEASED, QUEUE_MESSAGE, QueueMessage, QueueMeta, u64
from chasqui_node.state.queues import dead_letter, remove_message


def consume_queue(ctx: EntryContext, user: UserInfo, command: Consume) -> Result:
    queue = ctx.existing_queue(command.name)
    authorize(user, "consume", Kind.QUEUE, command.name, queue)
    visibility_ms = command.visibility_timeout_ms or queue.visibility_timeout_ms
    prefix = keys.visibility_prefix(queue.incarnation)
    candidates = ctx.store.scan(
        prefix, limit=command.max_messages + limits.RETENTION_PURGE_PER_COMMAND
    )
    deliveries: list[Delivery] = []
    reply_bytes = 0
    depth_before = queue.depth
    # Unless the loop stops at a message not yet visible, one may be ready after the last.
    more_ready = len(candidates) == command.max_messages + limits.RETENTION_PURGE_PER_COMMAND
    # The hot path of consuming: each lease is written from the stored header and bytes
    # (no QueueMessage, no re-encoding of the body); the old index key is the candidate's.
    store, clock, name = ctx.store, ctx.clock, command.name
    message_prefix = keys.queue_message_prefix(queue.incarnation)
    lease_deadline_ms = clock + visibility_ms
    leased_prefix = prefix + u64(lease_deadline_ms)
    lease_mark = _lease_mark(ctx, user)
    header_size, pack_header = QUEUE_MESSAGE.size, QUEUE_MESSAGE.pack
    visible_at_ms_of, sequence_of = keys.visibility_visible_at_ms, keys.visibility_sequence
    sequence_at = keys.VISIBILITY_SEQUENCE_AT
    for key, _ in candidates:
        if visible_at_ms_of(key) > clock:
            more_ready = False
            break
        if len(deliveries) >= command.max_messages:
            more_ready = True
            break
        sequence_bytes = key[sequence_at:]
        message_key = message_prefix + sequence_bytes
        value = store.get(message_key)
        assert value is not None, "visibility index points at a missing message"
        publish_time_ms, _, count, _, producer_len = QUEUE_MESSAGE.unpack_from(value)
        expired = queue.message_ttl_ms > 0 and publish_time_ms + queue.message_ttl_ms <= clock
        if expired or 0 < queue.max_deliveries <= count:
            message = QueueMessage.decode(value)
            remove_message(ctx, queue, sequence_of(key), message)
            dead_letter(ctx, name, queue, message)
            continue
        producer_id = value[header_size : header_size + producer_len].decode()
        body = value[header_size + producer_len :]
        reply_bytes += delivery_reply_bytes(name, producer_id, body)
        if deliveries and reply_bytes > limits.CONSUME_BYTES_MAX:
            more_ready = True
            break  # the reply is full; this message stays ready for the next consume
        count += 1
        store.delete(key)
        store.put(leased_prefix + sequence_bytes, lease_mark)
        store.put(
            message_key,
            pack_header(publish_time_ms, lease_deadline_ms, count, True, producer_len)
            + value[header_size:],
        )
        deliveries.append(
            Delivery(
                Kind.QUEUE,
                name,
                sequence_of(key),
                body,
                count,
                publish_time_ms,
                producer_id,
                lease_deadline_ms,
            )
        )
    if queue.depth != depth_before:
        ctx.put_queue_meta(command.name, queue)
    if more_ready:
        return Deliveries(tuple(deliveries), more_ready=True)
    # Every stored message is leased or delayed now (those just delivered included).
    first = ctx.store.scan(prefix, limit=1)
    return Deliveries(tuple(deliveries), visible_at_ms_of(first[0][0]) if first else 0)


def ack_queue(
    ctx: EntryContext, user: UserInfo, name: str, items: Iterable[tuple[int, int]]
) -> Result:
    """Delete each message whose delivery still holds its lease (idempotent), with the
    queue's metadata loaded, authorized and stored once for the batch rather than once per
    message (two copies of it per ack were a third of an ack's cost). Refusals of the
    queue itself (NotFound, PermissionDenied) are every item's, so they refuse the whole
    batch; any other is returned, the first one, after the other items are applied."""
    queue = ctx.existing_queue(name)
    authorize(user, "consume", Kind.QUEUE, name, queue)
    depth_before = queue.depth
    first_refusal: ChasquiError | None = None
    # The hot path of acking reads only the stored header (see `_check_lease` for the rule).
    store, clock = ctx.store, ctx.clock
    message_prefix = keys.queue_message_prefix(queue.incarnation)
    visibility_prefix = keys.visibility_prefix(queue.incarnation)
    for sequence, delivery_count in items:
        try:
            _check_assigned(queue, name, sequence)
            sequence_bytes = u64(sequence)
            value = store.get(message_prefix + sequence_bytes)
            if value is None:
                continue  # acked before (or dropped): acks are idempotent
            _, visible_at_ms, count, leased, _ = QUEUE_MESSAGE.unpack_from(value)
            if not (1 <= delivery_count == count and leased and visible_at_ms > clock):
                message = QueueMessage.decode(value)
                _check_lease(ctx, name, sequence, delivery_count, message)  # raises
            visibility_key = visibility_prefix + u64(visible_at_ms) + sequence_bytes
            _check_lessee(ctx, user, name, sequence, delivery_count, visibility_key)
            store.delete(message_prefix + sequence_bytes)
            store.delete(visibility_key)
            queue.depth -= 1
        except ChasquiError as error:
            first_refusal = first_refusal or error
    if queue.depth != depth_before:
        ctx.put_queue_meta(name, queue)
    return first_refusal or Done()


def nack_queue(ctx: EntryContext, user: UserInfo, command: Nack) -> Result:
    queue, message = _leased_message(ctx, user, command.name, command.sequence)
    if message is None:
        return Done()  # acked or dropped meanwhile: nothing to give back
    if not message.leased and message.delivery_count == command.delivery_count:
        return Done()  # this delivery was already given back: a retried nack
    _check_settles(ctx, user, command, queue, message)
    message.leased = False
    _move_visibility(ctx, queue, command.sequence, message, ctx.clock + command.delay_ms)
    return Done()


def extend_queue(ctx: EntryContext, user: UserInfo, command: Extend) -> Result:
    queue, message = _leased_message(ctx, user, command.name, command.sequence)
    if message is None:
        raise FailedPrecondition(
            f'message {command.sequence} on queue "{command.name}" is no longer stored: '
            "it was acked, expired or dead-lettered"
        )
    _check_settles(ctx, user, command, queue, message)
    _move_visibility(ctx, queue, command.sequence, message, ctx.clock + command.extend_ms)
    return Done()


# -- leases -----------------------------------------------------------------------------------


def _check_assigned(queue: QueueMeta, queue_name: str, sequence: int) -> None:
    if not 0 <= sequence < queue.next_sequence:
        raise NotFound(f'message {sequence} was never published to queue "{queue_name}"')


def _leased_message(
    ctx: EntryContext, user: UserInfo, queue_name: str, sequence: int
) -> tuple[QueueMeta, QueueMessage | None]:
    """The queue and the stored message (None when it is gone: acked or dropped). Raises
    NotFound for a sequence the queue never assigned, PermissionDenied for a user no longer
    on the queue's consumers list (ack, nack and extend count as consuming)."""
    queue = ctx.existing_queue(queue_name)
    authorize(user, "consume", Kind.QUEUE, queue_name, queue)
    _check_assigned(queue, queue_name, sequence)
    value = ctx.store.get(keys.queue_message_key(queue.incarnation, sequence))
    return queue, None if value is None else QueueMessage.decode(value)


def _check_settles(
    ctx: EntryContext,
    user: UserInfo,
    command: Nack | Extend,
    queue: QueueMeta,
    message: QueueMessage,
) -> None:
    """Raise unless `command`'s delivery still holds its lease and `user` may settle it."""
    _check_lease(ctx, command.name, command.sequence, command.delivery_count, message)
    _check_lessee(
        ctx,
        user,
        command.name,
        command.sequence,
        command.delivery_count,
        keys.visibility_key(queue.incarnation, message.visible_at_ms, command.sequence),
    )


def _lease_mark(ctx: EntryContext, user: UserInfo) -> bytes:
    """The visibility index value of a message leased to `user` by this entry."""
    if ctx.access_checked:
        return LEASED + user.user_id.encode()
    return LEASED  # the original rules name no lessee


def _check_lessee(
    ctx: EntryContext,
    user: UserInfo,
    queue_name: str,
    sequence: int,
    delivery_count: int,
    visibility_key: bytes,
) -> None:
    """Raise PermissionDenied unless `user` consumed this lease (or is an admin). Leases
    written under the original rules name no lessee: anyone allowed to consume may settle
    them, as before."""
    if not ctx.access_checked or user.admin:
        return
    mark = ctx.store.get(visibility_key)
    assert mark is not None and mark[:1] == LEASED, "a live lease has its index entry"
    lessee = bytes(mark[1:])
    if lessee and lessee != user.user_id.encode():
        raise PermissionDenied(
            f'delivery {delivery_count} of message {sequence} on queue "{queue_name}" is '
            f"leased to another user, not to user {user.user_id}; only the consumer that "
            "received it may ack, nack or extend it"
        )


def _check_lease(
    ctx: EntryContext, queue_name: str, sequence: int, delivery_count: int, message: QueueMessage
) -> None:
    if (
        1 <= delivery_count == message.delivery_count
        and message.leased
        and message.visible_at_ms > ctx.clock
    ):
        return  # still leased to this delivery (checked first: the message is not built)
    what = f'delivery {delivery_count} of message {sequence} on queue "{queue_name}"'
    if delivery_count > message.delivery_count or delivery_count < 1:
        raise FailedPrecondition(
            f"{what} never happened: the message has been delivered {message.delivery_count} times"
        )
    if delivery_count < message.delivery_count:
        raise FailedPrecondition(
            f"{what} is no longer leased: the message was delivered again "
            f"(delivery {message.delivery_count})"
        )
    if not message.leased:
        raise FailedPrecondition(
            f"{what} is no longer leased: it was given back (nack) and will be delivered again"
        )
    assert message.visible_at_ms <= ctx.clock, "every other case returned above"
    raise FailedPrecondition(
        f"{what} is no longer leased: its lease expired at {message.visible_at_ms} and "
        "it will be delivered again"
    )


def _move_visibility(
    ctx: EntryContext, queue: QueueMeta, sequence: int, message: QueueMessage, visible_at_ms: int
) -> None:
    store = ctx.store
    old_key = keys.visibility_key(queue.incarnation, message.visible_at_ms, sequence)
    # The lessee stays; a lease of the original rules is marked b"L" alone.
    mark = (store.get(old_key) or LEASED) if message.leased else b""
    store.delete(old_key)
    message.visible_at_ms = visible_at_ms
    store.put(keys.visibility_key(queue.incarnation, visible_at_ms, sequence), mark)
    store.put(keys.queue_message_key(queue.incarnation, sequence), message.encode())
