"""The client's local checks, error mapping and value types, without any server.

Stateless limits (names, sizes, counts, durations) are checked before anything is sent: each is
tried just under, exactly at and just over its bound. A value that passes the local checks goes
on to the network, where the only endpoint refuses connections; reaching `NoEndpointAvailable`
therefore proves the check let it through. The mirrored limits are compared with the node's.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

import chasqui_client
from chasqui_client import Client, Message, Receipt, errors, limits
from chasqui_client.client import _split_batches
from chasqui_client.models import Kind
from chasqui_node import limits as node_limits

MIB = 1024 * 1024


@pytest.fixture
def client() -> Iterator[Client]:
    """A client whose only endpoint refuses connections, with a short budget."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client([f"127.0.0.1:{port}"], key="k", call_timeout_s=0.2) as client:
        yield client


def passes_local_checks(call: Callable[[], object]) -> bool:
    try:
        call()
    except errors.NoEndpointAvailable:
        return True
    return False


def message(kind: Kind = Kind.QUEUE) -> Message:
    return Message(kind, "jobs", 7, b"\xff", 1, 0, "p", 0)


# ---- limits mirror the node's ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MESSAGE_BYTES_MAX",
        "NAME_BYTES_MAX",
        "NAME_ALPHABET",
        "PUBLISH_BATCH_MESSAGES_MAX",
        "PUBLISH_BATCH_BYTES_MAX",
        "CONSUME_MESSAGES_MAX",
        "ACK_BATCH_MAX",
        "GRPC_MESSAGE_BYTES_MAX",
        "CONSUME_WAIT_S_MAX",
        "VISIBILITY_TIMEOUT_MS_MAX",
        "DELAY_MS_MAX",
        "MESSAGE_TTL_MS_MAX",
        "MAX_DELIVERIES_MAX",
    ],
)
def test_client_limit_mirrors_the_node_limit(name: str) -> None:
    assert getattr(limits, name) == getattr(node_limits, name)


def test_client_package_does_not_import_the_node() -> None:
    import pathlib

    package = pathlib.Path(chasqui_client.__file__).parent
    for source in package.glob("*.py"):
        assert "chasqui_node" not in source.read_text().replace("`chasqui_node", ""), source


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 199, 200])
def test_name_up_to_200_bytes_passes(client: Client, size: int) -> None:
    assert passes_local_checks(lambda: client.create_queue("q" * size))


def test_name_of_201_bytes_is_rejected(client: Client) -> None:
    with pytest.raises(
        errors.InvalidArgument, match="must be 1 to name_bytes_max 200 bytes, got 201"
    ):
        client.create_topic("t" * 201)


@pytest.mark.parametrize("name", ["", "has space", "slash/y", "ñandú", "tab\t"])
def test_name_outside_the_alphabet_or_empty_is_rejected(client: Client, name: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"queue name .* is invalid") as raised:
        client.publish_queue(name, b"x")
    assert raised.value.code == "INVALID_ARGUMENT"


def test_name_rule_applies_to_every_call_and_to_the_dead_letter_queue(client: Client) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.create_queue("ok", dead_letter_queue="bad name"),
        lambda: client.delete_queue("bad name"),
        lambda: client.delete_topic("bad name"),
        lambda: client.subscribe_topic("bad name"),
        lambda: client.subscribe_queue("bad name"),
        lambda: client.unsubscribe_topic("bad name"),
        lambda: client.unsubscribe_queue("bad name"),
        lambda: client.publish_topic("bad name", b"x"),
        lambda: client.publish_many_queue("bad name", [b"x"]),
        lambda: client.consume_queue("bad name"),
        lambda: client.consume_many_topic("bad name", 2),
    ]
    for call in calls:
        with pytest.raises(errors.InvalidArgument, match="'bad name' is invalid"):
            call()


# ---- message sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, MIB - 1, MIB])
def test_message_up_to_1_mib_passes(client: Client, size: int) -> None:
    assert passes_local_checks(lambda: client.publish_queue("jobs", b"x" * size))


def test_message_over_1_mib_is_rejected_with_the_server_wording(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument) as raised:
        client.publish_topic("news", b"x" * (2 * MIB))
    assert raised.value.message == "message of 2097152 bytes exceeds message_bytes_max 1048576"


