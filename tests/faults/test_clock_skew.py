"""Fault tests for cluster time: one node's bad wall clock must not bend leases, TTLs or delays.

What they prove. Leases, delays and TTLs run on cluster time, which the leader stamps into
every Raft entry. Here one node of three (n1) runs under libfaketime with its wall clock an
hour ahead, an hour behind, or stepped ten minutes forward while it leads; its monotonic clock
stays real (FAKETIME_DONT_FAKE_MONOTONIC=1), as an NTP step would leave it. The two correct
nodes start the cluster, so a correct clock starts cluster time; then n1 joins and is made
leader (its rivals paused until it has campaigned to a higher term). For the hour skews,
leadership then moves to a correct node (n1 paused until another node leads, then continued
as a follower). Measured with this process's monotonic clock, through clients of the correct
nodes, for messages of the skewed leader's term (watched across the change of leader or the
clock step) and for messages after it:
- a message leased for 2 s and not acked comes back 1.5 to 6 s after the consume;
- a message published with a 5 s delay arrives 4 to 8 s after the publish;
- of two messages with a TTL, one is still there shortly before it ends and the other gone
  shortly after: 6 s (checked at 5.5 and 7 s) in `make test`, 60 s (55 and 65 s) in the runs
  marked slow, which `make test-faults` adds;
- /metrics shows `chasqui_clock_skew_seconds` near 0 on the correct nodes and near the fault
  on n1.
One more scenario has no bad clock at all: n1 joins only after the cluster has been idle a few
seconds, so the newest entry it applies while catching up is that old; it leads, then hands
over. Cluster time must not lose that idle spell while n1 leads (the same checks).
Then the queue-and-topic workload of runner.py runs across the skewed leader's terms and the
changes of leader (or across the steps of the leader's clock), and the checker must find no
lost, duplicated or reordered message and no divergence.

libfaketime comes from Debian's `faketime` package (`make install-test` installs it when run
as root); without it these tests skip and say why. Every wait is bounded; every process is
stopped by PID, paused ones continued first, pass or fail.
"""

from __future__ import annotations

import contextlib
import email.utils
import glob
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chasqui_client import Client, errors
from tests.faults.checker import Report, table
from tests.faults.runner import Nemesis, fault_seconds, run_fault
from tests.harness import REPO_ROOT, Cluster, free_port_block, scrape_metrics, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

SECONDS = fault_seconds(6.0)
SKEWED = "n1"
CORRECT = ("n2", "n3")
HOUR_S = 3600.0
STEP_S = 600.0  # the forward step of the leader's wall clock mid-run

# Debian ships it per architecture, e.g. /usr/lib/x86_64-linux-gnu/faketime/.
FAKETIME_LIBRARIES = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
SITE_DIR = Path(__file__).resolve().parent / "faketime_site"  # see its sitecustomize.py

LEASE_S = 2.0
LEASE_BACK_S = (1.5, 6.0)  # after the consume
DELAY_S = 5.0
DELAY_ARRIVES_S = (4.0, 8.0)  # after the publish
TTL_SHORT_S = 6.0
TTL_LONG_S = 60.0
WATCH_PAST_S = 2.0  # a probe watches this long past its bound, to say how late it was
POLL_S = 0.25  # long-poll of each probe's consumes
SKEW_NEAR_S = 5.0  # a correct node's gauge within this of 0
SKEW_FAULT_NEAR_S = 30.0  # n1's gauge within this of its fault
SKEW_WAIT_S = 15.0
CLOCK_OFFSET_NEAR_S = 3.0  # n1's wall clock, read from its HTTP Date header (whole seconds)
LEAD_ATTEMPTS_MAX = 8
CAMPAIGN_WAIT_S = 10.0

RESULTS: list[tuple[str, Report]] = []
CLOCK_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def print_tables() -> Iterator[None]:
    yield
    if CLOCK_ROWS:
        header = (
            f"{'clock fault':30} {'messages':12} {'lease s':>8} {'delay s':>8} "
            f"{'ttl':>13} {'cluster-wall s':>14}  verdict"
        )
        print("\n\n" + "\n".join([header, *CLOCK_ROWS]))
    if RESULTS:
        print("\n\n" + table(RESULTS))


def assert_valid(fault: str, report: Report) -> None:
    RESULTS.append((fault, report))
    assert report.confirmed > 0, "nothing was confirmed: the fault test proved nothing"
    assert report.valid, report.summary()


