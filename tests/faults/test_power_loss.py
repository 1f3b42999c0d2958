"""A simultaneous power cut of every node loses no confirmed publish, with `--fsync always`.

How: three real nodes take confirmed publishes from four threads; then every node gets SIGKILL
at once and the test throws away exactly what no fsync made durable, the way a power cut would
(LazyFS-style, but for our own files):
- Raft journal segments are cut back to the length recorded by their last fsync. The journal
  reports each fsync to the file named by CHASQUI_SYNC_TRACE, a hook that exists for this test.
- The journal's metadata and snapshots are synced on every write with `--fsync always` and
  never with `--fsync never`: they are kept, or deleted, whole.
- The LMDB state is never fsynced per commit: its meta pages are overwritten with garbage (what
  unsynced pages may leave), and the nodes restart under a new boot id (CHASQUI_BOOT_ID), as
  after a real power cut, so each must notice and rebuild it from the snapshot and journal.
After a restart every confirmed message must be in the queue exactly once, publishes whose
outcome was unknown at most once, nothing else, and every node must hold identical state.

The same procedure with `--fsync never` must report lost confirmed messages: proof that the
check can fail, and that the fsyncs are what saves the data.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chasqui_client import errors
from tests.harness import Cluster, dump_states, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

PRODUCER_THREADS = 4
CONFIRMED_BEFORE_CUT = 400
PUBLISHING_S_MAX = 30.0


def power_cut(node_dir: Path, trace: Path, fsync_always: bool) -> dict[str, int]:
    """Discard from a killed node's files whatever was not fsynced. Returns bytes dropped."""
    synced: dict[str, int] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            name, size = line.rsplit(" ", 1)
            synced[name] = int(size)
    dropped: dict[str, int] = {}
    for segment in sorted((node_dir / "journal").glob("segment-*.log")):
        size = segment.stat().st_size
        keep = min(size, synced.get(segment.name, 0))
        if keep < size:
            with open(segment, "r+b") as file:
                file.truncate(keep)
            dropped[segment.name] = size - keep
    state = node_dir / "state" / "data.mdb"
    if state.exists():
        with open(state, "r+b") as file:
            file.write(os.urandom(8192))
        dropped["state meta pages"] = 8192
    if not fsync_always:
        for path in (
            node_dir / "state",
            node_dir / "raft.snapshot",
            node_dir / "journal/meta.json",
        ):
            if path.is_dir():
                shutil.rmtree(path)
                dropped[path.name] = 1
            elif path.exists():
                path.unlink()
                dropped[path.name] = 1
    return dropped


def start_traced(cluster: Cluster, node_id: str, boot: str) -> None:
    trace = cluster.root / f"{node_id}.synctrace"
    environment = {"CHASQUI_SYNC_TRACE": str(trace), "CHASQUI_BOOT_ID": boot}
    cluster.start_node(node_id, environment=environment)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[object]:
    created: list[Cluster] = []

    def make(fsync: str) -> Cluster:
        cluster = Cluster(
            tmp_path / fsync, extra_args=["--fsync", fsync, "--raft-compaction-entries", "200"]
        )
        created.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in created:
            cluster.close()


def publish_until_cut(cluster: Cluster) -> tuple[str, set[bytes], set[bytes]]:
    """Publish from several threads, SIGKILL every node mid-stream; return what was confirmed
    and what had an unknown outcome."""
    client = cluster.client(call_timeout_s=3)
    client.create_queue("jobs")
    confirmed: set[bytes] = set()
    unknown: set[bytes] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def produce(thread: int) -> None:
        number = 0
        while not stop.is_set():
            body = f"t{thread}-{number}".encode()
            number += 1
            try:
                client.publish_queue("jobs", body)
                with lock:
                    confirmed.add(body)
            except errors.ChasquiError:
                with lock:
                    unknown.add(body)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(PRODUCER_THREADS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(
            lambda: len(confirmed) >= CONFIRMED_BEFORE_CUT, PUBLISHING_S_MAX, "confirmed publishes"
        )
        # Power cut: every node dies at the same moment, mid-stream.
        for node in cluster.nodes.values():
            assert node.process is not None
            node.process.send_signal(signal.SIGKILL)
        with lock:
            confirmed_at_cut = set(confirmed)
        for node_id in cluster.nodes:
            cluster.kill(node_id)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    # Anything confirmed after the signals went out was confirmed by a dying node: it counts.
    unknown -= confirmed
    assert confirmed >= confirmed_at_cut
    return client.key, confirmed, unknown


def drain(cluster: Cluster, key: str) -> list[bytes] | None:
    """Every body left in the queue, or None if the cluster no longer knows the user."""
    client = cluster.client(key=key, call_timeout_s=10)
    bodies: list[bytes] = []
    try:
        for _ in range(1000):
            batch = client.consume_many_queue("jobs", 200, timeout_s=1)
            if not batch:
                return bodies
            bodies.extend(message.body for message in batch)
            client.ack(batch)
    except (errors.Unauthenticated, errors.NotFound):
        return None
    raise AssertionError("queue did not drain")


def run_power_cut(cluster: Cluster, fsync_always: bool) -> tuple[set[bytes], list[bytes] | None]:
    for node_id in cluster.nodes:
        start_traced(cluster, node_id, boot="before-the-cut")
    cluster.wait_for_leader()
    key, confirmed, unknown = publish_until_cut(cluster)
    for node_id, node in cluster.nodes.items():
        dropped = power_cut(node.data_dir, cluster.root / f"{node_id}.synctrace", fsync_always)
        print(f"power cut on {node_id}: dropped {dropped or 'nothing'}")
    for node_id in cluster.nodes:
        start_traced(cluster, node_id, boot="after-the-cut")
    cluster.wait_for_leader(timeout_s=60)
    found = drain(cluster, key)
    if found is not None:
        assert set(found) <= confirmed | unknown, "a message nobody published appeared"
    return confirmed, found


def test_power_cut_of_every_node_loses_nothing_confirmed_with_fsync_always(
    make_cluster: object,
) -> None:
    cluster = make_cluster("always")  # type: ignore[operator]
    confirmed, found = run_power_cut(cluster, fsync_always=True)
    assert found is not None, "the cluster forgot the user: state was lost"
    lost = confirmed - set(found)
    assert not lost, (
        f"{len(lost)} of {len(confirmed)} confirmed publishes lost, e.g. {sorted(lost)[:5]}"
    )
    duplicated = [body for body in set(found) if found.count(body) > 1]
    assert not duplicated, f"delivered twice: {duplicated[:5]}"
    cluster.wait_converged()
    cluster.close()
    states = list(dump_states(cluster).values())
    assert all(state == states[0] for state in states), "replicas diverged after the power cut"
    cluster.assert_logs_clean()


def test_the_power_cut_check_detects_loss_with_fsync_never(make_cluster: object) -> None:
    cluster = make_cluster("never")  # type: ignore[operator]
    confirmed, found = run_power_cut(cluster, fsync_always=False)
    lost = confirmed if found is None else confirmed - set(found)
    print(f"fsync never: {len(lost)} of {len(confirmed)} confirmed publishes lost")
    assert lost, "nothing was lost without fsync: the power-cut simulation is not cutting"
