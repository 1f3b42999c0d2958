"""`ChasquiConnector`: the original Chasqui client's interface, running on a replicated cluster.

    from chasqui_client import ChasquiConnector
    connector = ChasquiConnector("127.0.0.1", 7101)      # any one node
    key = connector.create_user()
    connector.create_queue("jobs")
    connector.publish_message_queue("jobs", "hello")
    connector.consume_message_queue("jobs", enable_retry=True)   # -> "hello"

The connector asks the node at host:port for the cluster's members (ClusterStatus) and then
talks to all of them through a `chasqui_client.Client`, so it follows the leader across
failovers and retries safely, like any other client.

Deliberate differences from the original client:

- Errors raise the typed exceptions of `chasqui_client.errors` (`NotFound`, `AlreadyExists`,
  `Unauthenticated`, `OutcomeUnknown`, ...) instead of returning error strings. Nothing is
  printed.
- Keys: `user` is an existing key; with `user=None`, call `create_user()` first, which registers
  a new user, keeps its key for later calls and returns it (`get_user_key()` returns it too).
  Calls before that raise `Unauthenticated`. Keys are opaque random strings; the cluster stores
  only their hash, so a lost key cannot be looked up again.
- Acks: the original had none. `consume_message_*` acks the message before returning it, so a
  consumer that crashes after the call returns loses that message (the original's behaviour);
  use `Client` with `Message.process()` for at-least-once processing.
- Consuming: returns the message text (bodies decoded as UTF-8), or None when nothing arrived.
  `enable_retry=True` long-polls on the server (no client-side sleeping) until a message arrives
  or `retry_wait_s` (default 30 s) has passed; `enable_retry=False` returns at once.
- Listing: `list_topics()` / `list_queues()` return the sorted names of the caller's own topics
  or queues (what the original listed), as a list of strings, not a formatted text.
- Returns: creates return True, deletes and subscribes return None, publishes return the
  message's sequence number (its position in the queue or topic) rather than a status string.
- Subscribing to a topic starts at messages published from then on; a queue subscription is
  optional (any user may consume from a queue).
"""

from __future__ import annotations

from chasqui_client import errors, limits
from chasqui_client.client import Client
from chasqui_client.models import ClosedOnExit

RETRY_WAIT_S_DEFAULT = 30.0  # how long `enable_retry=True` waits for a message in all


class ChasquiConnector(ClosedOnExit):
    """The original client's method names over a `Client`; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str | None = None,
        *,
        retry_wait_s: float = RETRY_WAIT_S_DEFAULT,
        call_timeout_s: float = limits.CALL_TIMEOUT_S_DEFAULT,
    ) -> None:
        if retry_wait_s <= 0:
            raise ValueError("retry_wait_s must be positive")
        self.host = host
        self.port = port
        self.retry_wait_s = retry_wait_s
        self._call_timeout_s = call_timeout_s
        self.endpoints = self._discover(f"{host}:{port}")
        self._client: Client | None = None
        if user is not None:
            self._client = Client(self.endpoints, key=user, call_timeout_s=call_timeout_s)

    def _discover(self, address: str) -> list[str]:
        """host:port first, then every member's client address the node reports."""
        # ClusterStatus needs no user; the placeholder key only stops Client registering one.
        with Client([address], key="-", call_timeout_s=self._call_timeout_s) as bootstrap:
            status = bootstrap.cluster_status()
        members = [member.client_address for member in status.members if member.client_address]
        return list(dict.fromkeys([address, *members]))

    @property
    def client(self) -> Client:
        """The underlying `Client`, for anything the original interface cannot express."""
        if self._client is None:
            raise errors.Unauthenticated("no user yet: call create_user() or pass user=<key>")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # ---- users -----------------------------------------------------------------------------

    def create_user(self) -> str:
        """Registers a new user, uses it from now on, and returns its key."""
        client = Client(self.endpoints, key=None, call_timeout_s=self._call_timeout_s)
        self.close()
        self._client = client
        return client.key

    def get_user_key(self) -> str | None:
        return None if self._client is None else self._client.key

    # ---- topics and queues -----------------------------------------------------------------

    def create_topic(self, name: str) -> bool:
        return self.client.create_topic(name)

    def create_queue(self, name: str) -> bool:
        return self.client.create_queue(name)

    def list_topics(self) -> list[str]:
        return sorted(topic.name for topic in self.client.list_topics(owned_only=True))

    def list_queues(self) -> list[str]:
        return sorted(queue.name for queue in self.client.list_queues(owned_only=True))

    def delete_topic(self, name: str) -> None:
        self.client.delete_topic(name)

    def delete_queue(self, name: str) -> None:
        self.client.delete_queue(name)

    def subscribe_topic(self, name: str) -> None:
        self.client.subscribe_topic(name)

    def subscribe_queue(self, name: str) -> None:
        self.client.subscribe_queue(name)

    # ---- messages --------------------------------------------------------------------------

    def publish_message_topic(self, name: str, message: str | bytes) -> int:
        return self.client.publish_topic(name, message).sequence

    def publish_message_queue(self, name: str, message: str | bytes) -> int:
        return self.client.publish_queue(name, message).sequence

    def consume_message_topic(self, name: str, enable_retry: bool = False) -> str | None:
        return self._consume(name, enable_retry, topic=True)

    def consume_message_queue(self, name: str, enable_retry: bool = False) -> str | None:
        return self._consume(name, enable_retry, topic=False)

    def _consume(self, name: str, enable_retry: bool, *, topic: bool) -> str | None:
        """The next message's text, acked; None if none arrived within the wait."""
        client = self.client
        waited_s = 0.0
        while True:
            # Long-polls of at most consume_wait_s_max each, for retry_wait_s in all.
            wait_s = (
                min(self.retry_wait_s - waited_s, limits.CONSUME_WAIT_S_MAX)
                if enable_retry
                else 0.0
            )
            if topic:
                message = client.consume_topic(name, timeout_s=wait_s)
            else:
                message = client.consume_queue(name, timeout_s=wait_s)
            if message is not None:
                client.ack(message)
                return message.body.decode("utf-8", errors="replace")
            waited_s += wait_s
            if not enable_retry or waited_s >= self.retry_wait_s:
                return None