def ttl_checks_s(ttl_s: float) -> tuple[float, float]:
    """When a TTL message must still be there, and when it must be gone, after its publish:
    5.5 and 7 s for 6 s, 55 and 65 s for 60 s."""
    return ttl_s - max(0.5, ttl_s / 12), ttl_s + max(1.0, ttl_s / 12)


def faketime_environment(settings: dict[str, str]) -> dict[str, str]:
    """The environment that runs a node under libfaketime, its monotonic clock left real.

    With the monotonic clock left alone, libfaketime 0.9.10 still rewrites the deadline of a
    timed wait on a CLOCK_MONOTONIC condition variable by the faked offset (its "forced
    monotonic fix", on by default with glibc >= 2.30), so such waits end at once or far too
    late and the node ran several times slower; FAKETIME_FORCE_MONOTONIC_FIX=0 passes the
    deadline through unchanged. `time.sleep` needs sitecustomize.py in SITE_DIR."""
    if not FAKETIME_LIBRARIES:
        pytest.skip(
            "libfaketime is not installed (Debian package faketime; `make install-test` "
            "installs it when run as root)"
        )
    return {
        "LD_PRELOAD": FAKETIME_LIBRARIES[0],
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_FORCE_MONOTONIC_FIX": "0",
        "PYTHONPATH": f"{SITE_DIR}{os.pathsep}{REPO_ROOT}",
        **settings,
    }


