"""Typed exceptions raised by `chasqui_client`, one per gRPC status the broker uses.

Every exception derives from `ChasquiError` and carries `.code` (the gRPC status name, such as
"INVALID_ARGUMENT") and `.message` (the node's message, or the client's own for checks it makes
before sending). `from_rpc_error` turns a `grpc.RpcError` into the matching exception.
"""

from __future__ import annotations

import grpc


class ChasquiError(Exception):
    """Base of every error the client raises for a broker outcome."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(ChasquiError):
    """A name, size or field is malformed or out of range; sending it again will not help."""

    code = "INVALID_ARGUMENT"


class NotFound(ChasquiError):
    """The queue, topic, subscription or delivery does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(ChasquiError):
    """The queue or topic exists already (pass `exist_ok=True` to accept that)."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(ChasquiError):
    """The request is well formed but the state does not allow it (e.g. an expired lease)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ChasquiError):
    """A queue is full, or a cluster or node capacity is used up."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ChasquiError):
    """No key, or a key the cluster does not know."""

    code = "UNAUTHENTICATED"


class PermissionDenied(ChasquiError):
    """The caller is known but may not do this (not the owner, not on the access list)."""

    code = "PERMISSION_DENIED"


class Unavailable(ChasquiError):
    """No node could serve the call: not the leader, no leader elected yet, or unreachable.

    The request was not carried out; it is safe to try again later.
    """

    code = "UNAVAILABLE"


class NoEndpointAvailable(Unavailable):
    """Every endpoint failed until the call's deadline; `.attempts` maps each to its last error."""

    def __init__(self, timeout_s: float, attempts: dict[str, str]) -> None:
        tried = "; ".join(f"{endpoint} ({error})" for endpoint, error in attempts.items())
        super().__init__(f"no endpoint answered within {timeout_s:g} s; tried: {tried}")
        self.timeout_s = timeout_s
        self.attempts = dict(attempts)


class OutcomeUnknown(ChasquiError):
    """The request may or may not have happened (ABORTED, or DEADLINE_EXCEEDED after retries).

    Safe to retry with the same id: publishes carry `(producer_id, sequence)` and the broker
    drops duplicates; acks, nacks and extends are idempotent.
    """

    code = "ABORTED"


class Internal(ChasquiError):
    """The node failed unexpectedly (see the node log), or answered with a status Chasqui never
    uses on purpose; `.code` then names that status."""

    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ChasquiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.ABORTED: OutcomeUnknown,
    grpc.StatusCode.DEADLINE_EXCEEDED: OutcomeUnknown,
    grpc.StatusCode.INTERNAL: Internal,
}


def status_code_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call; UNKNOWN when the error carries none."""
    code_method = getattr(error, "code", None)
    code = code_method() if callable(code_method) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def details_of(error: grpc.RpcError) -> str:
    """The status message of a failed call; empty when the error carries none."""
    details_method = getattr(error, "details", None)
    details = details_method() if callable(details_method) else None
    return details if isinstance(details, str) else ""


def from_status(code: grpc.StatusCode, details: str) -> ChasquiError:
    """The typed exception for a status and its message (the node's, or a generic one)."""
    exception_class = _BY_CODE.get(code, Internal)
    message = details or f"call failed with status {code.name}"
    return exception_class(message, code=code.name)


def from_rpc_error(error: grpc.RpcError) -> ChasquiError:
    """The typed exception for a failed gRPC call, keeping the node's message and status name."""
    return from_status(status_code_of(error), details_of(error))
