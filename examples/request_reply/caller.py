"""Ask the folder worker something and print its answer.

    python examples/request_reply/caller.py list
    python examples/request_reply/caller.py find report

The caller creates its own reply queue (a fresh one per run unless `--reply-queue` names one),
publishes the request with a fresh correlation id, and long-polls the reply queue until the
matching reply arrives or `--timeout-s` runs out. Replies with another correlation id (a late or
repeated answer to an earlier request: delivery is at-least-once) are acked and ignored.

Exit status: 0 with the answer on stdout, 1 when the worker answered with an error or the
cluster failed, 2 for usage errors, 3 when no reply came in time.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from pathlib import Path
from typing import NoReturn

import click

from chasqui_client import Client, errors
from chasqui_client import limits as client_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from messages import BadMessage, Reply, Request

DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"  # what `make run` starts
REQUESTS_QUEUE_DEFAULT = "files.requests"
EXIT_TIMEOUT = 3


def _fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(status)


def wait_for_reply(
    client: Client, reply_queue: str, correlation_id: str, timeout_s: float
) -> Reply | None:
    """The reply carrying `correlation_id`, or None after `timeout_s`. Acks what it reads."""
    deadline = time.monotonic() + timeout_s
    while (remaining_s := deadline - time.monotonic()) > 0:
        wait_s = min(remaining_s, client_limits.CONSUME_WAIT_S_MAX)
        message = client.consume_queue(reply_queue, timeout_s=wait_s)
        if message is None:
            continue
        client.ack(message)
        try:
            reply = Reply.decode(message.body)
        except BadMessage as bad:
            click.echo(f"ignoring a malformed reply: {bad.message}", err=True)
            continue
        if reply.correlation_id == correlation_id:
            return reply
        click.echo(f"ignoring a reply to another request ({reply.correlation_id})", err=True)
    return None


@click.command()
@click.argument("command")
@click.argument("name", required=False, default="")
@click.option("--requests-queue", default=REQUESTS_QUEUE_DEFAULT, show_default=True)
@click.option(
    "--reply-queue",
    default=None,
    help="Queue for the reply  [default: a fresh files.replies.<id>, deleted afterwards]",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long to wait for the reply.",
)
@click.option(
    "--endpoints",
    default=DEFAULT_ENDPOINTS,
    show_default=True,
    envvar="CHASQUI_ENDPOINTS",
    help="Client addresses of the nodes, comma separated.",
)
@click.option(
    "--key",
    default=None,
    envvar="CHASQUI_KEY",
    help="User key (from `chasqui user create`); without one, a new user is registered.",
)
def main(
    command: str,
    name: str,
    requests_queue: str,
    reply_queue: str | None,
    timeout_s: float,
    endpoints: str,
    key: str | None,
) -> None:
    """Send COMMAND ("list", or "find" with a NAME) to the worker and print the answer."""
    correlation_id = uuid.uuid4().hex
    temporary = reply_queue is None
    reply_queue = reply_queue or f"files.replies.{correlation_id}"
    addresses = [endpoint.strip() for endpoint in endpoints.split(",") if endpoint.strip()]
    request = Request(correlation_id, reply_queue, command, name)
    try:
        with Client(addresses, key or None) as client:
            # A TTL lets replies that arrive after we gave up expire even if cleanup fails.
            client.create_queue(reply_queue, exist_ok=True, message_ttl_s=max(60.0, timeout_s))
            try:
                try:
                    client.publish_queue(requests_queue, request.encode())
                except errors.NotFound as error:
                    _fail(f"{error.message} (is the worker running?)")
                reply = wait_for_reply(client, reply_queue, correlation_id, timeout_s)
            finally:
                if temporary:
                    with contextlib.suppress(errors.ChasquiError):
                        client.delete_queue(reply_queue)
    except errors.ChasquiError as error:
        _fail(error.message)
    if reply is None:
        _fail(f"no reply within {timeout_s:g} s (is the worker running?)", EXIT_TIMEOUT)
    elif not reply.ok:
        _fail(reply.error)
    else:
        for path in reply.result:
            click.echo(path)
        if reply.truncated:
            click.echo(f"(stopped after {len(reply.result)} results)", err=True)


if __name__ == "__main__":
    main()