def wall_clock_offset_s(metrics_port: int) -> float:
    """A running node's wall clock minus this process's, from the Date header of its /metrics
    answer (whole seconds, so good to about a second)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        date = answer.headers["Date"]
    return email.utils.parsedate_to_datetime(date).timestamp() - time.time()


def skew_gauges(metrics_port: int) -> list[float]:
    samples = scrape_metrics(metrics_port)
    return [value for (name, _), value in samples.items() if name == "chasqui_clock_skew_seconds"]


@dataclass
class SkewedCluster:
    """Three nodes; n1 runs under libfaketime and starts only when `join_skewed` is called."""

    cluster: Cluster
    metrics_ports: dict[str, int]
    owner_key: str = ""
    clients: list[Client] = field(default_factory=list)
    fresh_entries: int = 0

    def start_node(self, node_id: str) -> None:
        self.cluster.start_node(node_id, ["--metrics-port", str(self.metrics_ports[node_id])])

    def client(self) -> Client:
        """A client of the correct nodes (it follows leader hints to n1 while n1 leads). Short
        attempts: a paused n1 holds up a call 2 s at most before it tries another node."""
        endpoints = [self.cluster.nodes[node_id].client_address for node_id in CORRECT]
        client = Client(
            endpoints, key=self.owner_key or None, call_timeout_s=20, attempt_timeout_s=2
        )
        self.owner_key = client.key
        self.clients.append(client)
        return client

    def join_skewed(self, offset_s: float, fresh: bool = True) -> None:
        """Start n1, let it catch up, and check that its wall clock is off by `offset_s`.

        A node knows cluster time only from the entries it applies, so one that caught up on
        entries stamped a while ago trails cluster time by that while until a newer entry comes
        (scenario (e) below). `fresh` commits one more entry once n1 has caught up, so that the
        skew scenarios test the skew alone."""
        self.start_node(SKEWED)
        self.cluster.wait_converged()
        if fresh:
            self.fresh_entries += 1
            self.client().create_queue(f"fresh-{self.fresh_entries}")
            self.cluster.wait_converged()
        self.wait_offset(offset_s)

    def wait_offset(self, offset_s: float) -> float:
        port = self.metrics_ports[SKEWED]
        return wait_until(
            lambda: abs(wall_clock_offset_s(port) - offset_s) < CLOCK_OFFSET_NEAR_S,
            20,
            f"n1's wall clock to run {offset_s:+.0f} s off this process's",
        )


@contextlib.contextmanager
def skewed_cluster(root: Path, environment: dict[str, str]) -> Iterator[SkewedCluster]:
    """n2 and n3 started (and a leader among them); every process stopped afterwards."""
    cluster = Cluster(root, environments={SKEWED: environment})
    taken = {int(node.client_address.rsplit(":", 1)[1]) for node in cluster.nodes.values()}
    taken |= {int(node.raft_address.rsplit(":", 1)[1]) for node in cluster.nodes.values()}
    base = free_port_block(len(cluster.nodes))
    while taken & set(range(base, base + len(cluster.nodes))):
        base = free_port_block(len(cluster.nodes))
    ports = {node_id: base + index for index, node_id in enumerate(cluster.nodes)}
    skewed = SkewedCluster(cluster, ports)
    try:
        for node_id in CORRECT:
            skewed.start_node(node_id)
        cluster.wait_for_leader()
        yield skewed
    finally:
        for client in skewed.clients:
            client.close()
        for node in cluster.nodes.values():  # a paused process would ignore SIGTERM
            if node.alive() and node.process is not None:
                node.process.send_signal(signal.SIGCONT)
        cluster.close()


# -- leadership --------------------------------------------------------------------------------


def lead_with(cluster: Cluster, node_id: str) -> None:
    """Make `node_id` the leader: while another node leads, pause both other nodes until
    `node_id` has campaigned alone to a higher term, continue the one that did not lead (it
    votes for that higher term), and once someone leads, the old leader."""
    for _ in range(LEAD_ATTEMPTS_MAX):
        leader = cluster.wait_for_leader()
        if leader == node_id:
            return
        others = [other for other in cluster.nodes if other != node_id]
        term = cluster.node_status(node_id).term
        paused: list[str] = []
        try:
            for other in others:
                cluster.kill(other, signal.SIGSTOP)
                paused.append(other)
            wait_until(
                lambda term=term: cluster.node_status(node_id).term >= term + 2,
                CAMPAIGN_WAIT_S,
                f"{node_id} to campaign alone",
            )
            for other in others:
                if other != leader:
                    cluster.kill(other, signal.SIGCONT)
                    paused.remove(other)
            cluster.wait_for_leader(exclude=leader)
        finally:
            for other in paused:
                cluster.kill(other, signal.SIGCONT)
    assert cluster.wait_for_leader() == node_id, f"{node_id} did not win an election"


def move_leadership_off(cluster: Cluster, node_id: str) -> str:
    """Pause the leader `node_id` until another node leads, then continue it as a follower."""
    try:
        cluster.kill(node_id, signal.SIGSTOP)
        cluster.wait_for_leader(exclude=node_id)
    finally:
        cluster.kill(node_id, signal.SIGCONT)
    return cluster.wait_for_leader(exclude=node_id)


# -- timed messages ----------------------------------------------------------------------------


@dataclass
class Arrival:
    """When a watched message came (seconds after the call that set it up returned), and
    whether that was too early or too late. `after_s` is None when it never came."""

    after_s: float | None
    early: bool
    late: bool
    errors: int

    def cell(self) -> str:
        return "never" if self.after_s is None else f"{self.after_s:.1f}"


@dataclass
class TtlOutcome:
    present_at_s: float
    present: bool
    gone_by_s: float
    gone: bool

    def cell(self) -> str:
        return f"{'kept' if self.present else 'LOST'}/{'gone' if self.gone else 'KEPT'}"


class TimedMessages:
    """One phase's leased, delayed and expiring messages, set up together and each watched on
    its own thread with its own client."""

    def __init__(self, phase: str, ttl_s: float) -> None:
        self.phase = phase
        self.ttl_s = ttl_s
        self.lease_queue = f"lease-{phase}"
        self.delay_queue = f"delay-{phase}"
        self.ttl_queue = f"ttl-{phase}"
        self.cluster_minus_wall_s = 0.0
        self._lease: Future[Arrival] | None = None
        self._delay: Future[Arrival] | None = None
        self._ttl: Future[TtlOutcome] | None = None

    def create_queues(self, client: Client) -> None:
        client.create_queue(self.lease_queue, visibility_timeout_s=LEASE_S)
        client.create_queue(self.delay_queue)
        # A long lease: the message consumed to see it is still there must not come back.
        client.create_queue(self.ttl_queue, visibility_timeout_s=600, message_ttl_s=self.ttl_s)

    def start(self, skewed: SkewedCluster, pool: ThreadPoolExecutor) -> None:
        client = skewed.client()
        watchers = [skewed.client() for _ in range(3)]
        wall_s = time.time()
        client.publish_queue(self.lease_queue, "leased")
        invoked = time.monotonic()
        leased = client.consume_queue(self.lease_queue, timeout_s=5)
        returned = time.monotonic()
        assert leased is not None, f"{self.phase}: the message to lease was not delivered"
        self.cluster_minus_wall_s = leased.publish_time_ms / 1000 - wall_s
        self._lease = pool.submit(
            watch_for, watchers[0], self.lease_queue, invoked, returned, LEASE_BACK_S
        )
        invoked = time.monotonic()
        client.publish_queue(self.delay_queue, "delayed", delay_s=DELAY_S)
        returned = time.monotonic()
        self._delay = pool.submit(
            watch_for, watchers[1], self.delay_queue, invoked, returned, DELAY_ARRIVES_S
        )
        invoked = time.monotonic()
        client.publish_many_queue(self.ttl_queue, ["expiring-1", "expiring-2"])
        returned = time.monotonic()
        self._ttl = pool.submit(
            watch_ttl, watchers[2], self.ttl_queue, self.ttl_s, invoked, returned
        )

    def results(self) -> tuple[Arrival, Arrival, TtlOutcome]:
        assert self._lease and self._delay and self._ttl, "start() first"
        bound_s = self.ttl_s + 30 + DELAY_ARRIVES_S[1]
        return (
            self._lease.result(timeout=bound_s),
            self._delay.result(timeout=bound_s),
            self._ttl.result(timeout=bound_s),
        )

    def problems(self) -> list[str]:
        lease, delay, ttl = self.results()
        found = []
        for what, arrival, bounds in (
            ("the message leased for 2 s came back", lease, LEASE_BACK_S),
            ("the message delayed 5 s arrived", delay, DELAY_ARRIVES_S),
        ):
            expected = f"expected after {bounds[0]:g} to {bounds[1]:g} s"
            if arrival.errors:
                expected += f" ({arrival.errors} consumes failed meanwhile)"
            if arrival.after_s is None:
                watched_s = bounds[1] + WATCH_PAST_S
                found.append(f"{self.phase}: {what} not within {watched_s:g} s; {expected}")
            elif arrival.early or arrival.late:
                found.append(f"{self.phase}: {what} after {arrival.after_s:.1f} s; {expected}")
        if not ttl.present:
            found.append(
                f"{self.phase}: a {self.ttl_s:g} s TTL message was gone at {ttl.present_at_s:g} s"
            )
        if not ttl.gone:
            found.append(
                f"{self.phase}: a {self.ttl_s:g} s TTL message was there at {ttl.gone_by_s:g} s"
            )
        return found

    def row(self, fault: str) -> str:
        lease, delay, ttl = self.results()
        verdict = "ok" if not self.problems() else "FAILED"
        return (
            f"{fault:30} {self.phase:12} {lease.cell():>8} {delay.cell():>8} {ttl.cell():>13} "
            f"{self.cluster_minus_wall_s:+14.1f}  {verdict}"
        )


def pause_until(moment: float) -> None:
    """Wait for a moment of this process's monotonic clock (a time-based check acts then)."""
    time.sleep(max(0.0, moment - time.monotonic()))


