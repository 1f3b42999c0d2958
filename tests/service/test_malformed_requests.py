"""Request bytes that do not parse, and a stream its client abandons before asking for anything,
are the client's doing: the node answers INVALID_ARGUMENT naming the message type (or ends the
stream quietly), counts the call like any other, and writes no traceback and nothing above
DEBUG to its log.

Garbage goes through a generic channel method without serializers, so the bytes reach the server
as they are, to every Broker method (each unary one and the ConsumeStream stream). The node is the
in-process one of `start_secured`: the fake replicator under the real service, registered by
`wire.add_broker_to_server` as server.py registers it. `caplog` captures every logger at DEBUG,
grpc's own included (grpc logs a failed parse with a traceback), and the call counts are read
from the service's metrics registry, waiting a bounded time for the service to record them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import wait_until
from tests.service.support import real_node
from tests.service.test_security_service import SecuredBroker, bearer, start_secured

BROKER = pb.DESCRIPTOR.services_by_name["Broker"]
UNARY_METHODS = [method.name for method in BROKER.methods if not method.client_streaming]
GARBAGE = b"\xff\xff\xff\xff"  # a tag whose varint never ends: no message type parses it
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def node() -> Iterator[SecuredBroker]:
    with start_secured() as broker:
        yield broker


def calls_counted(node: SecuredBroker, method_name: str, code: str) -> float:
    value = node.service.metrics.registry.get_sample_value(
        "chasqui_rpc_requests_total", {"method": method_name, "code": code}
    )
    return value or 0.0


def assert_logged_quietly(caplog: pytest.LogCaptureFixture, level_max: int = logging.DEBUG) -> None:
    """Nothing above `level_max` and no traceback, from any logger."""
    loud = [
        f"{record.levelname} {record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno > level_max or record.exc_info or "Traceback" in record.getMessage()
    ]
    assert not loud, loud


def still_serves(node: SecuredBroker, channel: grpc.Channel) -> None:
    """A good call on the same connection right after is answered as usual."""
    answer = pb_grpc.BrokerStub(channel).WhoAmI(pb.WhoAmIRequest(), metadata=node.admin, timeout=5)
    assert answer.admin


@pytest.mark.parametrize("method_name", UNARY_METHODS)
def test_garbage_to_a_unary_method_is_invalid_argument_before_any_key_check(
    node: SecuredBroker, method_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    channel = node.open_channel()
    call = channel.unary_unary(f"/{BROKER.full_name}/{method_name}")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as refused:
        call(GARBAGE, timeout=5)  # no key: the bytes are refused first
    error = refused.value
    type_name = BROKER.methods_by_name[method_name].input_type.full_name
    assert error.code() is INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert error.details().startswith(f"request is not a valid {type_name}: "), error.details()
    wait_until(
        lambda: calls_counted(node, method_name, "INVALID_ARGUMENT") == 1,
        5,
        f"{method_name} counted as INVALID_ARGUMENT",
    )
    still_serves(node, channel)
    assert_logged_quietly(caplog)


def test_garbage_as_the_first_stream_request_is_invalid_argument(
    node: SecuredBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    channel = node.open_channel()
    stream = channel.stream_stream(f"/{BROKER.full_name}/ConsumeStream")
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(iter([GARBAGE]), metadata=node.admin, timeout=5))
    error = refused.value
    assert error.code() is INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert error.details().startswith("request is not a valid chasqui.v1.ConsumeStreamRequest: ")
    wait_until(
        lambda: calls_counted(node, "ConsumeStream", "INVALID_ARGUMENT") == 1,
        5,
        "ConsumeStream counted as INVALID_ARGUMENT",
    )
    still_serves(node, channel)
    assert_logged_quietly(caplog)


def test_garbage_after_a_good_first_request_ends_the_stream_with_invalid_argument(
    node: SecuredBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Later requests (credit grants) are read on the stream's own credit thread; the refusal
    still reaches the client as the stream's status."""
    user = node.new_user()
    node.stub.CreateQueue(pb.CreateQueueRequest(name="jobs"), metadata=user, timeout=5)
    caplog.set_level(logging.DEBUG)
    first = pb.ConsumeStreamRequest(kind=pb.QUEUE, name="jobs", credit=1).SerializeToString()
    channel = node.open_channel()
    stream = channel.stream_stream(f"/{BROKER.full_name}/ConsumeStream")
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(iter([first, GARBAGE]), metadata=user, timeout=10))
    error = refused.value
    assert error.code() is INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert "chasqui.v1.ConsumeStreamRequest" in error.details()
    wait_until(
        lambda: calls_counted(node, "ConsumeStream", "INVALID_ARGUMENT") == 1,
        5,
        "ConsumeStream counted as INVALID_ARGUMENT",
    )
    still_serves(node, channel)
    assert_logged_quietly(caplog)


