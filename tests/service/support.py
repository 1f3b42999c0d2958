"""Small helpers shared by the service tests: catching a refusal and reading state back."""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from chasqui_node.replication import Member
from chasqui_node.server import NodeConfig, NodeServer, create_server
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

Metadata = tuple[tuple[str, str], ...]


def refusal(
    method: Callable[..., Any],
    request: Any,
    metadata: Metadata = (),
    code: grpc.StatusCode | None = None,
) -> grpc.RpcError:
    """Call `method`, expect it to fail, and return the error. With `code`, assert it too.
    INTERNAL is never an acceptable answer to a bad request, so it is rejected outright."""
    with pytest.raises(grpc.RpcError) as caught:
        method(request, metadata=metadata, timeout=10)
    error = caught.value
    assert error.code() is not grpc.StatusCode.INTERNAL, error.details()
    if code is not None:
        assert error.code() is code, f"{error.code()}: {error.details()}"
    return error


def queues(stub: pb_grpc.BrokerStub, metadata: Metadata) -> dict[str, Any]:
    """Every queue by name, as ListQueues reports it."""
    response = stub.ListQueues(pb.ListQueuesRequest(), metadata=metadata, timeout=5)
    return {queue.name: queue for queue in response.queues}


def topics(stub: pb_grpc.BrokerStub, metadata: Metadata) -> dict[str, Any]:
    """Every topic by name, as ListTopics reports it."""
    response = stub.ListTopics(pb.ListTopicsRequest(), metadata=metadata, timeout=5)
    return {topic.name: topic for topic in response.topics}


def depth(stub: pb_grpc.BrokerStub, metadata: Metadata, queue_name: str) -> int:
    depth_now: int = queues(stub, metadata)[queue_name].depth
    return depth_now


def create_queue(stub: pb_grpc.BrokerStub, metadata: Metadata, name: str, **fields: Any) -> None:
    stub.CreateQueue(pb.CreateQueueRequest(name=name, **fields), metadata=metadata, timeout=5)


def create_topic(stub: pb_grpc.BrokerStub, metadata: Metadata, name: str) -> None:
    stub.CreateTopic(pb.CreateTopicRequest(name=name), metadata=metadata, timeout=5)


def publish(
    stub: pb_grpc.BrokerStub,
    metadata: Metadata,
    name: str,
    body: bytes = b"hello",
    kind: int = pb.QUEUE,
    **fields: Any,
) -> Any:
    request = pb.PublishRequest(kind=kind, name=name, body=body, **fields)
    return stub.Publish(request, metadata=metadata, timeout=10).receipt


def consume(
    stub: pb_grpc.BrokerStub,
    metadata: Metadata,
    name: str,
    kind: int = pb.QUEUE,
    **fields: Any,
) -> list[Any]:
    request = pb.ConsumeRequest(kind=kind, name=name, **fields)
    return list(stub.Consume(request, metadata=metadata, timeout=10).deliveries)


def free_port(host: str) -> int:
    """A TCP port free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def real_node(
    data_dir: Path, client_host: str = "127.0.0.1", **settings: Any
) -> Iterator[NodeServer]:
    """A real one-node cluster in-process, as server.py wires a node (pysyncobj, LMDB under
    `data_dir`), its client port on `client_host`, /metrics on any free port, `settings` for
    the rest of `NodeConfig`; stopped on exit. About half a second: for what only the wiring
    shows, where the fake replicator would prove nothing."""
    member = Member(
        "n1", f"{client_host}:{free_port(client_host)}", f"127.0.0.1:{free_port('127.0.0.1')}"
    )
    config = NodeConfig(
        node_id="n1",
        data_dir=data_dir,
        members=(member,),
        cluster_secret=secrets.token_urlsafe(32),
        fsync=False,
        metrics_port=0,
        **settings,
    )
    server, _ = create_server(config)
    try:
        yield server
    finally:
        server.stop(grace_s=0.2)