def watch_for(
    client: Client, queue: str, invoked: float, returned: float, bounds_s: tuple[float, float]
) -> Arrival:
    """Consume from `queue` until a message comes. Too early: it came sooner than `bounds_s[0]`
    after the setting-up call was invoked; too late: later than `bounds_s[1]` after it returned."""
    failed = 0
    while time.monotonic() < returned + bounds_s[1] + WATCH_PAST_S:
        try:
            message = client.consume_queue(queue, timeout_s=POLL_S)
        except errors.ChasquiError:
            failed += 1
            continue
        if message is not None:
            came = time.monotonic()
            return Arrival(
                after_s=came - returned,
                early=came - invoked < bounds_s[0],
                late=came - returned > bounds_s[1],
                errors=failed,
            )
    return Arrival(after_s=None, early=False, late=True, errors=failed)


def watch_ttl(
    client: Client, queue: str, ttl_s: float, invoked: float, returned: float
) -> TtlOutcome:
    """One of the two messages must still be there shortly before the TTL ends (counted from
    the publish's invocation) and the other gone shortly after it (counted from its return)."""
    present_at_s, gone_by_s = ttl_checks_s(ttl_s)
    pause_until(invoked + present_at_s)
    present = consume_now(client, queue, until=invoked + ttl_s - 0.2) is not None
    pause_until(returned + gone_by_s)
    gone = consume_now(client, queue, until=returned + gone_by_s + 2) is None
    return TtlOutcome(present_at_s, present, gone_by_s, gone)


def consume_now(client: Client, queue: str, until: float) -> object | None:
    """A consume that does not wait for a message; a failed call is tried again until `until`."""
    while True:
        try:
            return client.consume_queue(queue, timeout_s=0)
        except errors.ChasquiError:
            if time.monotonic() > until:
                raise


