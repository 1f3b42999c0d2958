"""Users: created with a key hash (open signup, by an admin, or the configured admin key),
revoked by an admin, never deleted. User ids are "u1".."uN" in creation order."""

from __future__ import annotations

import json

from chasqui_node import limits, validation
from chasqui_node.commands import (
    CreateUser,
    CreateUserAsAdmin,
    Done,
    EnsureAdmin,
    Kind,
    Result,
    RevokeUser,
    UserCreated,
    UserInfo,
    UserSummary,
)
from chasqui_node.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from chasqui_node.state import keys
from chasqui_node.state.context import EntryContext, check_authenticated, lookup_user
from chasqui_node.state.store import Store, get_counter, scan_all

# -- handlers ---------------------------------------------------------------------------------


def create_user(ctx: EntryContext, command: CreateUser) -> Result:
    """Open signup: no key is needed to send it (the service bounds its rate)."""
    validation.check_create_user(command)
    return _new_user(ctx, command.key_hash, command.admin)


def create_user_as_admin(ctx: EntryContext, user: UserInfo, command: CreateUserAsAdmin) -> Result:
    if not user.admin:
        what = "admin users" if command.admin else "users on this cluster"
        raise PermissionDenied(
            f"user {user.user_id} is not an admin; only an admin may create {what}"
        )
    validation.check_create_user_as_admin(command)
    return _new_user(ctx, command.new_key_hash, command.admin)


def ensure_admin(ctx: EntryContext, command: EnsureAdmin) -> Result:
    validation.check_ensure_admin(command)
    existing = lookup_user(ctx.store, command.key_hash)
    if existing is None:
        return _new_user(ctx, command.key_hash, admin=True)
    if existing.revoked:
        raise FailedPrecondition(
            f"the configured admin key (user {existing.user_id}) has been revoked; "
            "configure a new admin key"
        )
    if not existing.admin:
        _put_user(ctx, command.key_hash, existing.user_id, admin=True, revoked=False)
    return UserCreated(existing.user_id)


def revoke_user(ctx: EntryContext, user: UserInfo, command: RevokeUser) -> Result:
    if not user.admin:
        raise PermissionDenied(
            f"user {user.user_id} is not an admin; only an admin may revoke keys"
        )
    validation.check_revoke_user(command)
    check_user_exists(ctx.store, command.user_id)
    if command.user_id == user.user_id:
        raise FailedPrecondition(
            f"user {user.user_id} cannot revoke its own key; ask another admin"
        )
    key_hash = key_hash_of(ctx.store, command.user_id)
    target = lookup_user(ctx.store, key_hash)
    assert target is not None, "the user index points at a missing user"
    if not target.revoked:
        _put_user(ctx, key_hash, target.user_id, admin=target.admin, revoked=True)
    return Done()


def _new_user(ctx: EntryContext, key_hash: str, admin: bool) -> Result:
    existing = lookup_user(ctx.store, key_hash)
    if existing is not None:
        raise AlreadyExists("user", existing.user_id)
    count = get_counter(ctx.store, keys.USERS_KEY)
    if count >= limits.USERS_MAX:
        raise ResourceExhausted(f"user count is at users_max {limits.USERS_MAX}")
    user_id = f"u{count + 1}"
    ctx.store.put(keys.USERS_KEY, keys.u64(count + 1))
    ctx.store.put(keys.user_key(key_hash), keys.encode_user(user_id, admin, revoked=False))
    ctx.forget_user(key_hash)
    ctx.store.put(keys.user_index_key(user_id), key_hash.encode("utf-8", "surrogatepass"))
    return UserCreated(user_id)


def _put_user(ctx: EntryContext, key_hash: str, user_id: str, admin: bool, revoked: bool) -> None:
    ctx.store.put(keys.user_key(key_hash), keys.encode_user(user_id, admin, revoked))
    ctx.forget_user(key_hash)


# -- lookups ----------------------------------------------------------------------------------


def check_user_exists(store: Store, user_id: str) -> None:
    """User ids are "u1".."uN" in creation order and users are never deleted."""
    digits = user_id[1:]
    exists = (
        user_id.startswith("u")
        and digits.isascii()
        and digits.isdigit()
        and not digits.startswith("0")
        and int(digits) <= get_counter(store, keys.USERS_KEY)
    )
    if not exists:
        raise NotFound(f"user {user_id!r} does not exist")


def key_hash_of(store: Store, user_id: str) -> str:
    indexed = store.get(keys.user_index_key(user_id))
    if indexed is not None:
        return indexed.decode("utf-8", "surrogatepass")
    # Users created before the i: index existed (see the compatibility register).
    for key_hash, value in scan_all(store, keys.USER_PREFIX):
        if json.loads(value)["id"] == user_id:
            return key_hash
    raise NotFound(f"user {user_id} does not exist")


# -- queries ----------------------------------------------------------------------------------


def authenticate(store: Store, key_hash: str) -> UserInfo:
    """Raises Unauthenticated when no user has this key hash, or its key was revoked."""
    return check_authenticated(lookup_user(store, key_hash))


def list_users(store: Store, key_hash: str) -> list[UserSummary]:
    """Every user in creation order, revoked ones included. Admins only: raises
    PermissionDenied for anyone else (at most USERS_MAX rows)."""
    user = authenticate(store, key_hash)
    if not user.admin:
        raise PermissionDenied(f"user {user.user_id} is not an admin; only admins list users")
    users: list[UserSummary] = []
    for _, value in scan_all(store, keys.USER_PREFIX):
        record = keys.decode_user(value)
        users.append(
            UserSummary(
                user_id=record.user_id,
                admin=record.admin,
                revoked=record.revoked,
                topics_owned=get_counter(store, keys.owned_key(Kind.TOPIC, record.user_id)),
                queues_owned=get_counter(store, keys.owned_key(Kind.QUEUE, record.user_id)),
            )
        )
    users.sort(key=lambda summary: (len(summary.user_id), summary.user_id))
    return users
