"""Prometheus metrics of one node: what operators graph and alert on.

Each node has its own `CollectorRegistry` (never prometheus_client's global one), so several
nodes, or several test servers, can live in one process without their series mixing.

Two kinds of series:

- Counters and histograms that code updates as things happen: calls by RPC method and status
  code, and their latency (recorded once, in service.py's `_rpc` wrappers); messages published,
  delivered and acked; the Raft journal's fsync latency (fed by `Journal.on_sync`).
- Gauges read at scrape time by `NodeCollector`: role, term, commit and applied index, apply
  lag, whether a leader is known, peers connected, clock skew (from `Replication.status()`),
  and queue depths (from the state machine's `list_queues` on a read transaction, bounded: see
  `QueueDepthReader`). Nothing polls in the background, so an idle node does no work for them.

Counters count what passed through this node: only the leader accepts writes, so the sum over
all nodes is the cluster's rate.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from chasqui_node import limits
from chasqui_node.commands import QueueInfo
from chasqui_node.replication import ReplicationStatus, Role
from chasqui_node.state import StateMachine, Store

logger = logging.getLogger(__name__)

T = TypeVar("T")

RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FSYNC_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
)  # fmt: skip


class NodeMetrics:
    """The event-driven series of one node, and the registry every series of the node joins.
    Any thread: prometheus_client's counters and histograms lock internally."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "chasqui_rpc_requests_total",
            "Broker calls finished, by RPC method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "chasqui_rpc_duration_seconds",
            "Time to answer a unary Broker call, by RPC method (Consume includes its long-poll).",
            ["method"],
            buckets=RPC_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.messages_published = Counter(
            "chasqui_messages_published_total",
            "Messages accepted by Publish and PublishBatch through this node (retried "
            "duplicates not counted), by kind (queue or topic).",
            ["kind"],
            registry=self.registry,
        )
        self.messages_consumed = Counter(
            "chasqui_messages_consumed_total",
            "Deliveries handed to consumers by Consume and ConsumeStream, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.messages_acked = Counter(
            "chasqui_messages_acked_total",
            "Deliveries acknowledged by Ack calls that succeeded, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.journal_fsync_seconds = Histogram(
            "chasqui_journal_fsync_duration_seconds",
            "Time of one Raft journal fsync (a group commit of every entry written since).",
            buckets=FSYNC_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_journal_sync(self, seconds: float) -> None:
        """`Journal.on_sync` callback: runs on the Raft tick thread; cannot raise."""
        self.journal_fsync_seconds.observe(seconds)

    def observe_call(self, method: str, code: grpc.StatusCode, seconds: float | None) -> None:
        """One finished Broker call. `seconds` is None for streams, whose length says nothing
        about the node's speed."""
        self.rpc_requests.labels(method=method, code=code.name).inc()
        if seconds is not None:
            self.rpc_seconds.labels(method=method).observe(seconds)

    def count_messages(self, method: str, request: Any, response: Any) -> None:
        """Count the messages a successful call moved. `request` and `response` are the call's
        protobuf messages (for ConsumeStream, the response is one pushed ConsumeResponse)."""
        if method == "Publish":
            if not response.receipt.duplicate:
                self.messages_published.labels(kind=_kind_label(request.kind)).inc()
        elif method == "PublishBatch":
            new = sum(1 for receipt in response.receipts if not receipt.duplicate)
            if new:
                self.messages_published.labels(kind=_kind_label(request.kind)).inc(new)
        elif method in ("Consume", "ConsumeStream"):
            _count_by_kind(self.messages_consumed, response.deliveries)
        elif method == "Ack":
            _count_by_kind(self.messages_acked, request.deliveries)


def _count_by_kind(counter: Counter, deliveries: Iterable[Any]) -> None:
    """One increment per kind, not per delivery: a labelled lookup per message was 9% of a
    leader's Python time under a consume-and-ack load."""
    counts = collections.Counter(delivery.kind for delivery in deliveries)
    for kind, count in counts.items():
        counter.labels(kind=_kind_label(kind)).inc(count)


def _kind_label(kind: int) -> str:
    # The proto enum: TOPIC = 1, QUEUE = 2 (anything else never got past validation).
    return {1: "topic", 2: "queue"}.get(kind, "unknown")


class Readable(Protocol):
    """What the collector needs from replication (`Replicator` and the tests' fake)."""

    def status(self) -> ReplicationStatus: ...

    def read(self, query: Callable[[Store], T]) -> T: ...


class _ScanBudgetExceeded(Exception):
    pass


class _BudgetedStore:
    """A read-only `Store` view that stops a listing once it has read `rows_max` rows, so one
    scrape can never walk an unbounded amount of state."""

    def __init__(self, store: Store, rows_max: int) -> None:
        self._store = store
        self._rows_left = rows_max

    def _spend(self, rows: int) -> None:
        self._rows_left -= rows
        if self._rows_left < 0:
            raise _ScanBudgetExceeded

    def get(self, key: bytes) -> bytes | None:
        self._spend(1)
        return self._store.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        raise AssertionError("metrics never write state")

    def delete(self, key: bytes) -> bool:
        raise AssertionError("metrics never write state")

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        rows = self._store.scan(prefix, start, limit)
        self._spend(len(rows))
        return rows

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        self._spend(1)
        return self._store.floor(prefix, key)


class QueueDepthReader:
    """Reads every queue's depth and leased count from this node's applied state.

    `list_queues` answers only an authenticated caller, so the node reads as its configured
    admin (`reader_key_hash`, the hash the node already holds; nothing is proposed or logged).
    Without one, depths are skipped. A listing that would exceed
    `limits.METRICS_QUEUE_SCAN_ROWS_MAX` rows or `limits.METRICS_QUEUE_SERIES_MAX` queues is
    skipped too: a scrape must stay cheap whatever the state holds.
    """

    def __init__(
        self,
        replication: Readable,
        state_machine: StateMachine,
        reader_key_hash: str | None,
        *,
        scan_rows_max: int = limits.METRICS_QUEUE_SCAN_ROWS_MAX,
        queues_max: int = limits.METRICS_QUEUE_SERIES_MAX,
    ) -> None:
        self._replication = replication
        self._state_machine = state_machine
        self._reader_key_hash = reader_key_hash
        self._scan_rows_max = scan_rows_max
        self._queues_max = queues_max

    def read(self) -> tuple[list[QueueInfo] | None, str]:
        """(queues, "") or (None, reason skipped). Any thread."""
        key_hash = self._reader_key_hash
        if key_hash is None:
            return None, "no_admin_key"

        def listing(store: Store) -> list[QueueInfo]:
            budgeted = _BudgetedStore(store, self._scan_rows_max)
            return self._state_machine.list_queues(budgeted, key_hash, False)

        try:
            queues = self._replication.read(listing)
        except _ScanBudgetExceeded:
            return None, "too_many_rows"
        except Exception as error:  # e.g. the admin is not registered yet: skip, not fail
            logger.debug("queue depths skipped: %s", error)
            return None, "unreadable"
        if len(queues) > self._queues_max:
            return None, "too_many_queues"
        return queues, ""


class NodeCollector(Collector):
    """Gauges computed at scrape time, on the HTTP server's thread."""

    def __init__(self, node_id: str, replication: Readable, queue_depths: QueueDepthReader) -> None:
        self._node_id = node_id
        self._replication = replication
        self._queue_depths = queue_depths

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; collect() reads live state

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "chasqui_node_info", "This node's id (value always 1).", 1, node_id=self._node_id
        )
        yield from _status_gauges(self._replication.status())
        queues, skipped = self._queue_depths.read()
        if queues is None:
            yield _gauge(
                "chasqui_queue_depths_skipped",
                "1 when queue depths were not read this scrape, with the reason.",
                1,
                reason=skipped,
            )
            return
        yield _gauge("chasqui_queues", "Queues in this node's applied state.", len(queues))
        depth = GaugeMetricFamily(
            "chasqui_queue_depth",
            "Messages stored in a queue: ready, delayed or leased.",
            labels=["queue"],
        )
        in_flight = GaugeMetricFamily(
            "chasqui_queue_in_flight",
            "Messages of a queue leased to consumers now.",
            labels=["queue"],
        )
        for queue in queues:
            depth.add_metric([queue.name], queue.depth)
            in_flight.add_metric([queue.name], queue.in_flight)
        yield depth
        yield in_flight


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def leader_reachable(status: ReplicationStatus) -> bool:
    """Whether this node leads, or names a leader it has a Raft connection to.

    A named leader alone is not enough: pysyncobj starts no election while a follower is
    connected to no one, so a follower whose peers all died keeps naming its old leader."""
    leader = status.leader
    if leader is None:
        return False
    if status.role is Role.LEADER:
        return True
    return any(peer.connected and peer.member.node_id == leader.node_id for peer in status.peers)