def test_a_stream_cancelled_before_its_first_request_ends_quietly(
    node: SecuredBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Any bearer string gets the stream as far as waiting for its first request; a client
    that cancels there ends a call, nothing more: counted CANCELLED, nothing logged."""
    caplog.set_level(logging.DEBUG)
    release = threading.Event()

    def nothing_yet() -> Iterator[pb.ConsumeStreamRequest]:
        release.wait(10)
        yield from ()

    stub = pb_grpc.BrokerStub(node.open_channel())
    responses = stub.ConsumeStream(nothing_yet(), metadata=bearer("any-string-at-all"), timeout=10)
    try:
        wait_until(node.service.connection_slots.in_flight, 5, "the stream to reach the service")
        responses.cancel()
    finally:
        release.set()
    wait_until(
        lambda: calls_counted(node, "ConsumeStream", "CANCELLED") == 1,
        5,
        "the stream to end, counted as CANCELLED",
    )
    assert calls_counted(node, "ConsumeStream", "INTERNAL") == 0
    assert not node.service.connection_slots.in_flight()
    assert_logged_quietly(caplog)


def test_a_real_node_logs_no_traceback_for_garbage_to_any_service_on_its_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """server.py's wiring, on a real one-node cluster: the Broker refuses garbage with
    INVALID_ARGUMENT; health and reflection keep grpc's own parsers and still answer INTERNAL,
    but grpc's traceback for it is down to a DEBUG line as well."""
    caplog.set_level(logging.DEBUG)
    with (
        real_node(tmp_path) as node,
        grpc.insecure_channel(f"127.0.0.1:{node.port}") as channel,
    ):
        caplog.clear()  # start-up logs at INFO; what matters is what the calls write
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{BROKER.full_name}/Publish")(GARBAGE, timeout=5)
        assert refused.value.code() is INVALID_ARGUMENT, refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/grpc.health.v1.Health/Check")(GARBAGE, timeout=5)
        assert refused.value.code() is grpc.StatusCode.INTERNAL, refused.value.details()
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection(iter([GARBAGE]), timeout=5))
        assert refused.value.code() is grpc.StatusCode.INTERNAL, refused.value.details()
        status = pb_grpc.BrokerStub(channel).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        assert status.node_id == "n1"
        # The node may log its election at INFO meanwhile; nothing louder, and no traceback.
        assert_logged_quietly(caplog, level_max=logging.INFO)
    assert any("did not parse" in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def fuzzed_channel() -> Iterator[grpc.Channel]:
    with start_secured() as broker:
        yield broker.open_channel()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method_name=st.sampled_from(UNARY_METHODS), data=st.binary(max_size=64))
def test_random_bytes_never_get_internal(
    fuzzed_channel: grpc.Channel, method_name: str, data: bytes
) -> None:
    """Whatever the bytes, the answer is a parse (then the call's own verdict, without a key)
    or INVALID_ARGUMENT; never INTERNAL or UNKNOWN."""
    request_class = getattr(pb, BROKER.methods_by_name[method_name].input_type.name)
    try:
        request_class.FromString(data)
        parses = True
    except Exception:
        parses = False
    call = fuzzed_channel.unary_unary(f"/{BROKER.full_name}/{method_name}")
    try:
        call(data, timeout=5)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            f"{error.code()}: {error.details()}"
        )
        if not parses:
            assert error.code() is INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    else:
        assert parses, f"{method_name} answered bytes that do not parse: {data!r}"
