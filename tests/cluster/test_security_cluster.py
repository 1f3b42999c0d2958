"""Security on real node processes: the bootstrap admin, closed signup, keys kept out of logs,
TLS and mutual TLS on the client port, a Raft port that never unpickles a stranger's bytes, and
a smaller fuzz run through a real three-node cluster.

Nodes are started by `tests.harness.Cluster` (stopped by PID afterwards, pass or fail). TLS
certificates come from `chasqui_node.tls`, a throwaway CA per test. The crafted pickle creates a
marker file when unpickled (`open(path, "w")` needs no shell), so "not executed" is checked by
the file's absence, and "keeps serving" by a publish and a consume afterwards. The same plain
frame sent to a pysyncobj node without a password does create the marker (checked by hand when
this test was written), so the framing is the real one.
"""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_client import Client
from chasqui_node.tls import Issued, issue, make_ca
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import REPO_ROOT, Cluster, free_port_block, wait_until
from tests.service.test_security_fuzz import Caller, calls, run_calls

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def leader_stub(cluster: Cluster, credentials: grpc.ChannelCredentials | None = None) -> Any:
    leader = cluster.nodes[cluster.wait_for_leader()]
    if credentials is None:
        channel = grpc.insecure_channel(leader.client_address)
    else:
        channel = grpc.secure_channel(leader.client_address, credentials)
    return pb_grpc.BrokerStub(channel)


@pytest.fixture
def admin_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, str]]:
    """Three nodes with signup closed, debug logging, and the admin key in the environment."""
    admin_key = secrets.token_urlsafe(24)
    cluster = Cluster(tmp_path, extra_args=["--signup", "closed", "--log-level", "debug"])
    try:
        for node_id in cluster.nodes:
            cluster.start_node(node_id, environment={"CHASQUI_ADMIN_KEY": admin_key})
        cluster.wait_for_leader()
        yield cluster, admin_key
    finally:
        cluster.close()


def _wait_admin(cluster: Cluster, admin_key: str) -> Any:
    def admin_ready() -> Any:
        stub = leader_stub(cluster)
        answer = stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(admin_key), timeout=2)
        return stub if answer.admin else None

    return wait_until(admin_ready, 30, "the bootstrap admin to be registered")


def test_admin_key_closed_signup_revoke_and_no_key_in_any_log(
    admin_cluster: tuple[Cluster, str],
) -> None:
    cluster, admin_key = admin_cluster
    stub = _wait_admin(cluster, admin_key)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateUser(pb.CreateUserRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    user_key = stub.CreateUser(pb.CreateUserRequest(), metadata=bearer(admin_key), timeout=5).key
    user_id = stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(user_key), timeout=5).user_id
    stub.CreateQueue(pb.CreateQueueRequest(name="jobs"), metadata=bearer(user_key), timeout=5)
    stub.RevokeUser(pb.RevokeUserRequest(user_id=user_id), metadata=bearer(admin_key), timeout=5)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListQueues(pb.ListQueuesRequest(), metadata=bearer(user_key), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # A new leader proposes EnsureAdmin again: still one admin, the same user.
    old_leader = cluster.wait_for_leader()
    cluster.kill(old_leader)
    cluster.wait_for_leader(exclude=old_leader)
    stub = _wait_admin(cluster, admin_key)
    users = stub.ListUsers(pb.ListUsersRequest(), metadata=bearer(admin_key), timeout=5).users
    assert [user.user_id for user in users if user.admin] == ["u1"]
    assert [user.revoked for user in users if user.user_id == user_id] == [True]
    stub.DeleteQueue(pb.DeleteQueueRequest(name="jobs"), metadata=bearer(admin_key), timeout=5)

    for node_id, text in cluster.logs().items():
        assert admin_key not in text, f"{node_id} logged the admin key"
        assert user_key not in text, f"{node_id} logged a user key"
    cluster.assert_logs_clean()


def test_a_short_admin_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, size=1)
    key_file = tmp_path / "admin.key"
    key_file.write_text("short-key\n")
    try:
        cluster.start_node("n1", ["--admin-key-file", str(key_file)])
        process = cluster.nodes["n1"].process
        assert process is not None
        assert process.wait(timeout=60) != 0
        log = cluster.logs()["n1"]
        assert "URL-safe characters" in log and "short-key" not in log
    finally:
        cluster.close()


