"""The fault suite's checker catches each anomaly on hand-made histories, and passes a clean
one: a checker that cannot fail would make every fault test meaningless."""

from __future__ import annotations

from tests.faults.checker import Event, Outcome, check, timeline

Q = "queue:jobs"
T = "topic:news"


def publish(at: float, message_id: str, outcome: Outcome, target: str = Q) -> list[Event]:
    return [
        Event(at, "p", "publish", target, message_id, None),
        Event(at + 0.1, "p", "publish", target, message_id, outcome),
    ]


def deliver(at: float, message_id: str, reader: str = "c", target: str = Q) -> Event:
    return Event(at, reader, "deliver", target, message_id, None)


def ack(at: float, message_id: str, reader: str = "c", target: str = Q) -> Event:
    return Event(at, reader, "ack", target, message_id, Outcome.OK)


def test_a_clean_history_has_no_anomalies() -> None:
    events = [
        *publish(1, "p-0", Outcome.OK),
        *publish(2, "p-1", Outcome.UNKNOWN),
        deliver(3, "p-0"),
        ack(4, "p-0"),
        deliver(3.5, "p-1"),  # an unknown publish may appear once
    ]
    report = check(events, {Q: []})
    assert report.valid, report.summary()
    assert report.confirmed == 1


def test_a_confirmed_publish_never_delivered_is_lost() -> None:
    report = check(publish(1, "p-0", Outcome.OK), {Q: []})
    assert report.lost == ["p-0"]


def test_a_confirmed_publish_found_only_in_the_final_read_is_not_lost() -> None:
    report = check(publish(1, "p-0", Outcome.OK), {Q: ["p-0"]})
    assert report.valid


def test_a_delivery_nobody_published_is_unexpected() -> None:
    report = check([deliver(1, "ghost-7")], {Q: ["ghost-8"]})
    assert sorted(report.unexpected) == ["ghost-7", "ghost-8"]


def test_a_delivery_after_a_confirmed_ack_is_a_duplicate() -> None:
    events = [*publish(1, "p-0", Outcome.OK), deliver(2, "p-0"), ack(3, "p-0"), deliver(4, "p-0")]
    assert len(check(events, {Q: []}).duplicated) == 1
    assert len(check(events[:-1], {Q: ["p-0"]}).duplicated) == 1  # acked, then drained again


def test_a_redelivery_before_any_ack_is_not_a_duplicate() -> None:
    events = [*publish(1, "p-0", Outcome.OK), deliver(2, "p-0"), deliver(3, "p-0"), ack(4, "p-0")]
    assert check(events, {Q: []}).valid


def test_topic_acks_are_per_subscriber() -> None:
    events = [
        *publish(1, "p-0", Outcome.OK, T),
        deliver(2, "p-0", "s0", T),
        ack(3, "p-0", "s0", T),
        deliver(4, "p-0", "s1", T),  # the other subscriber's first delivery
    ]
    report = check(events, {}, topic_reads={"s0": ["p-0"], "s1": ["p-0"]})
    assert report.valid, report.summary()


def test_a_subscriber_missing_a_confirmed_topic_message_loses_it() -> None:
    events = [*publish(1, "p-0", Outcome.OK, T), *publish(2, "p-1", Outcome.OK, T)]
    report = check(events, {}, topic_reads={"s0": ["p-0", "p-1"], "s1": ["p-1"]})
    assert report.lost == ["p-0 (subscriber s1)"]


def test_one_producers_messages_out_of_order_on_a_topic_are_reordered() -> None:
    events = [*publish(1, "p-0", Outcome.OK, T), *publish(2, "p-1", Outcome.OK, T)]
    report = check(events, {}, topic_reads={"s0": ["p-1", "p-0"]})
    assert len(report.reordered) == 1


def test_a_redelivered_earlier_message_is_not_reordering() -> None:
    events = [*publish(1, "p-0", Outcome.OK, T), *publish(2, "p-1", Outcome.OK, T)]
    report = check(events, {}, topic_reads={"s0": ["p-0", "p-1", "p-0", "p-1"]})
    assert report.valid, report.summary()


def test_nodes_with_different_state_diverge() -> None:
    report = check([], {}, node_states={"n1": [(b"k", b"1")], "n2": [(b"k", b"2")]})
    assert report.divergent_nodes == ["n2 differs from n1"]


def test_a_late_reply_to_a_consume_started_before_the_ack_is_not_a_duplicate() -> None:
    """Deliveries are timed at the start of their consume call: a paused node's reply may
    arrive after another consumer acked the redelivered message."""
    events = [
        *publish(1, "p-0", Outcome.OK),
        deliver(2, "p-0", reader="slow"),  # consume started at 2, reply arrived much later
        deliver(3, "p-0", reader="fast"),  # redelivered after the lease expired
        ack(4, "p-0", reader="fast"),
    ]
    assert check(events, {Q: []}).valid


def test_the_timeline_shows_every_event_of_the_anomalous_ids_in_order() -> None:
    events = [
        *publish(1, "p-0", Outcome.OK),
        *publish(2, "p-1", Outcome.OK),
        deliver(3, "p-1"),
        ack(4, "p-1"),
        deliver(5, "p-1"),
    ]
    report = check(events, {Q: []})
    lines = timeline(events, report)
    assert [line.split()[1:5] for line in lines] == [
        ["p", "publish", Q, "p-0"],  # lost
        ["p", "publish", Q, "p-0"],
        ["p", "publish", Q, "p-1"],  # duplicated after its ack
        ["p", "publish", Q, "p-1"],
        ["c", "deliver", Q, "p-1"],
        ["c", "ack", Q, "p-1"],
        ["c", "deliver", Q, "p-1"],
    ]
    assert timeline([*events[:2], deliver(3, "p-0")], check(events[:2], {Q: ["p-0"]})) == []
