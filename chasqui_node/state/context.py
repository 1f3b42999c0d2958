"""The context every handler of one entry works in: the store, the entry's clock and apply
rules, what the entry caches, and the housekeeping that runs before each command."""

from __future__ import annotations

from chasqui_node import limits
from chasqui_node.commands import RULES_ACCESS_CHECKED, Kind, UserInfo, check_name
from chasqui_node.errors import NotFound, Unauthenticated
from chasqui_node.state import keys
from chasqui_node.state.keys import Meta, QueueMeta, TopicMeta
from chasqui_node.state.store import SCAN_PAGE, Store, get_counter


class EntryContext:
    """Applies the commands of one entry at one clock.

    It lives for one entry and caches what the entry's commands read again and again (an entry
    often carries a hundred acks of one queue): users by key hash, names already checked, and
    topic and queue metadata decoded, which is written back once, by `write_metas` after the
    last command, rather than re-encoded per command. Handlers get a private copy of a cached
    meta and change the cache only through `put_meta` / `delete_meta`, so what a handler
    changes without storing it (a refused command, a consume that leaves the depth alone) is
    dropped as before. It also remembers facts that no later command of the entry can undo (no
    expired dedup record, no deleted incarnation left to purge, the age of a topic's oldest
    message) to skip scans."""

    def __init__(self, store: Store, clock: int, rules: int) -> None:
        self.store = store
        self.clock = clock
        self.rules = rules  # the entry's apply rules (commands.py): older entries keep theirs
        # Dead-letter moves authorized, leases bound to their consumer (RULES_ACCESS_CHECKED);
        # False for entries of the original rules (see the compatibility register).
        self.access_checked = rules >= RULES_ACCESS_CHECKED
        self.users: dict[str, UserInfo | None] = {}
        self.metas: dict[bytes, TopicMeta | QueueMeta | None] = {}  # None: no such name
        self.metas_changed: dict[bytes, None] = {}  # keys to write back, in first-change order
        self.names_checked: set[tuple[Kind, str]] = set()
        self.dedup_expired_none = False  # True once no dedup record is due at this clock
        self.deleted_none = False  # True once no deleted incarnation is left to purge
        # (incarnation, offset) of a topic's first stored message -> its publish_time_ms.
        self.topic_heads: dict[tuple[int, int], int] = {}

    # -- users --------------------------------------------------------------------------------

    def authenticated(self, key_hash: str) -> UserInfo:
        """Raises Unauthenticated for an unknown or revoked key."""
        try:
            user = self.users[key_hash]
        except KeyError:
            user = self.users[key_hash] = lookup_user(self.store, key_hash)
        return check_authenticated(user)

    def forget_user(self, key_hash: str) -> None:
        """Drop a cached user: its record was just written."""
        self.users.pop(key_hash, None)

    # -- housekeeping -------------------------------------------------------------------------

    def housekeep(self) -> None:
        """Runs before each command; writes only when there is something to purge."""
        self.purge_dedup()
        self.purge_deleted()

    def purge_dedup(self, budget: int = 0) -> None:
        """Remove dedup records expired at this clock, oldest first, at most `budget`
        (DEDUP_PURGE_PER_COMMAND when 0). The first page is one row: usually the oldest is not
        due."""
        if self.dedup_expired_none:
            return
        budget = budget or limits.DEDUP_PURGE_PER_COMMAND
        page_rows = 1
        while budget > 0:
            asked = min(page_rows, budget)
            rows = self.store.scan(keys.DEDUP_EXPIRY_PREFIX, limit=asked)
            for key, _ in rows:
                if keys.dedup_expiry_expires_at_ms(key) > self.clock:
                    # The clock stands still within an entry and new records expire later.
                    self.dedup_expired_none = True
                    return
                self.store.delete(key)
                self.store.delete(keys.dedup_expiry_dedup_key(key))
            if len(rows) < asked:
                self.dedup_expired_none = True
                return
            budget -= len(rows)
            page_rows = SCAN_PAGE

    def purge_deleted(self) -> None:
        """Remove up to DELETED_PURGE_PER_COMMAND records of the oldest deleted incarnation."""
        if self.deleted_none:
            return
        pending = self.store.scan(keys.DELETED_PREFIX, limit=1)
        if not pending:
            self.deleted_none = True  # until a delete in this entry adds a marker
            return
        marker = pending[0][0]
        incarnation = keys.deleted_incarnation_bytes(marker)
        budget = limits.DELETED_PURGE_PER_COMMAND
        for prefix in keys.INCARNATION_PREFIXES:
            rows = self.store.scan(prefix + incarnation, limit=budget)
            for key, _ in rows:
                self.store.delete(key)
            budget -= len(rows)
            if budget == 0:
                return  # maybe more left: the next command continues
        self.store.delete(marker)

    def mark_deleted(self, kind: Kind, incarnation: int) -> None:
        """Leave the records of a deleted incarnation to `purge_deleted`."""
        self.store.put(keys.deleted_key(incarnation), kind.value.encode())
        self.deleted_none = False

    # -- counters and names -------------------------------------------------------------------

    def bump(self, key: bytes, delta: int) -> int:
        value = get_counter(self.store, key) + delta
        self.store.put(key, keys.u64(value))
        return value

    def check_name(self, kind: Kind, name: str) -> None:
        """`check_name`, once per name and entry (a `validation.NameCheck`)."""
        if (kind, name) not in self.names_checked:
            check_name(kind, name)
            self.names_checked.add((kind, name))

    # -- metadata -----------------------------------------------------------------------------

    def load_meta(self, cls: type[Meta], key: bytes) -> Meta | None:
        """A private copy of the metadata under `key` as this entry has left it so far."""
        try:
            meta = self.metas[key]
        except KeyError:
            value = self.store.get(key)
            meta = self.metas[key] = None if value is None else keys.decode_meta(cls, value)
        if meta is None:
            return None
        assert isinstance(meta, cls), "t: and q: keys hold their own kinds"
        return meta.copy()

    def put_meta(self, key: bytes, meta: TopicMeta | QueueMeta) -> None:
        self.metas[key] = meta.copy()  # later changes to the caller's object are not stored
        self.metas_changed[key] = None

    def delete_meta(self, key: bytes) -> None:
        self.metas[key] = None
        self.metas_changed[key] = None

    def write_metas(self) -> None:
        """Store every metadata record the entry changed: once each, after its last command."""
        for key in self.metas_changed:
            meta = self.metas[key]
            if meta is None:
                self.store.delete(key)
            else:
                self.store.put(key, keys.encode_json(meta))
        self.metas_changed.clear()

    def topic_meta(self, name: str) -> TopicMeta | None:
        return self.load_meta(TopicMeta, keys.topic_meta_key(name))

    def queue_meta(self, name: str) -> QueueMeta | None:
        return self.load_meta(QueueMeta, keys.queue_meta_key(name))

    def existing_topic(self, name: str) -> TopicMeta:
        """The topic's metadata; the caller has checked the name (its command's validation)."""
        meta = self.topic_meta(name)
        if meta is None:
            raise NotFound(f'topic "{name}" does not exist')
        return meta

    def existing_queue(self, name: str) -> QueueMeta:
        """The queue's metadata; the caller has checked the name (its command's validation)."""
        meta = self.queue_meta(name)
        if meta is None:
            raise NotFound(f'queue "{name}" does not exist')
        return meta

    def put_topic_meta(self, name: str, meta: TopicMeta) -> None:
        self.put_meta(keys.topic_meta_key(name), meta)

    def put_queue_meta(self, name: str, meta: QueueMeta) -> None:
        self.put_meta(keys.queue_meta_key(name), meta)


def lookup_user(store: Store, key_hash: str) -> UserInfo | None:
    value = store.get(keys.user_key(key_hash))
    return None if value is None else keys.decode_user(value)


def check_authenticated(user: UserInfo | None) -> UserInfo:
    """Raises Unauthenticated for an unknown (None) or revoked user."""
    if user is None:
        raise Unauthenticated("unknown key")
    if user.revoked:
        raise Unauthenticated(f"the key of user {user.user_id} has been revoked")
    return user


def delivery_reply_bytes(name: str, producer_id: str, body: bytes) -> int:
    """What one delivery adds to a consume reply, at most; compared with CONSUME_BYTES_MAX."""
    return len(body) + len(name) + len(producer_id.encode()) + limits.DELIVERY_ENVELOPE_BYTES