# -- TLS --------------------------------------------------------------------------------------


def _write(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def _tls_status(address: str, credentials: grpc.ChannelCredentials) -> Any:
    with grpc.secure_channel(address, credentials) as channel:
        return pb_grpc.BrokerStub(channel).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Any]:
    ca = make_ca()
    directory = tmp_path / "tls"
    directory.mkdir()
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    node_cert, node_key = _write(directory, "node", issue(ca, "node", ("127.0.0.1",)))
    client_cert, client_key = _write(directory, "client", issue(ca, "app", client=True))
    other_cert, other_key = _write(
        directory, "other", issue(make_ca("someone else"), "app", client=True)
    )
    return {
        "ca": ca.cert_pem,
        "ca_path": directory / "ca.crt",
        "node": ["--tls-cert", str(node_cert), "--tls-key", str(node_key)],
        "client": (client_cert.read_bytes(), client_key.read_bytes()),
        "client_paths": (client_cert, client_key),
        "other": (other_cert.read_bytes(), other_key.read_bytes()),
    }


def _start_tls_node(tmp_path: Path, arguments: list[str], probe: Any) -> Cluster:
    cluster = Cluster(tmp_path / "node", size=1, extra_args=arguments)
    cluster.start_node("n1")
    address = cluster.nodes["n1"].client_address
    wait_until(lambda: _tls_status(address, probe).role == "leader", 30, "the TLS node to lead")
    return cluster