def test_str_body_is_measured_in_utf8_bytes(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="message of 1048578 bytes"):
        client.publish_queue("jobs", "é" * (MIB // 2 + 1))


def test_one_oversized_body_rejects_the_whole_publish_many(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="message of 1048577 bytes"):
        client.publish_many_topic("news", [b"ok", b"x" * (MIB + 1)])


def test_body_of_another_type_is_rejected(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="bytes or str"):
        client.publish_queue("jobs", 42)  # type: ignore[arg-type]


def test_batches_split_at_500_messages_and_at_4_mib() -> None:
    assert [len(batch) for batch in _split_batches([b"x"] * 1001)] == [500, 500, 1]
    assert [len(batch) for batch in _split_batches([b"x"] * 500)] == [500]
    assert [len(batch) for batch in _split_batches([b"x" * MIB] * 4)] == [4]
    assert [len(batch) for batch in _split_batches([b"x" * MIB] * 4 + [b"y"])] == [4, 1]
    assert _split_batches([]) == []


# ---- counts and durations --------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 499, 500])
def test_consume_many_up_to_500_passes(client: Client, count: int) -> None:
    assert passes_local_checks(lambda: client.consume_many_queue("jobs", count))


@pytest.mark.parametrize("count", [0, 501])
def test_consume_many_outside_1_to_500_is_rejected(client: Client, count: int) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"max_messages of {count} is outside"):
        client.consume_many_topic("news", count)


def test_consume_wait_beyond_60_s_or_negative_is_rejected(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"timeout_s of 60\.001 is outside"):
        client.consume_queue("jobs", timeout_s=60.001)
    with pytest.raises(errors.InvalidArgument, match="timeout_s of -1 is outside"):
        client.consume_topic("news", timeout_s=-1)


def test_delay_up_to_15_minutes_passes_and_beyond_is_rejected(client: Client) -> None:
    assert passes_local_checks(lambda: client.publish_queue("jobs", b"x", delay_s=900))
    with pytest.raises(errors.InvalidArgument, match="delay of 900001 ms exceeds delay_ms_max"):
        client.publish_queue("jobs", b"x", delay_s=900.001)
    with pytest.raises(errors.InvalidArgument, match="must not be negative"):
        client.nack(message(), delay_s=-1)


def test_queue_options_are_checked(client: Client) -> None:
    assert passes_local_checks(
        lambda: client.create_queue(
            "jobs",
            visibility_timeout_s=12 * 3600,
            max_deliveries=1000,
            overflow="drop_head",
            message_ttl_s=14 * 24 * 3600,
        )
    )
    bad: list[tuple[dict[str, Any], str]] = [
        ({"visibility_timeout_s": 12 * 3600 + 1}, "exceeds visibility_timeout_ms_max"),
        ({"visibility_timeout_s": 0}, "must be positive"),
        ({"max_deliveries": 1001}, "max_deliveries of 1001 exceeds max_deliveries_max 1000"),
        ({"max_deliveries": -1}, "must not be negative"),
        ({"max_length": -1}, "must not be negative"),
        ({"overflow": "drop_tail"}, "overflow 'drop_tail' is invalid"),
        ({"message_ttl_s": 14 * 24 * 3600 + 1}, "exceeds message_ttl_ms_max"),
    ]
    for options, wording in bad:
        with pytest.raises(errors.InvalidArgument, match=wording):
            client.create_queue("jobs", **options)


def test_subscribe_start_must_be_known(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="start 'middle' is invalid"):
        client.subscribe_topic("news", start="middle")
    assert passes_local_checks(lambda: client.subscribe_topic("news", start="earliest"))


def test_empty_ack_sends_nothing(client: Client) -> None:
    client.ack([])  # would raise NoEndpointAvailable if it had sent anything


def test_endpoints_must_be_a_list_of_addresses() -> None:
    with pytest.raises(TypeError):
        Client("127.0.0.1:7101", key="k")
    with pytest.raises(ValueError, match="non-empty"):
        Client([], key="k")


# ---- errors ----------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.ABORTED, errors.OutcomeUnknown),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.OutcomeUnknown),
        (grpc.StatusCode.INTERNAL, errors.Internal),
        (grpc.StatusCode.UNIMPLEMENTED, errors.Internal),
    ],
)
def test_rpc_error_maps_to_its_typed_exception(
    code: grpc.StatusCode, error_class: type[errors.ChasquiError]
) -> None:
    mapped = errors.from_rpc_error(FakeRpcError(code, 'queue "orders" does not exist'))
    assert type(mapped) is error_class
    assert isinstance(mapped, errors.ChasquiError)
    assert (mapped.code, mapped.message) == (code.name, 'queue "orders" does not exist')
    assert str(mapped) == f'{code.name}: queue "orders" does not exist'


def test_no_endpoint_available_is_unavailable_and_names_each_endpoint() -> None:
    error = errors.NoEndpointAvailable(2.0, {"a:1": "UNAVAILABLE: refused", "b:2": "timed out"})
    assert isinstance(error, errors.Unavailable)
    assert error.code == "UNAVAILABLE"
    assert "a:1 (UNAVAILABLE: refused)" in error.message and "b:2 (timed out)" in error.message


# ---- values ----------------------------------------------------------------------------------


def test_message_id_and_text() -> None:
    topic_message = Message(Kind.TOPIC, "news", 3, "día".encode(), 1, 0, "p", 0)
    assert (topic_message.id, topic_message.text, topic_message.kind) == (
        "topic:news:3",
        "día",
        "topic",
    )
    with pytest.raises(UnicodeDecodeError):
        _ = message().text
    with pytest.raises(AttributeError):
        topic_message.body = b"changed"  # type: ignore[misc]


def test_public_names_are_exported() -> None:
    for name in ["Client", "Message", "Receipt", "TopicInfo", "QueueInfo", "errors"]:
        assert hasattr(chasqui_client, name)
    assert Receipt(1, False) == Receipt(sequence=1, duplicate=False)


@pytest.mark.parametrize("name", ["", "x" * 201, "has space", "ñandú", "a" * 70 + "/"])
def test_name_errors_read_exactly_like_the_node(client: Client, name: str) -> None:
    from chasqui_node import commands
    from chasqui_node import errors as node_errors

    with pytest.raises(node_errors.InvalidName) as node_raised:
        commands.check_name(commands.Kind.QUEUE, name)
    with pytest.raises(errors.InvalidArgument) as client_raised:
        client.create_queue(name)
    assert client_raised.value.message == node_raised.value.message
