"""Deduplication of publishes: a `(producer_id, sequence)` seen within the dedup window answers
with its original receipt. One record (a run) stands for a stretch of consecutive producer
sequences published by one command; records expire in time order (`EntryContext.purge_dedup`).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from chasqui_node import limits
from chasqui_node.commands import PublishBatch, Receipt
from chasqui_node.state import keys
from chasqui_node.state.context import EntryContext
from chasqui_node.state.keys import DedupRun


class NewMessage(NamedTuple):
    """A batch item that is not a duplicate, with the sequence or offset it will be given.
    (A named tuple rather than a frozen dataclass: one is built per published message, and a
    frozen dataclass's constructor costs several times as much.)"""

    body: bytes
    delay_ms: int
    producer_sequence: int
    position: int


class BatchPlan(NamedTuple):
    """What `plan_batch` decided: every item's receipt, the new items, the dedup key prefix of
    the producer (b"" without a producer id) and the expired runs the new items replace."""

    receipts: list[Receipt]
    new_messages: list[NewMessage]
    dedup_prefix: bytes
    expired_runs: list[DedupRun]


def plan_batch(
    ctx: EntryContext, incarnation: int, command: PublishBatch, next_position: int
) -> BatchPlan:
    """Every item's receipt, and the items that are new with the sequence or offset each
    will get. Writes nothing. An item repeating an earlier item of the same batch is a
    duplicate of that item."""
    kind, name, sequences = command.kind, command.name, command.sequences
    dedup_prefix = b""
    if command.producer_id:
        dedup_prefix = keys.dedup_prefix(incarnation, command.producer_id)
    if not sequences or not dedup_prefix or _none_published(ctx, dedup_prefix, sequences):
        positions = range(next_position, next_position + len(sequences))
        return BatchPlan(
            [Receipt(kind, name, position, False) for position in positions],
            list(map(NewMessage, command.bodies, command.delays_ms, sequences, positions)),
            dedup_prefix,
            [],
        )
    receipts: list[Receipt] = []
    new_messages: list[NewMessage] = []
    planned: dict[int, int] = {}
    expired: dict[bytes, DedupRun] = {}
    for body, sequence, delay_ms in zip(command.bodies, sequences, command.delays_ms, strict=True):
        run = _dedup_run(ctx, dedup_prefix, sequence)
        original = planned.get(sequence)
        if run is not None and run.expires_at_ms > ctx.clock:
            original = run.position + sequence - run.first
        elif run is not None:
            expired[run.key] = run  # expired, not purged yet: publish anew
        if original is not None:
            receipts.append(Receipt(kind, name, original, duplicate=True))
            continue
        position = next_position + len(new_messages)
        planned[sequence] = position
        new_messages.append(NewMessage(body, delay_ms, sequence, position))
        receipts.append(Receipt(kind, name, position, duplicate=False))
    return BatchPlan(receipts, new_messages, dedup_prefix, list(expired.values()))


def remember_publishes(ctx: EntryContext, plan: BatchPlan) -> None:
    """Write the dedup runs of a command's new messages (after the messages): each stretch
    of consecutive producer sequences is one run (their positions are consecutive by
    construction). Expired runs holding any of them go first, so runs never overlap."""
    store = ctx.store
    for run in plan.expired_runs:
        store.delete(keys.dedup_expiry_key(run.expires_at_ms, run.key))
        store.delete(run.key)
    new_messages = plan.new_messages
    if not plan.dedup_prefix or not new_messages:
        return
    expires_at_ms = ctx.clock + limits.DEDUP_WINDOW_MS
    first = new_messages[0]
    sequences = [message.producer_sequence for message in new_messages]
    consecutive_span = sequences[-1] - sequences[0] == len(sequences) - 1
    if consecutive_span and sequences == list(range(sequences[0], sequences[-1] + 1)):
        runs = [(first, new_messages[-1])]  # the usual batch: one run
    else:
        runs = []
        for previous, message in itertools.pairwise(new_messages):
            if message.producer_sequence != previous.producer_sequence + 1:
                runs.append((first, previous))
                first = message
        runs.append((first, new_messages[-1]))
    for start, end in runs:
        key = keys.dedup_key(plan.dedup_prefix, start.producer_sequence)
        store.put(key, keys.encode_dedup_run(end.producer_sequence, start.position, expires_at_ms))
        store.put(keys.dedup_expiry_key(expires_at_ms, key), b"")
    if expires_at_ms <= ctx.clock:
        ctx.dedup_expired_none = False  # a zero dedup window: due at once
    if len(runs) > 1:
        # A command purges as many expired runs as it wrote beyond the one of a usual
        # batch, so scattered sequences cannot outgrow the purge.
        ctx.purge_dedup(len(runs))


def _dedup_run(ctx: EntryContext, dedup_prefix: bytes, producer_sequence: int) -> DedupRun | None:
    """The stored run holding `producer_sequence`, live or expired, if any."""
    found = ctx.store.floor(dedup_prefix, keys.dedup_key(dedup_prefix, producer_sequence))
    if found is None:
        return None
    run = DedupRun.decode(*found)
    return run if producer_sequence <= run.last else None


def _none_published(ctx: EntryContext, dedup_prefix: bytes, sequences: tuple[int, ...]) -> bool:
    """Whether no stored run (live or expired) holds any of `sequences` and none repeats:
    then every item is new. Two lookups for the batch (runs never overlap: the run below
    the lowest sequence, and the first run starting at or above it) instead of one per
    item, which stays the path for retries."""
    if len(set(sequences)) != len(sequences):
        return False
    low = min(sequences)
    low_key = keys.dedup_key(dedup_prefix, low)
    below = ctx.store.floor(dedup_prefix, low_key)
    if below is not None and DedupRun.decode(*below).last >= low:
        return False
    above = ctx.store.scan(dedup_prefix, low_key, limit=1)
    return not above or DedupRun.decode(*above[0]).first > max(sequences)