def test_tls_node_serves_tls_clients_and_refuses_plaintext(
    tmp_path: Path, tls_files: dict[str, Any]
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_files["ca"])
    cluster = _start_tls_node(tmp_path, tls_files["node"], credentials)
    try:
        address = cluster.nodes["n1"].client_address
        client = Client([address], credentials=credentials)
        try:
            client.create_queue("jobs")
            client.publish_queue("jobs", b"over tls")
            message = client.consume_queue("jobs", timeout_s=5)
            assert message is not None and message.body == b"over tls"
        finally:
            client.close()
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.BrokerStub(channel).ClusterStatus(pb.ClusterStatusRequest(), timeout=3)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        untrusting = grpc.ssl_channel_credentials(root_certificates=make_ca().cert_pem)
        with pytest.raises(grpc.RpcError):
            _tls_status(address, untrusting)
        status = subprocess.run(
            [
                sys.executable, "-m", "chasqui_node.cli", "status",
                "--endpoints", address, "--tls-ca", str(tls_files["ca_path"]),
            ],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "leader" in status.stdout
    finally:
        cluster.close()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    tmp_path: Path, tls_files: dict[str, Any]
) -> None:
    ca = tls_files["ca"]
    with_cert = grpc.ssl_channel_credentials(ca, *reversed(tls_files["client"]))
    arguments = [*tls_files["node"], "--tls-client-ca", str(tls_files["ca_path"])]
    cluster = _start_tls_node(tmp_path, arguments, with_cert)
    try:
        address = cluster.nodes["n1"].client_address
        assert _tls_status(address, with_cert).role == "leader"
        client = Client([address], credentials=with_cert)
        try:
            client.create_queue("jobs")
        finally:
            client.close()
        without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        wrong_ca = grpc.ssl_channel_credentials(ca, *reversed(tls_files["other"]))
        for refused_credentials in (without_cert, wrong_ca):
            with pytest.raises(grpc.RpcError) as refused:
                _tls_status(address, refused_credentials)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        client_cert, client_key = tls_files["client_paths"]
        status = subprocess.run(
            [
                sys.executable, "-m", "chasqui_node.cli", "status", "--endpoints", address,
                "--tls-ca", str(tls_files["ca_path"]),
                "--tls-cert", str(client_cert), "--tls-key", str(client_key),
            ],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        cluster.close()


def test_dev_tls_makes_certificates_and_says_how_to_connect(tmp_path: Path) -> None:
    base = free_port_block(2)
    command = [
        sys.executable, "-m", "chasqui_node.cli", "dev", "--tls", "--nodes", "1",
        "--data-dir", str(tmp_path / "var"),
        "--client-port", str(base), "--raft-port", str(base + 1),
    ]  # fmt: skip
    output = tmp_path / "dev.out"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until(lambda: "Ctrl-C" in output.read_text(), 30, "dev to print its banner")
        text = output.read_text()
        ca_path = tmp_path / "var" / "tls" / "ca.crt"
        assert str(ca_path) in text and "--tls-ca" in text
        credentials = grpc.ssl_channel_credentials(ca_path.read_bytes())
        address = f"127.0.0.1:{base}"
        wait_until(lambda: _tls_status(address, credentials).role == "leader", 30, "dev leader")
        assert oct((tmp_path / "var" / "tls" / "node.key").stat().st_mode & 0o777) == "0o600"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the Raft port ----------------------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this calls open(path, "w"): proof of code execution if the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _frame(payload: bytes) -> bytes:
    """pysyncobj's TCP framing: a native 4-byte signed length, then the (maybe encrypted)
    zlib-compressed pickle."""
    return struct.pack("i", len(payload)) + payload


def _send_raw(address: str, data: bytes) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(data)
        connection.settimeout(2)
        try:
            while connection.recv(4096):  # the node closes on a bad message
                pass
        except (TimeoutError, ConnectionError):
            pass


def test_crafted_pickle_on_the_raft_port_is_never_executed(
    cluster: Cluster, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_CreatesMarker(marker), protocol=2)
    assert not marker.exists()
    wrong_secret_key = Fernet.generate_key()  # stands in for any key but the cluster's
    frames = {
        "plain": _frame(zlib.compress(evil, 3)),
        "plain, as the handshake's random key": _frame(zlib.compress(evil, 3)) * 2,
        "encrypted with a wrong secret": _frame(
            Fernet(wrong_secret_key).encrypt_at_time(zlib.compress(evil, 3), int(time.monotonic()))
        ),
        "unframed": evil,
    }
    for node in cluster.nodes.values():
        for what, data in frames.items():
            _send_raw(node.raft_address, data)
            assert not marker.exists(), f"{node.node_id} executed a pickle sent {what}"
    # Raft is bound to the listed address only: another loopback address finds nothing.
    host, port = cluster.nodes["n1"].raft_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", int(port)), timeout=2).close()

    client = cluster.client()
    client.create_queue("after")
    client.publish_queue("after", b"still serving")
    message = client.consume_queue("after", timeout_s=10)
    assert message is not None and message.body == b"still serving"
    client.ack(message)
    assert cluster.leader_id() is not None
    assert not marker.exists()
    cluster.assert_logs_clean()


# -- fuzzing through a real cluster -----------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(calls, min_size=5, max_size=20))
def test_random_calls_through_a_real_cluster(
    admin_cluster: tuple[Cluster, str], sequence: list[tuple[Any, ...]]
) -> None:
    cluster, admin_key = admin_cluster
    stub = _wait_admin(cluster, admin_key)
    keys = [
        stub.CreateUser(pb.CreateUserRequest(), metadata=bearer(admin_key), timeout=10).key
        for _ in range(3)
    ]
    run_calls(Caller(stub, [*keys, admin_key]), sequence)
    assert all(node.alive() for node in cluster.nodes.values())
