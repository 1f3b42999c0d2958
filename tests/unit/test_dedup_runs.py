"""Proves dedup runs keep exactly the per-publish dedup rules while storing one record per
stretch of consecutive producer sequences.

A command's new publishes with consecutive producer sequences get consecutive sequences or
offsets, so one run (first, last, position of the first, expiry) stands for all of them. The
model below is the rule itself, one remembered publish per producer sequence; random
histories of batches (in and out of order, repeats, retries, expiries) must answer exactly the
model's receipts, on queues and topics, with records from before runs mixed in. The store
must also stay bounded: expired runs are purged as fast as commands write them."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_node import limits
from chasqui_node.commands import Kind, Publish, PublishBatch, Receipt, Receipts
from chasqui_node.state.keys import dedup_prefix
from tests.unit.test_publish_batch import batch, receipts
from tests.unit.test_state_machine import ALICE, Broker, Q, T, keys_with_prefix

WINDOW_MS = limits.DEDUP_WINDOW_MS


def dedup_records(broker: Broker) -> list[tuple[bytes, bytes]]:
    return [(key, value) for key, value in broker.store.items() if key.startswith(b"D")]


@pytest.fixture
def broker() -> Broker:
    broker = Broker()
    broker.queue()
    return broker


def test_a_batch_of_consecutive_sequences_is_one_run(broker: Broker) -> None:
    assert receipts(broker.one(batch([b"m"] * 100, sequences=list(range(500, 600))))) == [
        (position, False) for position in range(100)
    ]
    assert len(dedup_records(broker)) == len(keys_with_prefix(broker, b"E")) == 1


def test_a_duplicate_inside_a_run_gets_its_own_position(broker: Broker) -> None:
    broker.one(batch([b"m"] * 10, sequences=list(range(20, 30))))
    broker.one(batch([b"n"] * 5, sequences=list(range(30, 35))))
    retry = batch([b"m", b"x", b"n"], sequences=[27, 99, 31])
    assert receipts(broker.one(retry)) == [(7, True), (15, False), (11, True)]


def test_scattered_sequences_make_several_runs_that_all_deduplicate(broker: Broker) -> None:
    sequences = [5, 6, 7, 1, 2, 9, 3]
    assert receipts(broker.one(batch([b"m"] * 7, sequences=sequences))) == [
        (position, False) for position in range(7)
    ]
    assert len(dedup_records(broker)) == 4  # 5-7, 1-2, 9, 3
    assert receipts(broker.one(batch([b"m"] * 8, sequences=[3, 2, 1, 9, 8, 7, 6, 5]))) == [
        (6, True),
        (4, True),
        (3, True),
        (5, True),
        (7, False),
        (2, True),
        (1, True),
        (0, True),
    ]


def test_sequences_far_apart_are_two_runs(broker: Broker) -> None:
    """Deciding whether a batch is one run must not build the span between its ends (found by
    the service fuzz test: 0 and 2**63 - 1 in one batch failed with INTERNAL)."""
    far = limits.OFFSET_MAX
    assert receipts(broker.one(batch([b"a", b"b"], sequences=[0, far]))) == [(0, False), (1, False)]
    assert receipts(broker.one(batch([b"b", b"a"], sequences=[far, 0]))) == [(1, True), (0, True)]
    assert len(dedup_records(broker)) == 2


def test_a_record_from_before_runs_still_deduplicates_and_expires(broker: Broker) -> None:
    """A 16-byte record (position, expiry) written by an older node is a run of one."""
    incarnation = 1
    key = dedup_prefix(incarnation, "p1") + struct.pack(">Q", 42)
    expires = broker.now_ms + 1000
    broker.store.put(key, struct.pack(">QQ", 7, expires))
    broker.store.put(b"E" + struct.pack(">Q", expires) + key[1:], b"")
    assert keys_with_prefix(broker, b"q:") == [b"q:jobs"]  # the queue is incarnation 1
    assert receipts(broker.one(batch([b"m", b"n"], sequences=[42, 43]))) == [(7, True), (0, False)]
    broker.advance(1000)
    assert receipts(broker.one(batch([b"m"], sequences=[42]))) == [(1, False)]
    assert receipts(broker.one(batch([b"m"], sequences=[42]))) == [(1, True)]
    assert key in dict(dedup_records(broker))  # replaced by the new run of one at 42
    assert len(keys_with_prefix(broker, b"E")) == len(dedup_records(broker)) == 2


def test_an_expired_run_is_replaced_not_overlapped(broker: Broker) -> None:
    broker.one(batch([b"m"] * 10, sequences=list(range(10))))
    broker.advance(WINDOW_MS)
    broker.run()  # nothing purges: the run is expired but stored
    assert receipts(broker.one(batch([b"m"] * 3, sequences=[4, 5, 6]))) == [
        (10, False),
        (11, False),
        (12, False),
    ]
    # 0-3 and 7-9 of the expired run are no longer remembered, 4-6 are.
    assert receipts(broker.one(batch([b"m"] * 3, sequences=[3, 5, 7]))) == [
        (13, False),
        (11, True),
        (14, False),
    ]


def test_scattered_sequences_cannot_outgrow_the_purge(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch writes 50 runs (every other sequence); the purge of 4 per command alone
    would fall behind, so a command purges as many expired runs as it wrote."""
    monkeypatch.setattr(limits, "DEDUP_PURGE_PER_COMMAND", 4)
    for round_number in range(6):
        first = round_number * 100
        sequences = list(range(first, first + 100, 2))
        broker.one(batch([b"m"] * 50, sequences=sequences))
        broker.advance(WINDOW_MS)
    assert len(dedup_records(broker)) <= 2 * 50


