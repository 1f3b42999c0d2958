"""The deterministic heart of Chasqui: applies committed entries to a key-value store.

Plain Python: no I/O, no clock, no randomness, no logging. Time arrives as data (`Entry.now_ms`,
stamped by the leader) and is folded into a stored clock that never goes backwards, so every
replica fed the same entries in the same order ends byte-identical and returns identical results.

All state lives in a `Store` passed in: the node passes a wrapper around an LMDB write transaction
(one per entry, aborted whole if `apply_entry` raises), tests pass `MemoryStore`.

Modules, by domain:

    keys          the key schema (the one reference for what the store holds) and value codecs
    store         the `Store` interface, `MemoryStore`, counters and paged scans
    context       `EntryContext`: store, clock, rules and caches of one entry; housekeeping
    machine       `StateMachine`: `apply_entry`, the dispatch table, the read-only queries
    users         create, ensure admin, revoke; authentication and the user listing
    access        ownership, access lists (`SetAccess`), per-user ownership counts
    membership    the member registry (`AddMember`, `RemoveMember`)
    topics        topics: create, delete, subscribe, publish, retention, consume, ack, nack
    queues        queues: create, delete, consumers, publish, overflow, dead letters
    queue_leases  queue consume, ack, nack and extend
    dedup         publish deduplication by (producer_id, sequence) runs

Handlers are plain functions `(ctx, user, command) -> Result`. The stateless rules of every
command are in `chasqui_node.validation`, shared with the service, which checks them before
proposing; each handler asserts them again where it always has.

Bounded work: no command loads a whole queue or topic. Per command, at most
`DEDUP_PURGE_PER_COMMAND` dedup records, `DELETED_PURGE_PER_COMMAND` records of deleted
incarnations and `RETENTION_PURGE_PER_COMMAND` expired topic or queue messages are removed;
counters live in the metadata records.

Refusals: each handler validates fully (raising a `ChasquiError`) before its first write;
`apply_entry` turns the raise into the command's result, so a refused command writes nothing.
Topic and queue metadata an entry changes is kept decoded and stored once, after the entry's last
command (see `EntryContext`); the stored bytes are the same as writing it after every command.
Housekeeping (dedup expiry, purging deleted incarnations) runs before each command and writes
only when there is something to purge.

Compatibility register
----------------------
Released formats must still be read: every replica applies the whole log, older entries
included, and a store or snapshot keeps records written by every release it has run. Each shim
below reads something an older release wrote. "Entries" shims can go once no cluster runs a
release from before the one named and every node's log has been compacted past the upgrade
(a snapshot taken after it); "records" shims need, beyond that, that no store still holds such
a record (a migration that rewrites them, or a cluster started afresh), unless they expire on
their own as said. Releases are named by the change that ended the old format (commit).

1. Text entries, versions 1 and 2 (`str`, JSON with base64 bodies): `entries.decode_entry`
   and `_decode_json_entry` with `_RULES_OF_TEXT_VERSION`. Every entry before packed entries
   (d3c5496) is text. Entries: when no cluster runs a release from before packed entries. The
   reader stays as long as `encode_for_raft` falls back to text for a list value the packed
   format cannot hold (an integer outside int64, such as an ack of sequence 2**64 - 1).
2. Packed entries version 2 and text version 1, apply rules 1 (`RULES_ORIGINAL`):
   `commands._RULES_OF_PACKED_VERSION` / `_RULES_OF_TEXT_VERSION`, and every branch on
   `EntryContext.access_checked` being False:
   - `queues.create_queue`: a dead-letter queue is taken without checking the creator may
     publish to it;
   - `queues.dead_letter`: dead letters move without checking the owner may still publish to
     the dead-letter queue, or that it is the incarnation that existed at create;
   - `queue_leases._lease_mark`: a lease is marked b"L" alone, naming no lessee;
   - `queue_leases._check_lessee`: anyone allowed to consume may ack, nack or extend a lease.
   Entries: when no cluster runs a release from before "a queue lease belongs to the user
   that consumed it" (a824225; the last release before it is 73f4132).
3. Leases marked b"L" alone (V records written under rules 1): `queue_leases._check_lessee`
   lets anyone allowed to consume settle them (its `if lessee` test) under either rules.
   Records: from before a824225; such a mark is replaced when its message is consumed again,
   and goes when the message is acked or dropped.
4. Commands that end early: `commands._FIELDS_ADDED_LATER` decodes a `Consume` written before
   `next_offset` existed with -1 (no resume). Entries: from before "a consume reply lost in a
   failover is neither skipped nor delivered out of order" (6bbf148).
5. The single `Ack` command (tag 9): `machine._ack`. The service has sent one `AckBatch` per
   queue or topic since "acks travel as one AckBatch command" (18eb0cf); before it, one `Ack`
   per delivery. Entries: when no cluster runs a release from before 18eb0cf.
6. Dedup records of 16 bytes (>QQ position, expires_at_ms, one producer sequence each):
   `keys.DedupRun.decode` reads one as a run of one. Records: from before dedup runs
   (49a94ad), and none is written since; each expires DEDUP_WINDOW_MS after it was written
   and is then purged, oldest first, by the commands that follow (DEDUP_PURGE_PER_COMMAND
   each), so a store that has applied enough commands since the upgrade holds none.
7. Users without an `i:` index record: `users.key_hash_of` scans every `u:` record when the
   index has no entry (revoking such a user, or dead-lettering from a queue it owns). Records:
   users created before "admins, revoked keys, access lists" (1f5e842).
8. Topic and queue metadata without access lists: `keys.TopicMeta` / `keys.QueueMeta` decode a
   record lacking `publishers` / `consumers` with empty lists (anyone may). Records: from
   before 1f5e842; a record is rewritten whole (with both lists) by the next command that
   changes it (a publish, for one).
9. Ownership counts that miss what was created before they were kept: `access._count_owned`
   never goes below zero, so deleting such a topic or queue does not make room twice.
   Records: topics and queues created before 1f5e842 (no `o:t:` / `o:q:` count); the clamp can
   go once every one of them is deleted.

Cursors written before consume windows existed (40 bytes, no window starts) need no shim: they
are what `keys.Cursor` encodes for a cursor with no open windows.
"""

from chasqui_node.state.machine import StateMachine
from chasqui_node.state.store import MemoryStore, Store

__all__ = ["MemoryStore", "StateMachine", "Store"]
