"""Registers the Broker service so that request bytes which do not parse are the client's error.

grpc python parses each request before the servicer runs. When the generated `FromString`
raises, grpc logs the exception with a traceback ("Exception deserializing message!") and
answers INTERNAL, and the servicer never sees the call, so the call is not counted either:
anyone who reaches the client port could fill the node's log, one traceback per call, before
any key is checked.

`add_broker_to_server` registers the generated method table (what
`add_BrokerServicer_to_server` builds) with each request parser wrapped so that it never raises:
bytes that do not parse become a `MalformedRequest`, which service.py's `_rpc` and `_rpc_stream`
wrappers refuse with INVALID_ARGUMENT (`MalformedRequest.error`), counted in the RPC metrics like
any refusal; the node logs one DEBUG line for it at most. The same holds for each message of the
ConsumeStream request stream, for which grpc would otherwise end the call with INTERNAL itself.

The standard services on the same port (health, reflection) keep grpc's own parsers, so there
garbage is still answered INTERNAL; `quiet_grpc_parse_failures` turns grpc's traceback for it
into a DEBUG line, so no service on the port lets a client write tracebacks to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from chasqui_node.errors import InvalidArgument
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

BROKER = pb.DESCRIPTOR.services_by_name["Broker"]


@dataclass(frozen=True)
class MalformedRequest:
    """What a request parser returns instead of raising: the message type the bytes should
    have been (`chasqui.v1.PublishRequest`) and why they are not one. Never None, which grpc
    would take for a failed parse."""

    type_name: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request is not a valid {self.type_name}: {self.reason}")


def parsed(request: T | MalformedRequest) -> T:
    """`request` itself; raises InvalidArgument when its bytes did not parse."""
    if isinstance(request, MalformedRequest):
        raise request.error()
    return request


def lenient_parser(type_name: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse` (a generated `FromString`) that returns a `MalformedRequest` where `parse`
    would raise. Runs on a grpc thread; never raises."""

    def parse_or_flag(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # DecodeError, or anything else the parser may raise
            detail = str(error).removeprefix(f"Error parsing message with type '{type_name}': ")
            reason = detail or type(error).__name__
            logger.debug("%d request bytes are not a %s: %s", len(data), type_name, reason)
            return MalformedRequest(type_name, reason)

    return parse_or_flag


class _HandlerTable:
    """Stands in for a `grpc.Server` to receive the method table that the generated
    `add_BrokerServicer_to_server` builds, instead of registering it."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] | None = None

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same table again, wrapped for lookup by full method name

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, Any]
    ) -> None:
        assert service_name == BROKER.full_name, service_name
        self.handlers = dict(handlers)


def broker_method_handlers(servicer: pb_grpc.BrokerServicer) -> dict[str, Any]:
    """The generated Broker method handlers for `servicer`, by method name, each with a
    lenient request parser (see `lenient_parser`)."""
    table = _HandlerTable()
    pb_grpc.add_BrokerServicer_to_server(servicer, table)
    # Only a change in the generated code (grpcio-tools) can leave the table empty.
    assert table.handlers is not None, "add_BrokerServicer_to_server registered no table"
    assert set(table.handlers) == set(BROKER.methods_by_name), sorted(table.handlers)
    handlers: dict[str, Any] = {}
    for name, handler in table.handlers.items():
        method = BROKER.methods_by_name[name]
        parse = lenient_parser(method.input_type.full_name, handler.request_deserializer)
        if handler.request_streaming and handler.response_streaming:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                handler.stream_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        elif handler.request_streaming:
            handlers[name] = grpc.stream_unary_rpc_method_handler(
                handler.stream_unary,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        elif handler.response_streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                handler.unary_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                handler.unary_unary,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
    return handlers


class _ParseFailureFilter(logging.Filter):
    """On grpc's `grpc._common` logger: replaces its ERROR and traceback for request bytes that
    did not parse with one DEBUG line here. Every other record passes untouched."""

    GRPC_MESSAGE = "Exception deserializing message!"  # grpc/_common.py, for any parser failure

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.GRPC_MESSAGE:
            return True
        error = record.exc_info[1] if record.exc_info else None
        logger.debug("request bytes to a grpc service did not parse: %s", error)
        return False


_PARSE_FAILURE_FILTER = _ParseFailureFilter()


def quiet_grpc_parse_failures() -> None:
    """Install the filter (see `_ParseFailureFilter`); idempotent. Called by server.py at
    start-up, since it changes process-wide logging."""
    logging.getLogger("grpc._common").addFilter(_PARSE_FAILURE_FILTER)


def add_broker_to_server(servicer: pb_grpc.BrokerServicer, server: grpc.Server) -> None:
    """Register `servicer` as chasqui.v1.Broker on a server not yet started, as the generated
    `add_BrokerServicer_to_server` would, but with lenient request parsers."""
    handlers = broker_method_handlers(servicer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(BROKER.full_name, handlers),)
    )
    server.add_registered_method_handlers(BROKER.full_name, handlers)