def skew_problems(skewed: SkewedCluster, expected_s: dict[str, float]) -> tuple[str, list[str]]:
    """Wait (bounded) until every node's `chasqui_clock_skew_seconds` is near what is expected;
    returns what was seen and what is still wrong at the end."""
    seen: dict[str, list[float] | str] = {}

    def wrong() -> list[str]:
        found = []
        for node_id, expected in expected_s.items():
            near = SKEW_NEAR_S if expected == 0 else SKEW_FAULT_NEAR_S
            try:
                gauges = skew_gauges(skewed.metrics_ports[node_id])
            except OSError as error:
                seen[node_id] = f"unreadable ({error})"
                found.append(f"{node_id}: /metrics unreadable")
                continue
            seen[node_id] = gauges
            if len(gauges) != 1 or abs(gauges[0] - expected) > near:
                found.append(
                    f"{node_id}: chasqui_clock_skew_seconds {gauges or 'missing'}, "
                    f"expected {expected:+.0f} +- {near:g}"
                )
        return found

    deadline = time.monotonic() + SKEW_WAIT_S
    found = wrong()
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = wrong()
    shown = ", ".join(
        f"{node_id} {value if isinstance(value, str) else [round(v, 1) for v in value]}"
        for node_id, value in sorted(seen.items())
    )
    return shown, found


def record(fault: str, phases: list[TimedMessages], skew_seen: str, leader: str) -> None:
    CLOCK_ROWS.extend(phase.row(fault) for phase in phases)
    CLOCK_ROWS.append(f"{'':30} skew gauge: {skew_seen}; leader at the end: {leader}")


# -- (a), (b): an hour ahead or behind, led, then a correct node leads -------------------------

TTLS = [
    pytest.param(TTL_SHORT_S, id="ttl6s"),
    pytest.param(TTL_LONG_S, id="ttl60s", marks=pytest.mark.slow),
]
HOUR_SKEWS = [pytest.param(HOUR_S, id="1h-ahead"), pytest.param(-HOUR_S, id="1h-behind")]


def lead_then_move(
    root: Path,
    fault: str,
    environment: dict[str, str],
    offset_s: float,
    ttl_s: float,
    idle_s: float = 0.0,
) -> None:
    """n2 and n3 start cluster time and create the queues; after `idle_s` with nothing
    committed, n1 joins (offset `offset_s`), leads, and hands over to a correct node. Messages
    of n1's term and of after it must keep time, and the skew gauges show only n1's offset."""
    with skewed_cluster(root, environment) as skewed:
        cluster = skewed.cluster
        under, after = TimedMessages("under-n1", ttl_s), TimedMessages("after-move", ttl_s)
        owner = skewed.client()  # its user is the first entry: a correct clock starts time
        for phase in (under, after):
            phase.create_queues(owner)
        time.sleep(idle_s)  # the idle spell of scenario (e), if any: part of the fault
        skewed.join_skewed(offset_s, fresh=idle_s == 0)
        lead_with(cluster, SKEWED)
        with ThreadPoolExecutor(max_workers=6) as pool:
            under.start(skewed, pool)
            new_leader = move_leadership_off(cluster, SKEWED)
            assert new_leader in CORRECT
            after.start(skewed, pool)
            problems = under.problems() + after.problems()
        skew_seen, skew_wrong = skew_problems(skewed, {SKEWED: offset_s, "n2": 0.0, "n3": 0.0})
        record(fault, [under, after], skew_seen, cluster.leader_id() or "none")
        problems += skew_wrong
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("ttl_s", TTLS)
@pytest.mark.parametrize("offset_s", HOUR_SKEWS)
def test_leases_delays_and_ttls_keep_time_after_a_skewed_leader(
    tmp_path: Path, offset_s: float, ttl_s: float
) -> None:
    environment = faketime_environment({"FAKETIME": f"{offset_s:+.0f}"})
    fault = f"n1 {offset_s / HOUR_S:+.0f} h led, ttl {ttl_s:g}"
    lead_then_move(tmp_path, fault, environment, offset_s, ttl_s)


# -- (c): the leader's wall clock steps 10 min forward mid-run ----------------------------------


