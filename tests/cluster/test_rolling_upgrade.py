"""A rolling upgrade from the previous release across the entry-format change of this one.

This release writes Raft entries as packed version 3 / text version 2, which carry the apply
rules of the leader (commands.py): dead-letter moves are authorized and queue leases name
their consumer. The test unpacks the previous release's code from git (`PREVIOUS_RELEASE`),
starts three real nodes on it, and with traffic in between (publishes, consumes that stay
leased, acks, a dead-letter queue) replaces them one at a time by this release's node on the
same data directory, followers first and the leader last, as the README's Upgrading section
says. Upgraded followers must apply the old leader's entries (old rules), every node must end
on the new code with nothing confirmed lost or duplicated, and all replicas must hold
byte-identical state. A node left on the old code after a new leader took over may stop with
exit code 70 (`upgrade this node`); it is then upgraded in its turn, replaying its journal.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chasqui_client import Client, errors
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import REPO_ROOT, Cluster, dump_states, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

# The last release before packed entry version 3 (the commit this release was built on).
PREVIOUS_RELEASE = "73f4132"
VISIBILITY_TIMEOUT_S = 2.0


@pytest.fixture
def previous_release(tmp_path: Path) -> Path:
    """The previous release's node and proto packages, unpacked from this repository's git."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("needs the git history of a checkout to unpack the previous release")
    target = tmp_path / "previous"
    target.mkdir()
    archive = tmp_path / "previous.tar"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", f"--output={archive}",
         PREVIOUS_RELEASE, "chasqui_node", "chasqui_proto"],
        check=True,
        timeout=60,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.fixture
def old_cluster(tmp_path: Path, previous_release: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "nodes")
    try:
        for node_id in cluster.nodes:
            cluster.start_node(node_id, source=previous_release)
        cluster.wait_for_leader()
        yield cluster
    finally:
        cluster.close()


class Traffic:
    """Publishes unique bodies and consumes them, remembering what was confirmed and acked."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.published: list[str] = []
        self.acked: list[str] = []
        self.rounds = 0

    def round(self) -> None:
        """Publish five, ack two, and leave one leased without an ack (it comes back)."""
        self.rounds += 1
        for number in range(5):
            body = f"r{self.rounds}-m{number}"
            self.client.publish_queue("jobs", body)
            self.published.append(body)
        for message in self.client.consume_many_queue("jobs", 2, timeout_s=5):
            self.client.ack(message)
            self.acked.append(message.text)
        assert self.client.consume_queue("jobs", timeout_s=5) is not None  # left leased

    def drain(self) -> None:
        """Consume and ack until every confirmed body was acked, redeliveries included."""

        def all_acked() -> bool:
            for message in self.client.consume_many_queue("jobs", 50, timeout_s=1):
                self.client.ack(message)
                self.acked.append(message.text)
            return set(self.acked) >= set(self.published)

        wait_until(all_acked, 60, "every published message to be consumed and acked")


def _restrict_publishers(cluster: Cluster, key: str, queue_name: str) -> None:
    """Only the owner may publish to `queue_name` from now on (SetAccess, raw gRPC)."""
    leader = cluster.nodes[cluster.wait_for_leader()]
    with grpc.insecure_channel(leader.client_address) as channel:
        pb_grpc.BrokerStub(channel).SetAccess(
            pb.SetAccessRequest(kind=pb.QUEUE, name=queue_name, publishers=["u1"]),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=10,
        )


def _upgrade(cluster: Cluster, node_id: str) -> None:
    """Replace a node (running or stopped at an entry it could not read) by this release."""
    node = cluster.nodes[node_id]
    if node.alive():
        assert cluster.stop_node(node_id) == 0, f"{node_id} did not stop cleanly"
    else:
        assert node.process is not None and node.process.returncode == 70, node.process
    cluster.start_node(node_id)


def test_rolling_upgrade_from_the_previous_release_loses_nothing(old_cluster: Cluster) -> None:
    cluster = old_cluster
    client = cluster.client(call_timeout_s=20)
    client.create_queue("jobs.dead")
    client.create_queue(
        "jobs",
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        max_deliveries=50,
        dead_letter_queue="jobs.dead",
    )
    assert client.whoami().user_id == "u1"
    client.create_queue("private")
    _restrict_publishers(cluster, client.key, "private")
    other = cluster.client(call_timeout_s=20)
    traffic = Traffic(client)
    traffic.round()
    old_leader = cluster.wait_for_leader()
    upgraded: set[str] = set()
    for follower in [n for n in cluster.nodes if n != old_leader]:
        _upgrade(cluster, follower)
        upgraded.add(follower)
        cluster.wait_for_leader()
        traffic.round()  # the old leader's entries, applied by new followers too
    # The old rules let anyone name any queue as a dead-letter queue; the upgraded followers
    # must apply that entry as the old leader does. (Should a follower restart have moved the
    # leadership to an upgraded node, the old node stopped at its first entry: no old rules.)
    if cluster.wait_for_leader() == old_leader:
        assert other.create_queue("by-old-rules", dead_letter_queue="private")
    for node_id in cluster.nodes:
        if node_id not in upgraded:
            _upgrade(cluster, node_id)
    cluster.wait_for_leader()
    traffic.round()  # now under a leader of this release: the new rules
    with pytest.raises(errors.PermissionDenied):
        other.create_queue("by-new-rules", dead_letter_queue="private")
    cluster.wait_converged()
    traffic.drain()
    assert sorted(set(traffic.acked)) == sorted(traffic.published)
    cluster.wait_converged()
    for node_id in cluster.nodes:
        assert cluster.stop_node(node_id) == 0
    states = dump_states(cluster)
    first, *others = states.values()
    assert all(state == first for state in others), "replicas diverged across the upgrade"
    logs = "\n".join(cluster.logs().values())
    assert "Traceback" not in logs
