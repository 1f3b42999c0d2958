"""The stateless rules of every command, written once.

The service checks a command with `check_request` before proposing it, so a bad request is
refused whole with INVALID_ARGUMENT and never reaches the log; the state machine asserts the
same rules again as it applies the command (`check_<command>`), because entries from older
nodes, or written before a rule existed at the edge, must still be refused identically on
every replica. Limits are read from `limits` at call time; errors are `InvalidArgument` and its
subclasses, with the messages the state machine has always returned.

Each `check_<command>` runs its rules in the order the state machine has always applied them
(the first broken rule is the one reported), and the state machine calls it where it has
always checked them: after authentication, and after an admin check where the command has one.
Names are checked through the `check_name` passed in: the state machine passes its own, which
checks each name once per entry. `SetAccess` is the one command whose rules the state machine
cannot assert in one call: it checks the name first, the caller's ownership next, then each
access list as it will be stored (distinct ids), each id's length together with whether that
user exists. It uses the same rules (`check_access_list_length`, `check_user_id`) in that order.

A few rules belong to the edge alone (`check_request` and the request checks at the end):
they bound what a request may carry or refuse a setting the state machine has always accepted,
so asserting them in the state machine would change how replicas apply entries already
committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chasqui_node import limits
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
    EnsureAdmin,
    Extend,
    Kind,
    Nack,
    Publish,
    PublishBatch,
    RemoveMember,
    RevokeUser,
    SetAccess,
    Subscribe,
    Unsubscribe,
    check_name,
)
from chasqui_node.errors import InvalidArgument, LimitExceeded

NameCheck = Callable[[Kind, str], None]

# ---------------------------------------------------------------------------------------------
# Rules shared by several commands.


def check_range(
    what: str, value: int, low: int, high: int, limit_name: str, unit: str = ""
) -> None:
    if value < low:
        raise InvalidArgument(f"{what} must be at least {low}, got {value}")
    if value > high:
        raise LimitExceeded(what, value, limit_name, high, unit)


def check_sequence(what: str, value: int) -> None:
    """A sequence or offset: stored as u64 in keys, handed out as int64."""
    if not 0 <= value <= limits.OFFSET_MAX:
        raise InvalidArgument(f"{what} must be between 0 and {limits.OFFSET_MAX}, got {value}")


def check_key_hash(key_hash: str) -> None:
    if not 1 <= len(key_hash) <= limits.KEY_HASH_CHARS_MAX:
        raise InvalidArgument(
            f"key hash must be 1 to key_hash_chars_max {limits.KEY_HASH_CHARS_MAX} "
            f"characters, got {len(key_hash)}"
        )


def check_user_id(what: str, user_id: str) -> None:
    check_range(
        what, len(user_id.encode()), 1, limits.USER_ID_BYTES_MAX, "user_id_bytes_max", "bytes"
    )


def check_access_list_length(what: str, count: int) -> None:
    check_range(what, count, 0, limits.ACCESS_LIST_USERS_MAX, "access_list_users_max")


def check_ack_count(count: int) -> None:
    """Deliveries acked by one command, and by one Ack call at the edge."""
    check_range("ack batch", count, 0, limits.ACK_BATCH_MAX, "ack_batch_max")


def check_node_id(node_id: str) -> None:
    check_range(
        "node_id", len(node_id.encode()), 1, limits.NODE_ID_BYTES_MAX, "node_id_bytes_max", "bytes"
    )


def check_address(what: str, address: str) -> None:
    check_range(
        what, len(address.encode()), 1, limits.ADDRESS_BYTES_MAX, "address_bytes_max", "bytes"
    )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {address!r} is not host:port")


# ---------------------------------------------------------------------------------------------
# Users and members. The state machine checks these after the caller's admin check.


def check_create_user(command: CreateUser) -> None:
    check_key_hash(command.key_hash)


def check_ensure_admin(command: EnsureAdmin) -> None:
    check_key_hash(command.key_hash)


def check_create_user_as_admin(command: CreateUserAsAdmin) -> None:
    check_key_hash(command.new_key_hash)


def check_revoke_user(command: RevokeUser) -> None:
    check_user_id("user_id", command.user_id)


def check_add_member(command: AddMember) -> None:
    check_node_id(command.node_id)
    check_address("client_address", command.client_address)
    check_address("raft_address", command.raft_address)


def check_remove_member(command: RemoveMember) -> None:
    check_node_id(command.node_id)


def check_set_access(command: SetAccess, check_name: NameCheck = check_name) -> None:
    """The edge's check: each list as the request carries it, repeats included (they collapse
    only when stored), so a request cannot carry more ids than a stored list may hold. The
    state machine applies the same rules in its own order (see the module docstring)."""
    check_name(command.kind, command.name)
    for what, user_ids in (("publishers", command.publishers), ("consumers", command.consumers)):
        check_access_list_length(what, len(user_ids))
        for user_id in user_ids:
            check_user_id(f"{what} entry", user_id)


# ---------------------------------------------------------------------------------------------
# Topics and queues.


def check_create_topic(command: CreateTopic, check_name: NameCheck = check_name) -> None:
    check_name(Kind.TOPIC, command.name)
    check_range("retention_ms", command.retention_ms, 0, limits.OFFSET_MAX // 2, "retention_ms_max")
    check_range(
        "retention_bytes",
        command.retention_bytes,
        0,
        limits.OFFSET_MAX,
        "retention_bytes_max",
        "bytes",
    )


def check_delete_topic(command: DeleteTopic, check_name: NameCheck = check_name) -> None:
    check_name(Kind.TOPIC, command.name)


def check_create_queue(command: CreateQueue, check_name: NameCheck = check_name) -> None:
    check_name(Kind.QUEUE, command.name)
    check_range(
        "visibility_timeout_ms",
        command.visibility_timeout_ms,
        0,
        limits.VISIBILITY_TIMEOUT_MS_MAX,
        "visibility_timeout_ms_max",
    )
    check_range(
        "max_deliveries", command.max_deliveries, 0, limits.MAX_DELIVERIES_MAX, "max_deliveries_max"
    )
    check_range("max_length", command.max_length, 0, limits.QUEUE_DEPTH_MAX, "queue_depth_max")
    check_range(
        "message_ttl_ms", command.message_ttl_ms, 0, limits.MESSAGE_TTL_MS_MAX, "message_ttl_ms_max"
    )
    if command.dead_letter_queue:
        check_name(Kind.QUEUE, command.dead_letter_queue)


def check_delete_queue(command: DeleteQueue, check_name: NameCheck = check_name) -> None:
    check_name(Kind.QUEUE, command.name)


def check_subscribe(command: Subscribe, check_name: NameCheck = check_name) -> None:
    check_name(command.kind, command.name)


def check_unsubscribe(command: Unsubscribe, check_name: NameCheck = check_name) -> None:
    check_name(command.kind, command.name)


# ---------------------------------------------------------------------------------------------
# Messages.


def check_publish(command: Publish, check_name: NameCheck = check_name) -> None:
    """A single publish is a batch of one: both follow exactly the same rules."""
    check_publish_batch(command.as_batch(), check_name)


def check_publish_batch(command: PublishBatch, check_name: NameCheck = check_name) -> None:
    """Whole-batch bounds first: the item-by-item check runs only when they find something
    wrong, to name the first offending item (a check per item was a share of a batch's cost)."""
    count = len(command.bodies)
    if not len(command.sequences) == len(command.delays_ms) == count:
        raise InvalidArgument(
            f"a publish batch needs one sequence and one delay per body: got {count} "
            f"bodies, {len(command.sequences)} sequences and {len(command.delays_ms)} delays"
        )
    check_range(
        "batch",
        count,
        0,
        limits.PUBLISH_BATCH_MESSAGES_MAX,
        "publish_batch_messages_max",
        "messages",
    )
    if count and not (
        max(map(len, command.bodies)) <= limits.MESSAGE_BYTES_MAX
        and min(command.sequences) >= 0
        and max(command.sequences) <= limits.OFFSET_MAX
        and min(command.delays_ms) >= 0
        and max(command.delays_ms) <= limits.DELAY_MS_MAX
        and (command.kind is Kind.QUEUE or not any(command.delays_ms))
    ):
        _check_batch_items(command)
    check_range(
        "batch",
        sum(map(len, command.bodies)),
        0,
        limits.PUBLISH_BATCH_BYTES_MAX,
        "publish_batch_bytes_max",
        "bytes",
    )
    try:
        producer = command.producer_id.encode()
    except UnicodeEncodeError as error:
        raise InvalidArgument(f"producer_id is not valid UTF-8 text: {error.reason}") from None
    check_range(
        "producer_id",
        len(producer),
        0,
        limits.PRODUCER_ID_BYTES_MAX,
        "producer_id_bytes_max",
        "bytes",
    )
    check_name(command.kind, command.name)


def _check_batch_items(command: PublishBatch) -> None:
    """Raise for the first item that breaks a rule, in item order."""
    for body, sequence, delay_ms in zip(
        command.bodies, command.sequences, command.delays_ms, strict=True
    ):
        check_range("message", len(body), 0, limits.MESSAGE_BYTES_MAX, "message_bytes_max", "bytes")
        check_sequence("sequence", sequence)
        check_delay_ms(delay_ms)
        if delay_ms and command.kind is Kind.TOPIC:
            raise InvalidArgument(
                "delay_ms applies to queues only; topic messages are visible at once"
            )


def check_delay_ms(delay_ms: int) -> None:
    """A publish's delay or a nack's: both make a message visible later."""
    check_range("delay_ms", delay_ms, 0, limits.DELAY_MS_MAX, "delay_ms_max")


def check_consume(command: Consume, check_name: NameCheck = check_name) -> None:
    check_range(
        "max_messages", command.max_messages, 1, limits.CONSUME_MESSAGES_MAX, "consume_messages_max"
    )
    check_range(
        "visibility_timeout_ms",
        command.visibility_timeout_ms,
        0,
        limits.VISIBILITY_TIMEOUT_MS_MAX,
        "visibility_timeout_ms_max",
    )
    check_name(command.kind, command.name)


def check_ack(command: Ack, check_name: NameCheck = check_name) -> None:
    check_name(command.kind, command.name)


def check_ack_batch(command: AckBatch, check_name: NameCheck = check_name) -> None:
    """An empty batch acks nothing, whatever its name, and is not refused."""
    check_ack_count(len(command.sequences))
    if command.sequences:
        check_name(command.kind, command.name)


def check_nack(command: Nack, check_name: NameCheck = check_name) -> None:
    check_delay_ms(command.delay_ms)
    check_name(command.kind, command.name)


def check_extend(command: Extend, check_name: NameCheck = check_name) -> None:
    check_range(
        "extend_ms",
        command.extend_ms,
        1,
        limits.VISIBILITY_TIMEOUT_MS_MAX,
        "visibility_timeout_ms_max",
    )
    check_name(command.kind, command.name)


# ---------------------------------------------------------------------------------------------
# The edge: every command before it is proposed, and what only a request carries.


def check_request(command: Command) -> None:
    """Raise for a command the state machine would refuse by its stateless rules, and for the
    few that only the edge refuses:
    - a queue that is its own dead-letter queue (the state machine accepts one, whose dead
      letters are dropped, as it always has);
    - a consume's `next_offset` beyond `limits.OFFSET_MAX` (the state machine clamps it)."""
    _CHECKS[type(command)](command)
    if isinstance(command, CreateQueue) and command.dead_letter_queue == command.name:
        raise InvalidArgument(f'queue "{command.name}" cannot be its own dead-letter queue')
    if isinstance(command, Consume) and command.next_offset > limits.OFFSET_MAX:
        raise LimitExceeded("next_offset", command.next_offset, "offset_max", limits.OFFSET_MAX)


def check_consume_wait_s(timeout_s: float) -> None:
    """A long-poll's wait (a request field, not part of the command)."""
    if not 0 <= timeout_s <= limits.CONSUME_WAIT_S_MAX:
        raise InvalidArgument(
            f"timeout_s {timeout_s} is outside 0..consume_wait_s_max {limits.CONSUME_WAIT_S_MAX}"
        )


_CHECKS: dict[type[Any], Callable[[Any], None]] = {
    CreateUser: check_create_user,
    CreateTopic: check_create_topic,
    DeleteTopic: check_delete_topic,
    CreateQueue: check_create_queue,
    DeleteQueue: check_delete_queue,
    Subscribe: check_subscribe,
    Unsubscribe: check_unsubscribe,
    Publish: check_publish,
    Consume: check_consume,
    Ack: check_ack,
    Nack: check_nack,
    Extend: check_extend,
    PublishBatch: check_publish_batch,
    EnsureAdmin: check_ensure_admin,
    CreateUserAsAdmin: check_create_user_as_admin,
    RevokeUser: check_revoke_user,
    SetAccess: check_set_access,
    AddMember: check_add_member,
    RemoveMember: check_remove_member,
    AckBatch: check_ack_batch,
}
