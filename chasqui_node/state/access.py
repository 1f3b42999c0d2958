"""Who may do what to a topic or queue (its owner, its access lists), and the counts that bound
how many topics and queues there are, per cluster and per owner, kept as they are created and
deleted."""

from __future__ import annotations

from chasqui_node import limits, validation
from chasqui_node.commands import Created, Deleted, Done, Kind, Result, SetAccess, UserInfo
from chasqui_node.errors import PermissionDenied, ResourceExhausted
from chasqui_node.state import keys
from chasqui_node.state.context import EntryContext
from chasqui_node.state.keys import QueueMeta, TopicMeta
from chasqui_node.state.store import get_counter
from chasqui_node.state.users import check_user_exists

_ACTION_WORDS = {
    "publish": "publish to",
    "subscribe": "subscribe to",
    "consume": "consume from",
}


def allowed(user: UserInfo, action: str, meta: TopicMeta | QueueMeta) -> bool:
    """Whether `user` may do `action` ("publish", "subscribe", "consume"; ack, nack and extend
    count as consume) on a topic or queue. The owner and admins always may; otherwise an empty
    access list lets everyone in."""
    if user.admin or user.user_id == meta.owner:
        return True
    allowed = meta.publishers if action == "publish" else meta.consumers
    return not allowed or user.user_id in allowed


def authorize(
    user: UserInfo, action: str, kind: Kind, name: str, meta: TopicMeta | QueueMeta
) -> None:
    """Raise PermissionDenied when `user` may not do `action` on the named topic or queue
    (see `allowed`)."""
    if not allowed(user, action, meta):
        list_name = "publishers" if action == "publish" else "consumers"
        raise PermissionDenied(
            f'user {user.user_id} may not {_ACTION_WORDS[action]} {kind.value} "{name}": '
            f"not on its {list_name} list (owner {meta.owner})"
        )


def check_owner(
    user: UserInfo, kind: Kind, name: str, owner: str, action: str = "delete it"
) -> None:
    if not (user.admin or owner == user.user_id):
        raise PermissionDenied(
            f'{kind.value} "{name}" belongs to {owner}; only its owner or an admin may {action}'
        )


def visible_lists(
    user: UserInfo, meta: TopicMeta | QueueMeta
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Access lists are the owner's business: shown to the owner and admins, empty to others."""
    if user.admin or user.user_id == meta.owner:
        return tuple(meta.publishers), tuple(meta.consumers)
    return (), ()


# -- access lists -----------------------------------------------------------------------------


def set_access(ctx: EntryContext, user: UserInfo, command: SetAccess) -> Result:
    """The rules of `validation.check_set_access`, in the order the state machine has always
    applied them: name, existence, ownership, then each list as stored."""
    ctx.check_name(command.kind, command.name)
    meta: TopicMeta | QueueMeta
    if command.kind is Kind.TOPIC:
        meta = ctx.existing_topic(command.name)
    else:
        meta = ctx.existing_queue(command.name)
    check_owner(user, command.kind, command.name, meta.owner, "change its access lists")
    meta.publishers = _access_list(ctx, "publishers", command.publishers)
    meta.consumers = _access_list(ctx, "consumers", command.consumers)
    if isinstance(meta, TopicMeta):
        ctx.put_topic_meta(command.name, meta)
    else:
        ctx.put_queue_meta(command.name, meta)
    return Done()


def _access_list(ctx: EntryContext, what: str, user_ids: tuple[str, ...]) -> list[str]:
    """The list in canonical form (sorted, no repeats), every id an existing user."""
    unique = sorted(set(user_ids), key=lambda user_id: (len(user_id), user_id))
    validation.check_access_list_length(what, len(unique))
    for user_id in unique:
        validation.check_user_id(f"{what} entry", user_id)
        check_user_exists(ctx.store, user_id)
    return unique


# -- creating and deleting: counts per cluster and per owner -----------------------------------


def check_room(ctx: EntryContext, user: UserInfo, kind: Kind) -> None:
    """Refuse to create a topic or queue beyond TOPICS_MAX / QUEUES_MAX, or beyond what the
    user may own."""
    if kind is Kind.TOPIC:
        limit_name, limit = "topics_max", limits.TOPICS_MAX
    else:
        limit_name, limit = "queues_max", limits.QUEUES_MAX
    if get_counter(ctx.store, _count_key(kind)) >= limit:
        raise ResourceExhausted(f"{kind.value} count is at {limit_name} {limit}")
    _check_owned(ctx, user, kind)


def add_created(ctx: EntryContext, kind: Kind, name: str, meta: TopicMeta | QueueMeta) -> Created:
    """Store a new topic or queue (after `check_room`) and count it for its owner."""
    ctx.bump(_count_key(kind), 1)
    _count_owned(ctx, kind, meta.owner, 1)
    ctx.put_meta(_meta_key(kind, name), meta)
    return Created(kind, name, created=True)


def delete_owned(
    ctx: EntryContext, user: UserInfo, kind: Kind, name: str, meta: TopicMeta | QueueMeta
) -> Deleted:
    """Delete a topic or queue, if `user` owns it or is an admin. Its messages, cursors and
    consumer records go later, a bounded number per command (`EntryContext.purge_deleted`)."""
    check_owner(user, kind, name, meta.owner)
    ctx.delete_meta(_meta_key(kind, name))
    _count_owned(ctx, kind, meta.owner, -1)
    ctx.bump(_count_key(kind), -1)
    ctx.mark_deleted(kind, meta.incarnation)
    return Deleted(kind, name)


def _meta_key(kind: Kind, name: str) -> bytes:
    return keys.topic_meta_key(name) if kind is Kind.TOPIC else keys.queue_meta_key(name)


def _count_key(kind: Kind) -> bytes:
    return keys.TOPICS_KEY if kind is Kind.TOPIC else keys.QUEUES_KEY


def _check_owned(ctx: EntryContext, user: UserInfo, kind: Kind) -> None:
    if user.admin:
        return
    owned = get_counter(ctx.store, keys.owned_key(kind, user.user_id))
    limit_name, limit = (
        ("user_topics_max", limits.USER_TOPICS_MAX)
        if kind is Kind.TOPIC
        else ("user_queues_max", limits.USER_QUEUES_MAX)
    )
    if owned >= limit:
        raise ResourceExhausted(
            f"user {user.user_id} owns {owned} {kind.value}s, at {limit_name} {limit}; "
            f"delete one before creating another"
        )


def _count_owned(ctx: EntryContext, kind: Kind, user_id: str, delta: int) -> None:
    """Owned counts never go below zero: what was created before they were kept is not
    counted, so deleting it must not make room twice (see the compatibility register)."""
    key = keys.owned_key(kind, user_id)
    value = max(0, get_counter(ctx.store, key) + delta)
    if value:
        ctx.store.put(key, keys.u64(value))
    else:
        ctx.store.delete(key)
