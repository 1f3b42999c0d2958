"""Chasqui in the shared peer benchmark (`../shared/bench/peers/bench.py`), so its W1-W4 figures
come from the same harness, workloads and CPU sampling as NATS JetStream's and RabbitMQ's.

`make bench-peers` runs it (see tests/bench/peers.py); by hand, against a running cluster:

    CHASQUI_ENDPOINTS=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103 \\
        .venv/bin/python ../shared/bench/peers/bench.py tests/bench/peer_adapter.py:ChasquiAdapter

Semantics kept equal to the peers' (the harness README): a publish counts once the leader
confirms it committed by a Raft majority (fsynced, with the nodes' default `--fsync always`);
a consumed message counts once it is acked, one ack per message. The client finds the leader
itself, so it always talks to the node that holds the queue, as the peers' clients do.

- W1: `Client.publish_queue`, one call per message.
- W2: `Client.publisher(window=...)`: futures, sent in PublishBatch calls while earlier ones fly.
- W3/W4 consumer: `Client.stream_queue(window=prefetch)` (pushed deliveries with credit) and
  `Client.acker()` (each message acked on its own, the acks sent in pipelined batches).
"""

from __future__ import annotations

import os
import threading
import time

from bench import BrokerAdapter, Pacer, e2e_latency_s, make_e2e_body, now

from chasqui_client import Client

# The harness's "bench.q" (Chasqui names allow no dots), one per run: each run is a new user.
QUEUE = f"bench-q-{os.getpid()}"
ENDPOINTS = os.environ.get(
    "CHASQUI_ENDPOINTS", "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
).split(",")


class ChasquiAdapter(BrokerAdapter):
    name = "chasqui"
    pid_glob = "chasqui-n[0-9].pid"

    def setup(self) -> dict[str, object]:
        self.client = Client(ENDPOINTS, call_timeout_s=30)
        self.client.create_queue(QUEUE)
        return {
            "queue": f"{QUEUE}, replicated by Raft on {len(ENDPOINTS)} nodes",
            "confirm": "committed on a majority, fsynced (--fsync always)",
            "leader": self.client.leader,
        }

    def purge(self) -> None:
        self.client.delete_queue(QUEUE)
        self.client.create_queue(QUEUE)

    def depth(self) -> int:
        return next(queue.depth for queue in self.client.list_queues() if queue.name == QUEUE)

    def close(self) -> None:
        self.client.close()

    def publish_sync(self, n: int, body: bytes, deadline: float) -> list[float]:
        latencies = []
        for _ in range(n):
            if now() > deadline:
                break
            started = now()
            self.client.publish_queue(QUEUE, body)
            latencies.append(now() - started)
        return latencies

    def publish_pipelined(
        self, n: int, body: bytes, window: int, deadline: float
    ) -> tuple[int, float]:
        publisher = self.client.publisher(QUEUE, window=window, linger_s=0)
        started = self.mark("start")
        futures = []
        for _ in range(n):
            if now() > deadline:
                break
            futures.append(publisher.publish(body))
        publisher.close(timeout_s=max(1.0, deadline - now()))
        confirmed = sum(1 for future in futures if future.done() and not future.exception())
        return confirmed, self.mark("end") - started

    def consume_ack(self, n: int, prefetch: int, deadline: float) -> tuple[int, float]:
        stream = self.client.stream_queue(QUEUE, window=prefetch)
        acker = self.client.acker()
        started = self.mark("start")
        acked = 0
        stop = threading.Timer(max(0.0, deadline - now()), stream.close)
        stop.start()
        try:
            for message in stream:
                acker.ack(message)
                acked += 1
                if acked >= n:
                    break
            acker.close(timeout_s=max(1.0, deadline - now()))
        finally:
            stop.cancel()
            stream.close()
        return acked, self.mark("end") - started

    def e2e(
        self, rate: int, duration: float, size: int, deadline: float, window: int, prefetch: int
    ) -> tuple[int, list[float]]:
        latencies: list[float] = []
        stream = self.client.stream_queue(QUEUE, window=prefetch)
        acker = self.client.acker()
        expected = int(rate * duration)

        def consume() -> None:
            for message in stream:
                latencies.append(e2e_latency_s(message.body))
                acker.ack(message)
                if len(latencies) >= expected:
                    return

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        publisher = self.client.publisher(QUEUE, window=window, linger_s=0)
        self.mark("start")
        pacer = Pacer(rate, duration)
        while not pacer.done() and now() < deadline:
            while pacer.sent < pacer.due():
                publisher.publish(make_e2e_body(pacer.sent, size))
                pacer.sent += 1
            time.sleep(pacer.next_due_in())
        publisher.close(timeout_s=max(1.0, deadline - now()))
        consumer.join(timeout=max(1.0, min(10.0, deadline - now())))
        self.mark("end")
        stream.close()
        acker.close(timeout_s=10)
        return pacer.sent, latencies
