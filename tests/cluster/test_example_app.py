"""The request/reply example (examples/request_reply) against a real 3-node cluster: the worker,
started as a subprocess on a temporary folder, answers the caller's "list" and "find" with the
right paths; bad requests get error replies without stopping it; the caller ignores replies to
other requests and exits 3 when nobody answers; every request ends acked; SIGTERM stops the
worker cleanly.

The worker is stopped by PID in a `finally` (SIGTERM, then SIGKILL), and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, Cluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

EXAMPLE_DIR = REPO_ROOT / "examples" / "request_reply"
RUN_TIMEOUT_S = 60
WORKER_READY_WAIT_S = 30
WORKER_STOP_WAIT_S = 15


def environment(cluster: Cluster, key: str) -> dict[str, str]:
    return {
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONUNBUFFERED": "1",
        "CHASQUI_ENDPOINTS": ",".join(cluster.endpoints),
        "CHASQUI_KEY": key,
    }


@dataclass
class Service:
    cluster: Cluster
    folder: Path
    worker: subprocess.Popen[bytes]
    worker_log: Path
    caller_key: str

    def call(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, str(EXAMPLE_DIR / "caller.py"), *arguments],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            cwd=REPO_ROOT,
            env=environment(self.cluster, self.caller_key),
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result


def stop_by_pid(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=WORKER_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=WORKER_STOP_WAIT_S)
    return process.returncode


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module: a node holding a worker's pending long-poll takes that long
    to exit, so one teardown instead of one per test keeps the module fast."""
    running = Cluster(tmp_path_factory.mktemp("example-cluster"))
    try:
        running.start()
        yield running
    finally:
        running.close()


def start_worker(
    cluster: Cluster, root: Path, *arguments: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """A worker serving a small folder tree under `root`, once it says it is serving."""
    folder = root / "served"
    (folder / "notes" / "deep").mkdir(parents=True)
    for relative in ("a.txt", "photo.jpg", "notes/report.md", "notes/deep/report-old.txt"):
        (folder / relative).write_text(f"contents of {relative}\n")
    worker_log = root / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, str(EXAMPLE_DIR / "worker.py"), "--folder", str(folder), *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=environment(cluster, cluster.client().key),
        )
    try:
        wait_until(
            lambda: worker.poll() is not None or "serving " in worker_log.read_text(),
            WORKER_READY_WAIT_S,
            "the worker to start serving",
        )
        assert worker.poll() is None, worker_log.read_text()
    except BaseException:
        stop_by_pid(worker)
        raise
    return worker, worker_log


@pytest.fixture(scope="module")
def service(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("example-worker")
    worker, worker_log = start_worker(shared_cluster, root)
    try:
        caller_key = shared_cluster.client().key
        yield Service(shared_cluster, root / "served", worker, worker_log, caller_key)
    finally:
        stop_by_pid(worker)


def test_list_prints_the_folders_entries(service: Service) -> None:
    result = service.call("list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["a.txt", "notes/", "photo.jpg"]


def test_find_searches_recursively(service: Service) -> None:
    result = service.call("find", "report")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["notes/deep/report-old.txt", "notes/report.md"]
    nothing = service.call("find", "no-such-file")
    assert nothing.returncode == 0 and nothing.stdout == ""


def test_bad_requests_get_error_replies_and_the_worker_keeps_serving(service: Service) -> None:
    unknown = service.call("frobnicate")
    assert unknown.returncode == 1
    assert "unknown command 'frobnicate'" in unknown.stderr
    nameless = service.call("find")
    assert nameless.returncode == 1
    assert "find needs a name" in nameless.stderr

    client = service.cluster.client(service.caller_key)
    client.create_queue("test.replies")
    garbage = [
        b"not json at all",  # nowhere to reply: dropped with a log line
        b"\xff\xfe",
        b"[1, 2, 3]",
        json.dumps({"reply_to": "test.replies", "correlation_id": "c1"}).encode(),
        json.dumps({"reply_to": "test.replies", "correlation_id": "c2", "command": 7}).encode(),
        json.dumps(
            {"reply_to": "missing.queue", "correlation_id": "c3", "command": "list"}
        ).encode(),
    ]
    client.publish_many_queue("files.requests", garbage)
    replies = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(replies) < 2 and time.monotonic() < deadline:
        message = client.consume_queue("test.replies", timeout_s=5)
        if message is not None:
            replies.append(json.loads(message.body))
            client.ack(message)
    assert sorted(reply["correlation_id"] for reply in replies) == ["c1", "c2"]
    assert all(reply["ok"] is False and "command" in reply["error"] for reply in replies)

    assert service.worker.poll() is None, service.worker_log.read_text()
    assert service.call("list").returncode == 0
    # Every request was acked once answered (or dropped): nothing is left or leased.
    wait_until(
        lambda: next(q for q in client.list_queues() if q.name == "files.requests").depth == 0,
        30,
        "the requests queue to drain",
    )


def test_the_caller_ignores_replies_to_other_requests(service: Service) -> None:
    client = service.cluster.client(service.caller_key)
    client.create_queue("test.shared-replies")
    stale = {"correlation_id": "an-earlier-request", "ok": True, "result": ["stale"]}
    client.publish_queue("test.shared-replies", json.dumps(stale).encode())
    result = service.call("--reply-queue", "test.shared-replies", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["a.txt", "notes/", "photo.jpg"]
    assert "ignoring a reply to another request" in result.stderr
    # A queue the caller was given is not deleted afterwards.
    assert "test.shared-replies" in {queue.name for queue in client.list_queues()}


def test_the_caller_times_out_when_nobody_answers(service: Service) -> None:
    client = service.cluster.client(service.caller_key)
    client.create_queue("nobody.listens")
    started = time.monotonic()
    result = service.call("--requests-queue", "nobody.listens", "--timeout-s", "1", "list")
    assert result.returncode == 3
    assert "no reply within 1 s" in result.stderr
    assert time.monotonic() - started < 30
    # The caller's temporary reply queue is gone.
    assert not [q for q in client.list_queues() if q.name.startswith("files.replies.")]


def test_sigterm_stops_the_worker_cleanly(shared_cluster: Cluster, tmp_path: Path) -> None:
    worker, worker_log = start_worker(shared_cluster, tmp_path, "--requests-queue", "files.own")
    try:
        service = Service(
            shared_cluster, tmp_path / "served", worker, worker_log, shared_cluster.client().key
        )
        assert service.call("--requests-queue", "files.own", "list").returncode == 0
        started = time.monotonic()
        assert stop_by_pid(worker) == 0
        assert time.monotonic() - started < WORKER_STOP_WAIT_S
        assert "Traceback" not in worker_log.read_text()
    finally:
        stop_by_pid(worker)
