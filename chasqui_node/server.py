"""Wires a node together and owns its start-up and shutdown.

    storage (LMDB) <- replicator (pysyncobj) <- service (gRPC)

`create_server(config)` builds and starts everything and returns `(server, port)`; `server.stop()`
shuts down in the reverse order: report NOT_SERVING, stop taking calls, stop Raft, close LMDB.

Operability wiring: the client port also serves the standard `grpc.health.v1.Health` service
(SERVING only while this node knows a leader and has applied what it knows committed; a
`HealthReporter` thread re-evaluates that every `limits.HEALTH_CHECK_S`) and gRPC server
reflection for the Broker and Health services. With `metrics_port` set, a Prometheus
`/metrics` endpoint serves this node's own registry (see metrics.py) on `metrics_bind`, by
default the host the client port binds. It lists every queue's name and depth, so an operator
who does not want it reachable from the clients' network binds it to 127.0.0.1 (or a private
interface), or requires a bearer token (`metrics_token_hash`).

Security wiring: the client port speaks TLS when a certificate is configured (mutual TLS with a
client CA); the Raft port always needs the cluster secret (see replication.py). A configured
admin key reaches this module only as its hash: whenever this node becomes leader it proposes
`EnsureAdmin(hash)`, so the admin is replicated state that every node agrees on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import ProcessCollector

from chasqui_node import limits, raft
from chasqui_node.commands import EnsureAdmin, UserCreated
from chasqui_node.errors import ChasquiError
from chasqui_node.long_poll import ChangeBoard
from chasqui_node.metrics import (
    MetricsHttpServer,
    NodeMetrics,
    leader_reachable,
    register_node_collector,
)
from chasqui_node.replication import Member, RaftTimings, ReplicationStatus, Replicator
from chasqui_node.service import BrokerService
from chasqui_node.state import StateMachine
from chasqui_node.storage import Storage
from chasqui_node.wire import add_broker_to_server, quiet_grpc_parse_failures
from chasqui_proto import chasqui_pb2 as pb

logger = logging.getLogger(__name__)

BROKER_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Broker"].full_name  # chasqui.v1.Broker


class ConfigError(ValueError):
    """The node's configuration is unusable; the message says which value and why."""


def parse_cluster(text: str) -> tuple[Member, ...]:
    """Parse `n1=HOST:PORT/HOST:PORT,n2=...` (client address / Raft address per member)."""
    members: list[Member] = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        node_id, equals, addresses = part.partition("=")
        client_address, slash, raft_address = addresses.partition("/")
        if not (equals and slash and node_id and client_address and raft_address):
            raise ConfigError(f"cluster member {part!r} is not ID=CLIENT_HOST:PORT/RAFT_HOST:PORT")
        for address in (client_address, raft_address):
            host, colon, port = address.rpartition(":")
            if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(f"address {address!r} of member {node_id} is not HOST:PORT")
        members.append(Member(node_id, client_address, raft_address))
    if not members:
        raise ConfigError("the cluster is empty; give --cluster ID=CLIENT/RAFT,...")
    for attribute in ("node_id", "client_address", "raft_address"):
        values = [getattr(member, attribute) for member in members]
        if len(set(values)) != len(values):
            raise ConfigError(f"cluster members repeat a {attribute.replace('_', ' ')}: {values}")
    return tuple(members)


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    data_dir: Path
    members: tuple[Member, ...]
    cluster_secret: str
    bind_host: str | None = None  # None: bind the listed addresses; "0.0.0.0": all interfaces
    fsync: bool = True
    proposal_timeout_s: float = limits.PROPOSAL_TIMEOUT_S_DEFAULT
    timings: RaftTimings = field(default_factory=RaftTimings)
    # Security. The admin key is held only as its hash, so no log line or repr can show it.
    admin_key_hash: str | None = None
    signup_open: bool = True
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, clients must use TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle; clients must present a cert it signed
    calls_in_flight_per_connection_max: int = limits.CALLS_IN_FLIGHT_PER_CONNECTION_MAX
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port (tests)
    metrics_bind: str | None = None  # None: the client port's bind host; "127.0.0.1": local only
    # Hash (service.hash_key) of the bearer token /metrics requires; None: no token required.
    metrics_token_hash: str | None = None

    def member(self) -> Member:
        for member in self.members:
            if member.node_id == self.node_id:
                return member
        raise ConfigError(
            f"node id {self.node_id!r} is not in the cluster "
            f"({', '.join(m.node_id for m in self.members)})"
        )