@pytest.mark.parametrize("ttl_s", TTLS)
def test_leases_delays_and_ttls_keep_time_across_a_step_of_the_leaders_clock(
    tmp_path: Path, ttl_s: float
) -> None:
    fault = f"n1 leads, +10 min step, ttl {ttl_s:g}"
    step_file = tmp_path / "n1.faketime"
    step_file.write_text("+0\n")
    environment = faketime_environment(
        {"FAKETIME_TIMESTAMP_FILE": str(step_file), "FAKETIME_NO_CACHE": "1"}
    )
    with skewed_cluster(tmp_path, environment) as skewed:
        cluster = skewed.cluster
        before, after = TimedMessages("before-step", ttl_s), TimedMessages("after-step", ttl_s)
        owner = skewed.client()
        for phase in (before, after):
            phase.create_queues(owner)
        skewed.join_skewed(0.0)
        lead_with(cluster, SKEWED)
        with ThreadPoolExecutor(max_workers=6) as pool:
            before.start(skewed, pool)
            assert cluster.leader_id() == SKEWED, "n1 must lead when its clock steps"
            step_file.write_text(f"+{STEP_S:.0f}\n")
            skewed.wait_offset(STEP_S)  # the running node's clock has stepped
            after.start(skewed, pool)
            problems = before.problems() + after.problems()
        skew_seen, skew_wrong = skew_problems(skewed, {SKEWED: STEP_S, "n2": 0.0, "n3": 0.0})
        record(fault, [before, after], skew_seen, cluster.leader_id() or "none")
        problems += skew_wrong
        assert not problems, "\n".join(problems)


# -- (e): every clock right; a node that caught up after an idle spell leads --------------------

IDLE_S = 5.0


@pytest.mark.parametrize("ttl_s", TTLS)
def test_leases_delays_and_ttls_keep_time_after_a_leader_that_caught_up_late(
    tmp_path: Path, ttl_s: float
) -> None:
    """No clock is wrong here. The last entries before n1 joins were stamped IDLE_S before it
    applies them; then n1 leads and hands over. Cluster time must neither stand still during
    n1's term nor jump when a node that kept time leads again (no faketime needed)."""
    fault = f"n1 caught up {IDLE_S:g} s late, ttl {ttl_s:g}"
    lead_then_move(tmp_path, fault, {}, 0.0, ttl_s, idle_s=IDLE_S)


# -- the workload and its checker across the same faults ---------------------------------------


def skewed_leader_then_correct(cluster: Cluster, rng: random.Random, stop: threading.Event) -> None:
    """n1 leads a while, then a correct node does; again until the run ends (once at least)."""
    while True:
        lead_with(cluster, SKEWED)
        stop.wait(rng.uniform(1.0, 3.0))
        move_leadership_off(cluster, SKEWED)
        if stop.wait(rng.uniform(1.0, 3.0)):
            return


def stepping_leader_clock(step_file: Path) -> Nemesis:
    """n1 leads and its wall clock steps 10 min forward, again every few seconds."""

    def nemesis(cluster: Cluster, rng: random.Random, stop: threading.Event) -> None:
        lead_with(cluster, SKEWED)
        steps = 0
        while True:
            stop.wait(rng.uniform(1.0, 2.0))
            steps += 1
            step_file.write_text(f"+{steps * STEP_S:.0f}\n")
            if stop.wait(rng.uniform(1.0, 2.0)):
                return

    return nemesis


def run_workload(skewed: SkewedCluster, nemesis: Nemesis, offset_s: float) -> Report:
    skewed.client()  # its user is the first entry: a correct clock starts cluster time
    skewed.join_skewed(offset_s)
    return run_fault(skewed.cluster, nemesis, SECONDS)


@pytest.mark.parametrize("offset_s", HOUR_SKEWS)
def test_workload_across_a_skewed_leader_loses_nothing(tmp_path: Path, offset_s: float) -> None:
    environment = faketime_environment({"FAKETIME": f"{offset_s:+.0f}"})
    with skewed_cluster(tmp_path, environment) as skewed:
        report = run_workload(skewed, skewed_leader_then_correct, offset_s)
    assert_valid(f"n1 {offset_s / HOUR_S:+.0f} h leads, then not", report)


def test_workload_across_steps_of_the_leaders_clock_loses_nothing(tmp_path: Path) -> None:
    step_file = tmp_path / "n1.faketime"
    step_file.write_text("+0\n")
    environment = faketime_environment(
        {"FAKETIME_TIMESTAMP_FILE": str(step_file), "FAKETIME_NO_CACHE": "1"}
    )
    with skewed_cluster(tmp_path, environment) as skewed:
        report = run_workload(skewed, stepping_leader_clock(step_file), 0.0)
    assert_valid("leader clock +10 min steps", report)
