"""Serve a folder over Chasqui: answer "list" and "find NAME" requests from a queue.

    python examples/request_reply/worker.py --folder ~/Documents

The worker long-polls its requests queue (`files.requests`), answers each request on the
request's own reply queue with the same correlation id, and only then acks the request. If the
worker dies between the two, the request is delivered again and answered twice: delivery is
at-least-once, and the caller ignores replies it is no longer waiting for.

A malformed request gets an error reply when it says where to reply, and is dropped (acked, with
a log line) when it does not; nothing a caller sends stops the worker. SIGTERM or Ctrl-C stops
it between requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from chasqui_client import Client, Message, errors
from chasqui_client import limits as client_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from messages import BadMessage, Reply, Request, decode_request, reply_address

DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"  # what `make run` starts
REQUESTS_QUEUE_DEFAULT = "files.requests"
CONSUME_WAIT_S = 20.0  # one long-poll; an idle worker makes one call per this long
RESULTS_MAX = 1000  # paths in one reply; more is flagged `truncated`
ENTRIES_SCANNED_MAX = 100_000  # a find stops after this many directory entries
DELIVERIES_MAX = 5  # a request that failed this often is answered with an error and dropped
RETRY_DELAY_S = 1.0  # a request whose reply could not be published comes back after this long

logger = logging.getLogger("worker")


class _Stop(Exception):
    """Raised by the signal handler to end a long-poll that is waiting for a request."""


class _Signals:
    """Turns SIGTERM/SIGINT into a clean stop: at once while idle, after the current request
    otherwise (so a request is never left half answered by our own choice)."""

    def __init__(self) -> None:
        self.stopping = False
        self.idle = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True
        if self.idle:
            raise _Stop


# ---- answering -------------------------------------------------------------------------------


def _shown(path: Path, folder: Path) -> str:
    relative = path.relative_to(folder).as_posix()
    return relative + "/" if path.is_dir() and not path.is_symlink() else relative


def list_folder(folder: Path) -> tuple[list[str], bool]:
    """The folder's own entries, sorted, directories ending in "/"; and whether truncated."""
    entries = sorted(folder.iterdir(), key=lambda path: path.name)
    return [_shown(path, folder) for path in entries[:RESULTS_MAX]], len(entries) > RESULTS_MAX


def find_in_folder(folder: Path, name: str) -> tuple[list[str], bool]:
    """Paths under `folder` whose last component contains `name`, in a stable order; and whether
    the search stopped early (RESULTS_MAX matches or ENTRIES_SCANNED_MAX entries scanned).

    Symbolic links to directories are not followed, so a search never leaves the folder or loops.
    """
    found: list[str] = []
    scanned = 0
    for directory, directory_names, file_names in os.walk(folder):
        directory_names.sort()
        for entry in sorted([*directory_names, *file_names]):
            scanned += 1
            if scanned > ENTRIES_SCANNED_MAX:
                return found, True
            if name in entry:
                if len(found) == RESULTS_MAX:
                    return found, True
                found.append(_shown(Path(directory) / entry, folder))
    return found, False


