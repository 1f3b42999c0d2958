"""Python client of Chasqui, a replicated message broker.

    from chasqui_client import Client
    with Client(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]) as c:
        c.create_queue("jobs", exist_ok=True)
        c.publish_queue("jobs", b"payload")
        message = c.consume_queue("jobs", timeout_s=5)
        if message is not None:
            c.ack(message)

Errors are typed, under `chasqui_client.errors`. `chasqui_client.aio.Client` is the asyncio
twin; `ChasquiConnector` keeps the original Chasqui client's method names.
"""

from chasqui_client import errors
from chasqui_client.client import Client
from chasqui_client.connector import ChasquiConnector
from chasqui_client.models import (
    ClusterStatus,
    Kind,
    MemberStatus,
    Message,
    Overflow,
    Processing,
    QueueInfo,
    Receipt,
    Start,
    TopicInfo,
    WhoAmI,
)
from chasqui_client.publisher import Publisher
from chasqui_client.stream import Stream

__all__ = [
    "ChasquiConnector",
    "Client",
    "ClusterStatus",
    "Kind",
    "MemberStatus",
    "Message",
    "Overflow",
    "Processing",
    "Publisher",
    "QueueInfo",
    "Receipt",
    "Start",
    "Stream",
    "TopicInfo",
    "WhoAmI",
    "errors",
]