def _status_gauges(status: ReplicationStatus) -> Iterator[Metric]:
    role = GaugeMetricFamily(
        "chasqui_raft_role",
        "1 for this node's current Raft role, 0 for the others.",
        labels=["role"],
    )
    for candidate in Role:
        role.add_metric([candidate.value], 1 if status.role is candidate else 0)
    yield role
    yield _gauge("chasqui_raft_term", "Current Raft term.", status.term)
    yield _gauge(
        "chasqui_raft_commit_index", "Highest Raft index known committed.", status.commit_index
    )
    yield _gauge(
        "chasqui_raft_applied_index", "Highest Raft index applied to state.", status.applied_index
    )
    yield _gauge(
        "chasqui_raft_apply_lag",
        "Committed entries not yet applied here (commit index - applied index).",
        max(0, status.commit_index - status.applied_index),
    )
    yield _gauge("chasqui_raft_log_length", "Entries in the Raft log.", status.log_length)
    yield _gauge(
        "chasqui_raft_leader_known",
        "1 when this node is the leader or is connected to the leader it names.",
        int(leader_reachable(status)),
    )
    yield _gauge(
        "chasqui_raft_has_quorum", "1 when a majority is reachable.", int(status.has_quorum)
    )
    yield _gauge("chasqui_raft_peers", "Other members of the cluster.", len(status.peers))
    yield _gauge(
        "chasqui_raft_peers_connected",
        "Other members this node has a Raft connection to.",
        sum(1 for peer in status.peers if peer.connected),
    )
    yield _gauge(
        "chasqui_raft_peers_aes_gcm",
        "Other members this node's Raft messages go to sealed with AES-GCM; the others "
        "(nodes from before AES-GCM, during a rolling upgrade) get pysyncobj's Fernet.",
        sum(1 for peer in status.peers if peer.connected and peer.aes_gcm),
    )
    yield _gauge(
        "chasqui_clock_skew_seconds",
        "This node's wall clock minus cluster time (clock.py); leases, delays and TTLs follow "
        "cluster time, so a skew shows a wrong clock without changing them.",
        status.clock_skew_s,
    )
    yield _gauge(
        "chasqui_cluster_time_seconds",
        "This node's estimate of cluster time, as Unix seconds (0 before the first entry).",
        status.cluster_time_ms / 1000,
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line on stderr per scrape would drown the node's own log


def _bearer_required(app: WSGIApplication, token_hash: str) -> WSGIApplication:
    """`app` for callers that send `Authorization: Bearer <token>` whose SHA-256 (hex, as
    service.hash_key) is `token_hash`; everyone else gets 401 and nothing of the metrics."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() == "bearer" and hmac.compare_digest(presented, token_hash):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
        )
        return [b"send the metrics token as 'Authorization: Bearer <token>'\n"]

    return guarded


class MetricsHttpServer:
    """prometheus_client's `/metrics` WSGI app for one registry, served on `host:port` by a
    threading HTTP server on its own daemon thread; with `token_hash`, only to callers that
    present the token (see `_bearer_required`). Any thread."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, *, token_hash: str | None = None
    ) -> None:
        """Raises OSError when the address cannot be resolved or bound."""
        # As prometheus_client's start_http_server: the address family follows the host, so
        # an IPv6 host such as "::1" binds too.
        family, _, _, _, socket_address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        app = make_wsgi_app(registry)
        if token_hash is not None:
            app = _bearer_required(app, token_hash)
        server = make_server(str(socket_address[0]), port, app, Server, _QuietHandler)
        self._server: WSGIServer = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="chasqui-metrics-http", daemon=True
        )
        self._thread.start()
        self.host = host
        self.port: int = server.server_port

    def close(self) -> None:
        """Stop answering and free the port. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=limits.METRICS_STOP_WAIT_S)


def register_node_collector(
    metrics: NodeMetrics,
    node_id: str,
    replication: Readable,
    state_machine: StateMachine,
    reader_key_hash: str | None,
) -> None:
    """Add the scrape-time gauges of this node to its registry (once per `NodeMetrics`)."""
    metrics.registry.register(
        NodeCollector(
            node_id, replication, QueueDepthReader(replication, state_machine, reader_key_hash)
        )
    )
