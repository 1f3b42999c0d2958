"""Wires a node together and owns its start-up and shutdown.

    storage (LMDB) <- replicator (pysyncobj) <- service (gRPC)

`create_server(config)` builds and starts everything and returns `(server, port)`; `server.stop()`
shuts down in the reverse order: stop taking calls, stop Raft, close LMDB.

Security wiring: the client port speaks TLS when a certificate is configured (mutual TLS with a
client CA); the Raft port always needs the cluster secret (see replication.py). A configured
admin key reaches this module only as its hash: whenever this node becomes leader it proposes
`EnsureAdmin(hash)`, so the admin is replicated state that every node agrees on.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from chasqui_node import limits
from chasqui_node.commands import EnsureAdmin, UserCreated
from chasqui_node.errors import ChasquiError
from chasqui_node.replication import Member, RaftTimings, Replicator
from chasqui_node.service import BrokerService, ChangeBoard
from chasqui_node.state_machine import StateMachine
from chasqui_node.storage import Storage
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

GRPC_WORKERS = 128  # threads serving calls; long-polls hold one each while they wait
GRPC_CONCURRENT_CALLS_MAX = 512  # beyond this new calls get RESOURCE_EXHAUSTED, not a queue
ADMIN_CHECK_S = 0.25  # how often a node looks whether it just became leader


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
        self.config = config
        member = config.member()
        credentials = server_credentials(config)  # before anything starts: fail fast
        self._stopped = threading.Event()
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
        )
        self.grpc_server = grpc.server(
            ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="chasqui-grpc"),
            maximum_concurrent_rpcs=GRPC_CONCURRENT_CALLS_MAX,
            options=[
                ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_BrokerServicer_to_server(
            BrokerService(
                self.replicator,
                self.state_machine,
                self.change_board,
                proposal_timeout_s=config.proposal_timeout_s,
                signup_open=config.signup_open,
                calls_in_flight_per_connection_max=config.calls_in_flight_per_connection_max,
            ),
            self.grpc_server,
        )
        host, _, port = member.client_address.rpartition(":")
        bind_address = f"{config.bind_host or host}:{port}"
        if credentials is None:
            self.port = self.grpc_server.add_insecure_port(bind_address)
        else:
            self.port = self.grpc_server.add_secure_port(bind_address, credentials)
        if self.port == 0:
            self.replicator.close()
            self.storage.close()
            raise ConfigError(f"cannot listen for clients on {bind_address}")
        self.grpc_server.start()
        if config.admin_key_hash is not None:
            threading.Thread(
                target=self._ensure_admin_loop,
                args=(config.admin_key_hash,),
                name="chasqui-ensure-admin",
                daemon=True,
            ).start()
        logger.info(
            "node %s serving clients on %s (%s), raft on %s, data in %s, signup %s",
            config.node_id,
            bind_address,
            _tls_mode(config),
            member.raft_address,
            config.data_dir,
            "open" if config.signup_open else "closed",
        )

    def _ensure_admin_loop(self, key_hash: str) -> None:
        """Each time this node becomes leader, propose `EnsureAdmin` once (retrying until it
        commits or leadership is lost). Idempotent, so every leader doing it is harmless."""
        ensured_while_leading = False
        while not self._stopped.wait(ADMIN_CHECK_S):
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

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving, stop Raft and close storage. Idempotent; any thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.change_board.close()  # long-polls end now, not after their timeout
        self.grpc_server.stop(grace_s).wait(grace_s + 1)
        self.replicator.close()
        self.storage.close()
        logger.info("node %s stopped", self.config.node_id)

    def wait(self) -> None:
        self._stopped.wait()


def _tls_mode(config: NodeConfig) -> str:
    if config.tls_cert is None:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca is not None else "TLS"


def create_server(config: NodeConfig) -> tuple[NodeServer, int]:
    """Build and start a node; returns it and the client port it serves on."""
    server = NodeServer(config)
    return server, server.port
