"""`ChasquiConnector`, the original client's interface, against the real service over a fake
replicator: every original method with its documented return value, typed errors instead of
strings, consume acking what it returns, and `enable_retry` long-polling within its bound."""

from __future__ import annotations

import threading
import time

import pytest

from chasqui_client import ChasquiConnector, errors
from tests.service.conftest import Broker

pytestmark = pytest.mark.timeout(60)


def test_the_original_interface_end_to_end(broker: Broker) -> None:
    connector = ChasquiConnector("127.0.0.1", broker.port, retry_wait_s=3)
    try:
        assert connector.get_user_key() is None
        with pytest.raises(errors.Unauthenticated):
            connector.list_queues()
        key = connector.create_user()
        assert key and connector.get_user_key() == key
        assert connector.create_topic("news") is True
        assert connector.create_queue("jobs") is True
        with pytest.raises(errors.AlreadyExists):
            connector.create_queue("jobs")
        assert connector.list_topics() == ["news"]
        assert connector.list_queues() == ["jobs"]
        connector.subscribe_topic("news")
        connector.subscribe_queue("jobs")
        assert connector.publish_message_queue("jobs", "job-1") == 0
        assert connector.publish_message_topic("news", "headline") == 0
        assert connector.consume_message_queue("jobs", False) == "job-1"
        assert connector.consume_message_queue("jobs", False) is None  # acked on return
        assert connector.consume_message_topic("news", False) == "headline"
        assert connector.consume_message_topic("news", enable_retry=False) is None

        # enable_retry long-polls until a message arrives.
        other = ChasquiConnector("127.0.0.1", broker.port, user=key)
        timer = threading.Timer(0.5, other.publish_message_queue, ("jobs", "late"))
        timer.start()
        started = time.monotonic()
        assert connector.consume_message_queue("jobs", enable_retry=True) == "late"
        assert 0.3 < time.monotonic() - started < 3
        timer.join()
        started = time.monotonic()
        assert connector.consume_message_queue("jobs", enable_retry=True) is None
        assert 2.5 < time.monotonic() - started < 6  # bounded by retry_wait_s
        other.close()

        connector.delete_topic("news")
        connector.delete_queue("jobs")
        assert connector.list_topics() == [] and connector.list_queues() == []
        with pytest.raises(errors.NotFound):
            connector.publish_message_queue("jobs", "gone")
    finally:
        connector.close()


def test_an_existing_key_is_reused(broker: Broker) -> None:
    with ChasquiConnector("127.0.0.1", broker.port) as first:
        key = first.create_user()
        first.create_queue("mine")
    with ChasquiConnector("127.0.0.1", broker.port, user=key) as again:
        assert again.get_user_key() == key
        assert again.list_queues() == ["mine"]
    with (
        ChasquiConnector("127.0.0.1", broker.port, user="not-a-key") as stranger,
        pytest.raises(errors.Unauthenticated),
    ):
        stranger.list_queues()
