"""Wires a node together and owns its start-up and shutdown.

    storage (LMDB) <- replicator (pysyncobj) <- service (gRPC)

`create_server(config)` builds and starts everything and returns `(server, port)`; `server.stop()`
shuts down in the reverse order: stop taking calls, stop Raft, close LMDB.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from chasqui_node import limits
from chasqui_node.replication import Member, RaftTimings, Replicator
from chasqui_node.service import BrokerService, ChangeBoard
from chasqui_node.state_machine import StateMachine
from chasqui_node.storage import Storage
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

GRPC_WORKERS = 128  # threads serving calls; long-polls hold one each while they wait
GRPC_CONCURRENT_CALLS_MAX = 512  # beyond this new calls get RESOURCE_EXHAUSTED, not a queue


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

    def member(self) -> Member:
        for member in self.members:
            if member.node_id == self.node_id:
                return member
        raise ConfigError(
            f"node id {self.node_id!r} is not in the cluster "
            f"({', '.join(m.node_id for m in self.members)})"
        )


class NodeServer:
    """A running node: gRPC server, Raft replicator and LMDB storage."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        member = config.member()
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
            ),
            self.grpc_server,
        )
        host, _, port = member.client_address.rpartition(":")
        bind_address = f"{config.bind_host or host}:{port}"
        self.port = self.grpc_server.add_insecure_port(bind_address)
        if self.port == 0:
            self.replicator.close()
            self.storage.close()
            raise ConfigError(f"cannot listen for clients on {bind_address}")
        self.grpc_server.start()
        logger.info(
            "node %s serving clients on %s, raft on %s, data in %s",
            config.node_id,
            bind_address,
            member.raft_address,
            config.data_dir,
        )

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving, stop Raft and close storage. Idempotent; any thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.grpc_server.stop(grace_s).wait(grace_s + 1)
        self.replicator.close()
        self.storage.close()
        logger.info("node %s stopped", self.config.node_id)

    def wait(self) -> None:
        self._stopped.wait()


def create_server(config: NodeConfig) -> tuple[NodeServer, int]:
    """Build and start a node; returns it and the client port it serves on."""
    server = NodeServer(config)
    return server, server.port
