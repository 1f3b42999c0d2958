"""`StateMachine`: applies an entry's commands through one dispatch table, and answers the
read-only queries. The handlers that serve topics and queues alike check the command
(`validation`) and pass it on to the topic or queue side by its kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chasqui_node import limits, validation
from chasqui_node.commands import (
    Ack,
    AckBatch,
    AddMember,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUser,
    CreateUserAsAdmin,
    DeleteQueue,
    DeleteTopic,
    Done,
    EnsureAdmin,
    Entry,
    Extend,
    Kind,
    MemberRecord,
    Nack,
    Publish,
    PublishBatch,
    QueueInfo,
    Receipts,
    RemoveMember,
    Result,
    RevokeUser,
    SetAccess,
    Subscribe,
    TopicInfo,
    Unsubscribe,
    Unsubscribed,
    UserInfo,
    UserSummary,
)
from chasqui_node.errors import ChasquiError, NotFound
from chasqui_node.state import keys, membership, queue_leases, queues, topics, users
from chasqui_node.state.access import set_access
from chasqui_node.state.context import EntryContext
from chasqui_node.state.store import Store, get_counter

# Entry clocks are clamped below this, so clock arithmetic stays inside a u64.
_CLOCK_MAX = limits.OFFSET_MAX // 2


class StateMachine:
    """Applies entries and answers read-only queries. Holds no state of its own: everything is in
    the `Store`, so one instance may serve any number of stores.

    `apply_entry` runs on the replication thread inside one write transaction. It never raises
    for anything a client can send; an unexpected exception is a bug and the caller must abort
    the entry's transaction. The queries run on a read transaction and raise `ChasquiError`."""

    def apply_entry(self, store: Store, entry: Entry) -> list[Result]:
        stored_clock = get_counter(store, keys.CLOCK_KEY)
        clock = max(stored_clock, min(max(entry.now_ms, 0), _CLOCK_MAX))
        if clock != stored_clock:
            store.put(keys.CLOCK_KEY, keys.u64(clock))
        ctx = EntryContext(store, clock, entry.rules)
        results: list[Result] = []
        for command in entry.commands:
            ctx.housekeep()
            try:
                results.append(_apply(ctx, command))
            except ChasquiError as error:
                results.append(error)
        ctx.write_metas()
        return results

    def clock_ms(self, store: Store) -> int:
        """Cluster time as applied so far: the largest stamp of any entry (0 in a new state)."""
        return get_counter(store, keys.CLOCK_KEY)

    def authenticate(self, store: Store, key_hash: str) -> UserInfo:
        """Raises Unauthenticated when no user has this key hash, or its key was revoked."""
        return users.authenticate(store, key_hash)

    def list_users(self, store: Store, key_hash: str) -> list[UserSummary]:
        """Every user in creation order, revoked ones included. Admins only: raises
        PermissionDenied for anyone else (at most USERS_MAX rows)."""
        return users.list_users(store, key_hash)

    def members(self, store: Store) -> list[MemberRecord]:
        """The member registry sorted by node id, tombstones included (at most
        MEMBER_RECORDS_MAX). Unauthenticated: replication reads it to give leader hints."""
        return membership.members(store)

    def list_topics(self, store: Store, key_hash: str, owned_only: bool) -> list[TopicInfo]:
        """Every topic sorted by name (only the caller's with `owned_only`)."""
        return topics.list_topics(store, key_hash, owned_only)

    def list_queues(self, store: Store, key_hash: str, owned_only: bool) -> list[QueueInfo]:
        """Every queue sorted by name (only the caller's with `owned_only`). `in_flight` counts
        leases still running at the last applied clock, up to limits.IN_FLIGHT_COUNT_MAX."""
        return queues.list_queues(store, key_hash, owned_only)


def _apply(ctx: EntryContext, command: Command) -> Result:
    """One command. Each handler checks everything before its first write and raises a
    `ChasquiError` to refuse, so a refused command writes nothing."""
    if isinstance(command, CreateUser):
        return users.create_user(ctx, command)
    if isinstance(command, EnsureAdmin):
        return users.ensure_admin(ctx, command)
    return _HANDLERS[type(command)](ctx, ctx.authenticated(command.key_hash), command)


# -- handlers for topics and queues alike -----------------------------------------------------


