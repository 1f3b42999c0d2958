"""A history of client operations under faults, and the checker that judges it.

Clients record every operation as an invocation and its completion, Jepsen-style:

    invoke  -> ok       it happened (a publish was confirmed, an ack was accepted)
            -> fail     it certainly did not happen (refused before proposing)
            -> unknown  it may or may not have happened (timeout, leader change)

Message ids are unique strings "<producer>-<number>", so a delivery names its publish. After the
run the test drains every queue and reads every topic subscription to the end, then hands the
history, those final reads and each node's applied state to `check()`, which reports:

- lost:        a confirmed publish never delivered (to a consumer during the run or at the end)
- unexpected:  a delivery of an id nobody ever tried to publish
- duplicated:  a message delivered again after an ack of it was confirmed. A delivery is
               timed at the start of the consume call that returned it: a reply that arrives
               late (its node was paused) was handed out before the ack, not after.
- reordered:   a topic subscriber saw one producer's messages out of publish order
- divergence:  the nodes' applied states differ after healing
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    OK = "ok"
    FAIL = "fail"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Event:
    at: float  # monotonic seconds
    process: str  # which client
    operation: str  # "publish", "deliver", "ack"
    target: str  # "queue:jobs", "topic:news"
    message_id: str
    outcome: Outcome | None  # None for invocations and deliveries
    detail: str = ""  # e.g. the receipt's sequence, for reading a failure


@dataclass
class History:
    events: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        process: str,
        operation: str,
        target: str,
        message_id: str,
        outcome: Outcome | None = None,
        at: float | None = None,
        detail: str = "",
    ) -> None:
        when = time.monotonic() if at is None else at
        event = Event(when, process, operation, target, message_id, outcome, detail)
        with self._lock:
            self.events.append(event)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)


@dataclass
class Report:
    operations: int
    confirmed: int
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    reordered: list[str] = field(default_factory=list)
    divergent_nodes: list[str] = field(default_factory=list)

    @property
    def anomalies(self) -> dict[str, list[str]]:
        return {
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "divergence": self.divergent_nodes,
        }

    @property
    def valid(self) -> bool:
        return not any(self.anomalies.values())

    def summary(self) -> str:
        parts = [f"{self.operations} operations, {self.confirmed} confirmed publishes"]
        for name, examples in self.anomalies.items():
            if examples:
                parts.append(f"{name}: {len(examples)} (e.g. {examples[:5]})")
        return "; ".join(parts) if len(parts) > 1 else parts[0] + "; no anomalies"


def _producer_and_number(message_id: str) -> tuple[str, int]:
    producer, _, number = message_id.rpartition("-")
    return producer, int(number)


def check(
    events: Sequence[Event],
    final_reads: Mapping[str, Sequence[str]],
    topic_reads: Mapping[str, Sequence[str]] | None = None,
    node_states: Mapping[str, object] | None = None,
) -> Report:
    """Judge a history.

    `final_reads`: target -> ids drained from it after the run (queues).
    `topic_reads`: subscriber name -> every id it received from its topic, in order, during the
    run and after (each subscriber subscribed before any publish, so must see every one).
    `node_states`: node id -> its applied state, compared for divergence.
    """
    invoked: set[str] = set()
    confirmed: dict[str, str] = {}  # id -> target
    # A queue message is one delivery for all its competing consumers; a topic message is
    # delivered to each subscriber separately. Deliveries and acks are keyed accordingly.
    delivered_at: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    acked_at: dict[tuple[str, str, str], float] = {}

    def key(event: Event) -> tuple[str, str, str]:
        reader = event.process if event.target.startswith("topic:") else ""
        return event.target, reader, event.message_id

    for event in events:
        if event.operation == "publish" and event.outcome is None:
            invoked.add(event.message_id)
        elif event.operation == "publish" and event.outcome is Outcome.OK:
            confirmed[event.message_id] = event.target
        elif event.operation == "deliver":
            delivered_at[key(event)].append(event.at)
        elif event.operation == "ack" and event.outcome is Outcome.OK:
            acked_at.setdefault(key(event), event.at)

    report = Report(operations=len(events), confirmed=len(confirmed))
    seen_anywhere = {message_id for _target, _reader, message_id in delivered_at}
    for ids in final_reads.values():
        seen_anywhere.update(ids)
    queue_confirmed = {i for i, target in confirmed.items() if target.startswith("queue:")}
    report.lost.extend(sorted(queue_confirmed - seen_anywhere))
    report.unexpected.extend(sorted(i for i in seen_anywhere if i not in invoked))

    for (target, reader, message_id), ack_time in acked_at.items():
        if any(at > ack_time for at in delivered_at.get((target, reader, message_id), [])):
            report.duplicated.append(f"{message_id} ({target} {reader})".rstrip())
    for target, ids in final_reads.items():
        for message_id in ids:
            if (target, "", message_id) in acked_at:
                report.duplicated.append(f"{message_id} (in final read of {target})")

    topic_confirmed = {i for i, target in confirmed.items() if target.startswith("topic:")}
    for subscriber, ids in (topic_reads or {}).items():
        received = set(ids)
        report.lost.extend(
            f"{i} (subscriber {subscriber})" for i in sorted(topic_confirmed - received)
        )
        report.unexpected.extend(f"{i} (subscriber {subscriber})" for i in ids if i not in invoked)
        last: dict[str, int] = {}
        # An unacked message may legitimately come again after its lease: judge the order
        # of first deliveries.
        for message_id in dict.fromkeys(ids):
            producer, number = _producer_and_number(message_id)
            if number < last.get(producer, -1):
                report.reordered.append(
                    f"{message_id} after {producer}-{last[producer]} ({subscriber})"
                )
            last[producer] = max(number, last.get(producer, -1))

    if node_states:
        states = list(node_states.items())
        reference_node, reference = states[0]
        report.divergent_nodes.extend(
            f"{node} differs from {reference_node}"
            for node, state in states[1:]
            if state != reference
        )
    return report


def timeline(events: Sequence[Event], report: Report, limit: int = 5) -> list[str]:
    """Every event of the first `limit` anomalous ids, in wall-clock time (to read beside the
    nodes' logs) when the test fails."""
    ids = []
    for examples in report.anomalies.values():
        for example in examples:
            message_id = example.split(" ", 1)[0]
            if message_id not in ids and len(ids) < limit:
                ids.append(message_id)
    wall_offset = time.time() - time.monotonic()
    lines = []
    for event in sorted(events, key=lambda event: event.at):
        if event.message_id in ids:
            clock = time.strftime("%H:%M:%S", time.localtime(event.at + wall_offset))
            millis = int((event.at + wall_offset) % 1 * 1000)
            outcome = event.outcome.value if event.outcome else "invoke"
            lines.append(
                f"{clock}.{millis:03d} {event.process:8} {event.operation:7} {event.target:11} "
                f"{event.message_id:10} {outcome:7} {event.detail}".rstrip()
            )
    return lines


def table(rows: Iterable[tuple[str, Report]]) -> str:
    """One line per fault: the figures `make test-faults` prints."""
    header = ("fault", "ops", "confirmed", "lost", "unexp", "dup", "order", "div")
    lines = ["{:28} {:>7} {:>9} {:>5} {:>5} {:>5} {:>5} {:>4}".format(*header)]
    for fault, report in rows:
        lines.append(
            f"{fault:28} {report.operations:7d} {report.confirmed:9d} {len(report.lost):5d} "
            f"{len(report.unexpected):5d} {len(report.duplicated):5d} {len(report.reordered):5d} "
            f"{len(report.divergent_nodes):4d}"
        )
    return "\n".join(lines)