# -- the rule, as a model ---------------------------------------------------------------------

HISTORY = st.lists(
    st.one_of(
        st.tuples(
            st.just("batch"),
            st.sampled_from(["p1", "p2", ""]),
            st.lists(st.integers(0, 30) | st.just(limits.OFFSET_MAX), min_size=0, max_size=12),
        ),
        st.tuples(st.just("wait"), st.sampled_from([1, WINDOW_MS // 2, WINDOW_MS]), st.just([])),
        st.tuples(st.just("legacy"), st.just("p1"), st.lists(st.integers(0, 30), max_size=3)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HISTORY, st.sampled_from([Q, T]))
def test_runs_answer_like_one_record_per_publish(
    history: list[tuple[str, object, list[int]]], kind: Kind
) -> None:
    broker = Broker()
    name = "jobs" if kind is Q else "news"
    if kind is Q:
        broker.queue()
    else:
        broker.topic()
    remembered: dict[tuple[str, int], tuple[int, int]] = {}  # -> (position, expires_at_ms)
    next_position = 0
    for step, argument, sequences in history:
        if step == "wait":
            assert isinstance(argument, int)
            broker.advance(argument)
            continue
        producer = str(argument)
        if step == "legacy":  # records an older node wrote: one per publish
            for sequence in sequences:
                if (producer, sequence) in remembered:
                    continue
                result = broker.one(Publish(ALICE, kind, name, b"m", producer, sequence))
                assert isinstance(result, Receipt)
                remembered[(producer, sequence)] = (result.sequence, broker.now_ms + WINDOW_MS)
                if not result.duplicate:
                    next_position += 1
            continue
        command = PublishBatch(
            ALICE,
            kind,
            name,
            producer,
            (b"m",) * len(sequences),
            tuple(sequences),
            (0,) * len(sequences),
        )
        expected: list[tuple[int, bool]] = []
        in_batch: dict[int, int] = {}
        for sequence in sequences:
            live = remembered.get((producer, sequence))
            if producer and live is not None and live[1] > broker.now_ms:
                expected.append((live[0], True))
            elif producer and sequence in in_batch:
                expected.append((in_batch[sequence], True))
            else:
                expected.append((next_position, False))
                in_batch[sequence] = next_position
                next_position += 1
        result = broker.one(command)
        assert isinstance(result, Receipts), result
        assert receipts(result) == expected
        if producer:
            for sequence, position in in_batch.items():
                remembered[(producer, sequence)] = (position, broker.now_ms + WINDOW_MS)