def _subscribe(ctx: EntryContext, user: UserInfo, command: Subscribe) -> Result:
    validation.check_subscribe(command, ctx.check_name)
    if command.kind is Kind.QUEUE:
        return queues.subscribe_queue(ctx, user, command)
    return topics.subscribe_topic(ctx, user, command)


def _unsubscribe(ctx: EntryContext, user: UserInfo, command: Unsubscribe) -> Result:
    validation.check_unsubscribe(command, ctx.check_name)
    if command.kind is Kind.QUEUE:
        queue = ctx.existing_queue(command.name)
        key = keys.consumer_key(queue.incarnation, user.user_id)
    else:
        topic = ctx.existing_topic(command.name)
        key = keys.subscription_key(topic.incarnation, user.user_id)
    if not ctx.store.delete(key):
        raise NotFound(
            f'user {user.user_id} is not subscribed to {command.kind.value} "{command.name}"'
        )
    return Unsubscribed(command.kind, command.name)


def _publish(ctx: EntryContext, user: UserInfo, command: Publish) -> Result:
    """A single publish is a batch of one: both follow exactly the same rules."""
    [receipt] = _publish_batch(ctx, user, command.as_batch()).receipts
    return receipt


def _publish_batch(ctx: EntryContext, user: UserInfo, command: PublishBatch) -> Receipts:
    """All or nothing (ARCHITECTURE promise 5): every item is validated, then the
    destination, deduplication and room for the new items are checked for the batch as a
    whole; only then is anything written. Duplicates answer with their original receipt
    and take no room."""
    validation.check_publish_batch(command, ctx.check_name)
    if command.kind is Kind.TOPIC:
        return topics.publish_topic(ctx, user, command)
    return queues.publish_queue(ctx, user, command)


def _consume(ctx: EntryContext, user: UserInfo, command: Consume) -> Result:
    validation.check_consume(command, ctx.check_name)
    if command.kind is Kind.TOPIC:
        return topics.consume_topic(ctx, user, command)
    return queue_leases.consume_queue(ctx, user, command)


def _ack(ctx: EntryContext, user: UserInfo, command: Ack) -> Result:
    validation.check_ack(command, ctx.check_name)
    items = [(command.sequence, command.delivery_count)]
    if command.kind is Kind.QUEUE:
        return queue_leases.ack_queue(ctx, user, command.name, items)
    return topics.ack_topic(ctx, user, command.name, items)


def _ack_batch(ctx: EntryContext, user: UserInfo, command: AckBatch) -> Result:
    """Each item as one `Ack`, independently; the result is the first refusal, if any."""
    validation.check_ack_batch(command, ctx.check_name)
    if not command.sequences:
        return Done()  # like no acks at all, even for a name that does not exist
    items = zip(command.sequences, command.delivery_counts, strict=True)
    if command.kind is Kind.QUEUE:
        return queue_leases.ack_queue(ctx, user, command.name, items)
    return topics.ack_topic(ctx, user, command.name, items)


def _nack(ctx: EntryContext, user: UserInfo, command: Nack) -> Result:
    validation.check_nack(command, ctx.check_name)
    if command.kind is Kind.TOPIC:
        return topics.nack_topic(ctx, user, command)
    return queue_leases.nack_queue(ctx, user, command)


def _extend(ctx: EntryContext, user: UserInfo, command: Extend) -> Result:
    validation.check_extend(command, ctx.check_name)
    if command.kind is Kind.TOPIC:
        return topics.extend_topic(ctx, user, command)
    return queue_leases.extend_queue(ctx, user, command)


# Every command but CreateUser and EnsureAdmin (which need no key) is applied for the user
# its key hash authenticates.
_HANDLERS: dict[type[Any], Callable[[EntryContext, UserInfo, Any], Result]] = {
    CreateTopic: topics.create_topic,
    DeleteTopic: topics.delete_topic,
    CreateQueue: queues.create_queue,
    DeleteQueue: queues.delete_queue,
    Subscribe: _subscribe,
    Unsubscribe: _unsubscribe,
    Publish: _publish,
    PublishBatch: _publish_batch,
    Consume: _consume,
    Ack: _ack,
    AckBatch: _ack_batch,
    Nack: _nack,
    Extend: _extend,
    CreateUserAsAdmin: users.create_user_as_admin,
    RevokeUser: users.revoke_user,
    SetAccess: set_access,
    AddMember: membership.add_member,
    RemoveMember: membership.remove_member,
}
