"""Python client of Chasqui, a replicated message broker.

    from chasqui_client import Client
    with Client(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]) as c:
        c.create_queue("jobs", exist_ok=True)
        c.publish_queue("jobs", b"payload")
        message = c.consume_queue("jobs", timeout_s=5)
        if message is not None:
            c.ack(message)

Errors are typed, under `chasqui_client.errors`.
"""

from chasqui_client import errors
from chasqui_client.client import Client
from chasqui_client.models import (
    ClusterStatus,
    Kind,
    MemberStatus,
    Message,
    Overflow,
    QueueInfo,
    Receipt,
    Start,
    TopicInfo,
    WhoAmI,
)

__all__ = [
    "Client",
    "ClusterStatus",
    "Kind",
    "MemberStatus",
    "Message",
    "Overflow",
    "QueueInfo",
    "Receipt",
    "Start",
    "TopicInfo",
    "WhoAmI",
    "errors",
]
