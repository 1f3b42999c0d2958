"""Domain errors. They carry the facts and know nothing about gRPC; `service.py` maps them.

The state machine returns these as results (it never raises them across `apply()`), so every
replica reaches the same verdict; the service and the client edge raise them directly.
"""

from __future__ import annotations


class ChasquiError(Exception):
    """Base of every error a caller can cause or see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __eq__(self, other: object) -> bool:
        # Results are compared across replicas in tests: same class and message is the same verdict.
        return type(self) is type(other) and self.message == getattr(other, "message", None)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.message))


class InvalidArgument(ChasquiError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""


class InvalidName(InvalidArgument):
    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"{kind} name {name!r} is invalid: {reason}")
        self.kind = kind
        self.name = name


class LimitExceeded(InvalidArgument):
    """`unit` ("bytes", "ms") follows the value when it is a quantity rather than a count:
    `message of 2097152 bytes exceeds message_bytes_max 1048576`."""

    def __init__(self, what: str, value: int, limit_name: str, limit: int, unit: str = "") -> None:
        shown = f"{value} {unit}" if unit else f"{value}"
        super().__init__(f"{what} of {shown} exceeds {limit_name} {limit}")
        self.what = what
        self.value = value
        self.limit_name = limit_name
        self.limit = limit
        self.unit = unit


class NotFound(ChasquiError):
    """A queue, topic, subscription or delivery does not exist (NOT_FOUND)."""


class AlreadyExists(ChasquiError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f'{kind} "{name}" already exists')
        self.kind = kind
        self.name = name


class FailedPrecondition(ChasquiError):
    """The request is well formed but the state does not allow it (FAILED_PRECONDITION):
    for example acking a delivery whose lease has already expired."""


class QueueFull(ChasquiError):
    """`adding` is how many new messages the refused publish carried; a batch is refused whole
    when they do not all fit, even if the queue has room for some."""

    def __init__(self, queue_name: str, depth: int, depth_max: int, adding: int = 1) -> None:
        message = f'queue "{queue_name}" is full ({depth} of queue_depth_max {depth_max})'
        if adding > 1:
            message = (
                f'queue "{queue_name}" is full for a batch of {adding} new messages '
                f"({depth} of queue_depth_max {depth_max})"
            )
        super().__init__(message)
        self.queue_name = queue_name
        self.depth = depth
        self.depth_max = depth_max
        self.adding = adding


class ResourceExhausted(ChasquiError):
    """A cluster-wide or per-node capacity is used up (RESOURCE_EXHAUSTED)."""


class Unauthenticated(ChasquiError):
    """No key, or a key the cluster does not know (UNAUTHENTICATED)."""


class PermissionDenied(ChasquiError):
    """The caller is known but may not do this (PERMISSION_DENIED)."""


class NotLeader(ChasquiError):
    def __init__(self, node_id: str, leader_id: str | None, leader_address: str | None) -> None:
        if leader_id is None or leader_address is None:
            super().__init__(f"node {node_id} is not the leader and knows no leader; retry shortly")
        else:
            super().__init__(
                f"node {node_id} is not the leader; try {leader_id} at {leader_address}"
            )
        self.node_id = node_id
        self.leader_id = leader_id
        self.leader_address = leader_address


class NoLeader(ChasquiError):
    def __init__(self) -> None:
        super().__init__("no leader elected yet; retry shortly")


class OutcomeUnknown(ChasquiError):
    """The proposal may or may not have been committed (ABORTED): retry with the same id."""


class Unavailable(ChasquiError):
    """The node cannot serve now, for example while shutting down (UNAVAILABLE)."""