def server_credentials(config: NodeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the client port, or None for plaintext. Raises ConfigError for an
    incomplete setting or an unreadable file."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together; give both")
    try:
        cert = config.tls_cert.read_bytes()
        key = config.tls_key.read_bytes()
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except OSError as error:
        raise ConfigError(f"cannot read a TLS file: {error}") from error
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class NodeServer:
    """A running node: gRPC server, Raft replicator and LMDB storage."""

    def __init__(self, config: NodeConfig) -> None:
        # The Raft layer's checks and its changes to pysyncobj, before anything is opened or
        # built on them: raises raft.PysyncobjMismatch against another pysyncobj release.
        raft.install()
        self.config = config
        member = config.member()
        credentials = server_credentials(config)  # before anything starts: fail fast
        self._stopped = threading.Event()
        self.metrics = NodeMetrics()
        self.storage = Storage(config.data_dir, fsync=config.fsync)
        self.state_machine = StateMachine()
        self.change_board = ChangeBoard()
        self.replicator = Replicator(
            config.node_id,
            config.members,
            config.data_dir,
            self.storage,
            self.state_machine,
            cluster_secret=config.cluster_secret,
            bind_host=config.bind_host,
            timings=config.timings,
            fsync=config.fsync,
            on_applied=self.change_board.on_applied,
            on_journal_sync=self.metrics.observe_journal_sync,
        )
        self.grpc_server = grpc.server(
            ThreadPoolExecutor(max_workers=limits.GRPC_WORKERS, thread_name_prefix="chasqui-grpc"),
            maximum_concurrent_rpcs=limits.GRPC_CONCURRENT_CALLS_MAX,
            options=[
                ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 0),
            ],
        )
        quiet_grpc_parse_failures()  # health and reflection keep grpc's parsers (see wire.py)
        add_broker_to_server(
            BrokerService(
                self.replicator,
                self.state_machine,
                self.change_board,
                proposal_timeout_s=config.proposal_timeout_s,
                signup_open=config.signup_open,
                calls_in_flight_per_connection_max=config.calls_in_flight_per_connection_max,
                metrics=self.metrics,
            ),
            self.grpc_server,
        )
        self.health = add_health_and_reflection(self.grpc_server)
        host, _, port = member.client_address.rpartition(":")
        bind_host = config.bind_host or host
        bind_address = f"{bind_host}:{port}"
        if credentials is None:
            self.port = self.grpc_server.add_insecure_port(bind_address)
        else:
            self.port = self.grpc_server.add_secure_port(bind_address, credentials)
        if self.port == 0:
            self.replicator.close()
            self.storage.close()
            raise ConfigError(f"cannot listen for clients on {bind_address}")
        register_node_collector(
            self.metrics,
            config.node_id,
            self.replicator,
            self.state_machine,
            reader_key_hash=config.admin_key_hash,
        )
        ProcessCollector(registry=self.metrics.registry)
        self.metrics_server: MetricsHttpServer | None = None
        metrics_host = config.metrics_bind or bind_host
        if config.metrics_port is not None:
            try:
                self.metrics_server = MetricsHttpServer(
                    self.metrics.registry,
                    metrics_host,
                    config.metrics_port,
                    token_hash=config.metrics_token_hash,
                )
            except OSError as error:
                self.replicator.close()
                self.storage.close()
                raise ConfigError(
                    f"cannot serve metrics on {metrics_host}:{config.metrics_port}: {error}"
                ) from error
        self.health_reporter = HealthReporter(self.health, self.replicator.status)
        self.health_reporter.start()
        self.grpc_server.start()
        if config.admin_key_hash is not None:
            threading.Thread(
                target=self._ensure_admin_loop,
                args=(config.admin_key_hash,),
                name="chasqui-ensure-admin",
                daemon=True,
            ).start()
        logger.info(
            "node %s serving clients on %s (%s), raft on %s, data in %s, signup %s, metrics %s",
            config.node_id,
            bind_address,
            _tls_mode(config),
            member.raft_address,
            config.data_dir,
            "open" if config.signup_open else "closed",
            "off"
            if self.metrics_server is None
            else f"on http://{metrics_host}:{self.metrics_server.port}/metrics"
            + (" (bearer token required)" if config.metrics_token_hash else ""),
        )

    def _ensure_admin_loop(self, key_hash: str) -> None:
        """Each time this node becomes leader, propose `EnsureAdmin` once (retrying until it
        commits or leadership is lost). Idempotent, so every leader doing it is harmless."""
        ensured_while_leading = False
        while not self._stopped.wait(limits.ADMIN_CHECK_S):
            if not self.replicator.is_leader():
                ensured_while_leading = False
                continue
            if ensured_while_leading:
                continue
            try:
                result = self.replicator.propose(
                    EnsureAdmin(key_hash=key_hash), self.config.proposal_timeout_s
                )
            except ChasquiError as error:
                logger.info("admin key not registered yet (%s); retrying", error.message)
                continue
            ensured_while_leading = True
            if isinstance(result, UserCreated):
                logger.info("the configured admin key belongs to admin user %s", result.user_id)
            elif isinstance(result, ChasquiError):
                logger.warning("the configured admin key was not registered: %s", result.message)

    def stop(self, grace_s: float = limits.SERVER_STOP_GRACE_S) -> None:
        """Stop serving, stop Raft and close storage. Idempotent; any thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # NOT_SERVING first, so load balancers and health-checking clients move away before
        # calls start being refused.
        self.health_reporter.stop()
        self.change_board.close()  # long-polls end now, not after their timeout
        self.grpc_server.stop(grace_s).wait(grace_s + 1)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.replicator.close()
        self.storage.close()
        logger.info("node %s stopped", self.config.node_id)

    def wait(self) -> None:
        self._stopped.wait()


def is_serving(status: ReplicationStatus, apply_lag_max: int = limits.HEALTH_APPLY_LAG_MAX) -> bool:
    """SERVING means: this node knows a leader it can reach (see `leader_reachable`), sees a
    majority, and has applied everything it knows committed, give or take `apply_lag_max`
    entries, so what it reads is current and what it forwards or proposes can commit."""
    if not (leader_reachable(status) and status.has_quorum):
        return False
    return status.commit_index - status.applied_index <= apply_lag_max


def add_health_and_reflection(grpc_server: grpc.Server) -> health.HealthServicer:
    """Add the standard health service (starting NOT_SERVING) and server reflection for the
    Broker and Health services to a server not yet started; return the health servicer."""
    servicer = health.HealthServicer()
    for service_name in ("", BROKER_SERVICE_NAME):
        servicer.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    reflection.enable_server_reflection(
        (
            BROKER_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    return servicer


class HealthReporter:
    """Keeps the health service's status for "" (the whole server) and the Broker service in
    step with `is_serving`, re-evaluated every `interval_s` on one daemon thread. `stop()`
    reports NOT_SERVING for good (the node is going away). Any thread."""

    def __init__(
        self,
        servicer: health.HealthServicer,
        status: Callable[[], ReplicationStatus],
        *,
        interval_s: float = limits.HEALTH_CHECK_S,
        apply_lag_max: int = limits.HEALTH_APPLY_LAG_MAX,
    ) -> None:
        self._servicer = servicer
        self._status = status
        self._interval_s = interval_s
        self._apply_lag_max = apply_lag_max
        self._stopped = threading.Event()
        self._serving: bool | None = None
        self._thread = threading.Thread(target=self._loop, name="chasqui-health", daemon=True)

    def start(self) -> None:
        self.update()
        self._thread.start()

    def update(self) -> bool:
        """Evaluate once and publish the result; return whether the node is serving."""
        try:
            serving = is_serving(self._status(), self._apply_lag_max)
        except Exception:  # a status that cannot be read is not a healthy node
            logger.exception("cannot read replication status for the health check")
            serving = False
        if serving != self._serving and not self._stopped.is_set():
            self._serving = serving
            code = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service_name in ("", BROKER_SERVICE_NAME):
                self._servicer.set(service_name, code)
            logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        return serving

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.update()

    def stop(self) -> None:
        """Report NOT_SERVING for every service from now on. Idempotent."""
        self._stopped.set()
        self._servicer.enter_graceful_shutdown()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval_s + 1)


def _tls_mode(config: NodeConfig) -> str:
    if config.tls_cert is None:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca is not None else "TLS"


def create_server(config: NodeConfig) -> tuple[NodeServer, int]:
    """Build and start a node; returns it and the client port it serves on."""
    server = NodeServer(config)
    return server, server.port