def answer(folder: Path, request: Request) -> Reply:
    """The reply to a well-formed request; an error reply for a command it does not know."""
    if request.command == "list":
        result, truncated = list_folder(folder)
    elif request.command == "find":
        if not request.name:
            return Reply(request.correlation_id, ok=False, error="find needs a name: find NAME")
        result, truncated = find_in_folder(folder, request.name)
    else:
        return Reply(
            request.correlation_id,
            ok=False,
            error=f"unknown command {request.command!r}; expected 'list' or 'find NAME'",
        )
    reply = Reply(request.correlation_id, ok=True, result=tuple(result), truncated=truncated)
    while len(reply.encode()) > client_limits.MESSAGE_BYTES_MAX:
        # Long paths can make even RESULTS_MAX of them too big for one message: halve.
        kept = reply.result[: len(reply.result) // 2]
        reply = Reply(request.correlation_id, ok=True, result=kept, truncated=True)
    return reply


def reply_for(folder: Path, message: Message) -> tuple[str, Reply | None]:
    """Where to reply to `message`, and what; `("", None)` when there is nowhere to reply."""
    try:
        request = decode_request(message.body)
    except BadMessage as bad:
        reply_to, correlation_id = reply_address(message.body)
        logger.warning("bad request %s: %s", message.id, bad.message)
        if not reply_to:
            return "", None
        return reply_to, Reply(correlation_id, ok=False, error=bad.message)
    if message.delivery_count > DELIVERIES_MAX:
        error = f"request was delivered {message.delivery_count} times without an answer"
        return request.reply_to, Reply(request.correlation_id, ok=False, error=error)
    try:
        return request.reply_to, answer(folder, request)
    except OSError as error:
        # The folder vanished, or a directory is unreadable: the caller should hear about it.
        return request.reply_to, Reply(request.correlation_id, ok=False, error=str(error))


# ---- serving ---------------------------------------------------------------------------------


def handle(client: Client, folder: Path, message: Message) -> None:
    """Publish the reply to one request, then ack the request (never the other way round)."""
    reply_to, reply = reply_for(folder, message)
    if reply is not None:
        try:
            client.publish_queue(reply_to, reply.encode())
        except (errors.NotFound, errors.InvalidArgument, errors.PermissionDenied) as error:
            # The reply can never be delivered (the caller gave up and deleted its queue, or
            # named a bad one): retrying would not help, so drop the request.
            logger.warning("cannot reply to %s on %r: %s", message.id, reply_to, error.message)
        except errors.ChasquiError as error:
            # Maybe transient (no leader, unreachable): hand the request back for another try.
            logger.warning("reply to %s not published (%s); retrying later", message.id, error)
            # If the nack fails too, the lease runs out and the request is redelivered anyway.
            with contextlib.suppress(errors.ChasquiError):
                client.nack(message, delay_s=RETRY_DELAY_S)
            return
        else:
            status = "ok" if reply.ok else f"error: {reply.error}"
            logger.info("answered %s to %s (%s)", message.id, reply_to, status)
    try:
        client.ack(message)
    except errors.ChasquiError as error:
        # Redelivered later and answered again; the caller ignores the duplicate.
        logger.warning("ack of %s failed (%s); it will be answered again", message.id, error)


def serve(client: Client, folder: Path, requests_queue: str, signals: _Signals) -> None:
    while not signals.stopping:
        signals.idle = True
        try:
            message = client.consume_queue(requests_queue, timeout_s=CONSUME_WAIT_S)
        except _Stop:
            return
        except (errors.Unavailable, errors.OutcomeUnknown) as error:
            # The client already retried for its whole budget; keep serving once the
            # cluster is back rather than exit.
            logger.warning("cannot consume from %s: %s", requests_queue, error)
            continue
        finally:
            signals.idle = False
        if message is not None:
            handle(client, folder, message)


@click.command()
@click.option(
    "--folder",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The folder to serve.",
)
@click.option("--requests-queue", default=REQUESTS_QUEUE_DEFAULT, show_default=True)
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
def main(folder: Path, requests_queue: str, endpoints: str, key: str | None) -> None:
    """Answer "list" and "find NAME" requests about FOLDER until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signals = _Signals()
    folder = folder.resolve()
    addresses = [endpoint.strip() for endpoint in endpoints.split(",") if endpoint.strip()]
    try:
        with Client(addresses, key or None) as client:
            client.create_queue(requests_queue, exist_ok=True)
            user_id = client.whoami().user_id
            click.echo(f"serving {folder} on queue {requests_queue} as user {user_id}")
            sys.stdout.flush()
            serve(client, folder, requests_queue, signals)
    except _Stop:
        pass  # a signal arrived before serving began
    except errors.ChasquiError as error:
        # Not transient (unknown key, requests queue deleted): serving cannot go on.
        click.echo(f"error: {error.message}", err=True)
        raise SystemExit(1) from None
    logger.info("stopped")


if __name__ == "__main__":
    main()
