"""`chasqui`: the user's command line for a Chasqui cluster, built on the synchronous `Client`.

    chasqui user create                  # prints `export CHASQUI_KEY=...`
    chasqui queue create jobs
    chasqui publish queue jobs "first" "second"
    seq 3 | chasqui publish queue jobs   # one message per line of stdin
    chasqui consume queue jobs --count 5
    chasqui status

Every option may also come from the environment: CHASQUI_ENDPOINTS, CHASQUI_KEY. Broker errors
print `error: <message>` on stderr and exit 1; usage errors exit 2. This module imports only
`chasqui_client`, never `chasqui_node`.
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

import click

from chasqui_client import errors, limits
from chasqui_client.client import Client
from chasqui_client.models import ClusterStatus, Kind, Message, Overflow, Receipt, Start

DEFAULT_ENDPOINTS = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"  # what `make run` starts
CONSUME_WAIT_S_DEFAULT = 5.0  # a consume without --follow stops after this long without messages
# `status` shows a node that does not answer within this long as unreachable rather than
# spending the whole call budget on it; nodes are asked in parallel.
STATUS_NODE_TIMEOUT_S_MAX = 2.0
# ClusterStatus is unauthenticated; `Client` needs some key, or it would register a new user.
_STATUS_ONLY_KEY = "status-only"
NO_KEY_HINT = "no key: run `chasqui user create` and export CHASQUI_KEY (or pass --key)"


@dataclass(frozen=True)
class _Options:
    endpoints: tuple[str, ...]
    key: str | None
    timeout_s: float

    def client(self, *, key: str | None = None, timeout_s: float | None = None) -> Client:
        """A client as the configured user (or `key`); exits with the hint when there is none."""
        key = key if key is not None else self.key
        if not key:
            _fail(NO_KEY_HINT)
        return self._connect(key, timeout_s)

    def registering_client(self) -> Client:
        """A client that registers a new user (`Client` with `key=None`)."""
        return self._connect(None, None)

    def _connect(self, key: str | None, timeout_s: float | None) -> Client:
        call_timeout_s = timeout_s if timeout_s is not None else self.timeout_s
        return Client(
            self.endpoints,
            key,
            call_timeout_s=call_timeout_s,
            connect_timeout_s=min(call_timeout_s, limits.CONNECT_TIMEOUT_S_DEFAULT),
        )


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(1)


class _Commands(click.Group):
    """A group that turns broker errors into `error: <message>` and exit status 1.

    Subgroups run inside the root's `invoke`, so catching here covers every command.
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except errors.Unauthenticated as error:
            _fail(f"{error.message} (check CHASQUI_KEY, or run `chasqui user create`)")
        except errors.ChasquiError as error:
            _fail(error.message)
        except BrokenPipeError:
            # The reader went away (`chasqui consume ... | head`): stop quietly. Unacked
            # deliveries are redelivered, so nothing is lost.
            sys.stderr.close()
            raise SystemExit(1) from None


def _parse_endpoints(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    endpoints = tuple(endpoint.strip() for endpoint in value.split(",") if endpoint.strip())
    if not endpoints:
        raise click.BadParameter("give at least one HOST:PORT")
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter(f"{endpoint!r} is not HOST:PORT")
    return endpoints


@click.group(cls=_Commands)
@click.option(
    "--endpoints",
    default=DEFAULT_ENDPOINTS,
    show_default=True,
    envvar="CHASQUI_ENDPOINTS",
    callback=_parse_endpoints,
    help="Client addresses of the nodes, comma separated; any one reachable node is enough.",
)
@click.option(
    "--key",
    default=None,
    envvar="CHASQUI_KEY",
    help="Your user key (from `chasqui user create`).",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=limits.CALL_TIMEOUT_S_DEFAULT,
    show_default=True,
    help="Budget of one call to the cluster, retries included (consumes add their wait).",
)
@click.pass_context
def main(ctx: click.Context, endpoints: tuple[str, ...], key: str | None, timeout_s: float) -> None:
    """Chasqui: queues and topics on a replicated broker.

    Start with `chasqui user create`, export the key it prints, then create a queue or topic,
    publish and consume. `chasqui COMMAND --help` describes each command.
    """
    ctx.obj = _Options(endpoints=endpoints, key=key or None, timeout_s=timeout_s)


pass_options = click.make_pass_decorator(_Options)


# ---- users -----------------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Users: each has a key that authenticates every call."""


@user.command("create")
@click.option("--quiet", "-q", is_flag=True, help="Print only the key.")
@pass_options
def user_create(options: _Options, quiet: bool) -> None:
    """Register a new user and print its key.

    The output is shell: `eval "$(chasqui user create)"` sets CHASQUI_KEY. The key is shown only
    once; keep it secret.
    """
    with options.registering_client() as client:
        if quiet:
            click.echo(client.key)
            return
        click.echo(f"# user {client.user_id} created; keep its key secret, it is shown only once")
        click.echo(f"export CHASQUI_KEY={shlex.quote(client.key)}")


@main.command()
@pass_options
def whoami(options: _Options) -> None:
    """Print the user id of the key in use."""
    with options.client() as client:
        identity = client.whoami()
    click.echo(f"{identity.user_id}{' (admin)' if identity.admin else ''}")


# ---- topics and queues -------------------------------------------------------------------------


@main.group()
def topic() -> None:
    """Topics: every subscriber receives every message, from its own durable cursor."""


@main.group()
def queue() -> None:
    """Queues: each message goes to one consumer, and comes back unless acked in time."""


@topic.command("create")
@click.argument("name")
@click.option("--exist-ok", is_flag=True, help="Succeed when the topic exists already.")
@pass_options
def topic_create(options: _Options, name: str, exist_ok: bool) -> None:
    """Create a topic owned by you."""
    with options.client() as client:
        created = client.create_topic(name, exist_ok=exist_ok)
    click.echo(f"created topic {name}" if created else f"topic {name} exists already")


@queue.command("create")
@click.argument("name")
@click.option("--exist-ok", is_flag=True, help="Succeed when the queue exists already.")
@click.option(
    "--visibility-timeout-s",
    type=float,
    default=None,
    help="How long a consumed message stays leased before redelivery  [default: 30]",
)
@click.option(
    "--max-deliveries",
    type=click.IntRange(min=0),
    default=0,
    help="Deliveries before a message is dead-lettered or dropped (0: unlimited).",
)
@click.option(
    "--dead-letter-queue",
    default="",
    help="Queue receiving messages that reached --max-deliveries.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=0),
    default=0,
    help="Most stored messages (0: the cluster's queue_depth_max).",
)
@click.option(
    "--overflow",
    type=click.Choice([choice.value for choice in Overflow]),
    default=Overflow.REJECT_PUBLISH.value,
    show_default=True,
    help="What a publish to a queue at --max-length does.",
)
@click.option("--ttl-s", type=float, default=None, help="Drop messages older than this.")
@pass_options
def queue_create(
    options: _Options,
    name: str,
    exist_ok: bool,
    visibility_timeout_s: float | None,
    max_deliveries: int,
    dead_letter_queue: str,
    max_length: int,
    overflow: str,
    ttl_s: float | None,
) -> None:
    """Create a queue owned by you."""
    with options.client() as client:
        created = client.create_queue(
            name,
            exist_ok=exist_ok,
            visibility_timeout_s=visibility_timeout_s,
            max_deliveries=max_deliveries,
            dead_letter_queue=dead_letter_queue,
            max_length=max_length,
            overflow=Overflow(overflow),
            message_ttl_s=ttl_s,
        )
    click.echo(f"created queue {name}" if created else f"queue {name} exists already")


@topic.command("delete")
@click.argument("name")
@pass_options
def topic_delete(options: _Options, name: str) -> None:
    """Delete a topic you own, with its messages and subscriptions."""
    with options.client() as client:
        client.delete_topic(name)
    click.echo(f"deleted topic {name}")


@queue.command("delete")
@click.argument("name")
@pass_options
def queue_delete(options: _Options, name: str) -> None:
    """Delete a queue you own, with its messages."""
    with options.client() as client:
        client.delete_queue(name)
    click.echo(f"deleted queue {name}")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _echo_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, header first."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@topic.command("list")
@click.option("--mine", is_flag=True, help="Only topics you own.")
@pass_options
def topic_list(options: _Options, mine: bool) -> None:
    """List topics: owner, whether you subscribe, and the retained offsets."""
    with options.client() as client:
        topics = client.list_topics(owned_only=mine)
    if not topics:
        click.echo("no topics")
        return
    rows = [
        (
            info.name,
            info.owner,
            _yes_no(info.subscribed),
            str(info.first_offset),
            str(info.next_offset),
        )
        for info in sorted(topics, key=lambda info: info.name)
    ]
    _echo_table(("name", "owner", "subscribed", "first_offset", "next_offset"), rows)


@queue.command("list")
@click.option("--mine", is_flag=True, help="Only queues you own.")
@pass_options
def queue_list(options: _Options, mine: bool) -> None:
    """List queues: owner, whether you subscribe, stored and leased messages."""
    with options.client() as client:
        queues = client.list_queues(owned_only=mine)
    if not queues:
        click.echo("no queues")
        return
    rows = [
        (info.name, info.owner, _yes_no(info.subscribed), str(info.depth), str(info.in_flight))
        for info in sorted(queues, key=lambda info: info.name)
    ]
    _echo_table(("name", "owner", "subscribed", "depth", "in_flight"), rows)


# ---- subscriptions ---------------------------------------------------------------------------


@topic.command("subscribe")
@click.argument("name")
@click.option(
    "--from",
    "start",
    type=click.Choice([Start.LATEST.value, Start.EARLIEST.value]),
    default=Start.LATEST.value,
    show_default=True,
    help="Receive messages published from now on, or from the oldest retained.",
)
@pass_options
def topic_subscribe(options: _Options, name: str, start: str) -> None:
    """Create your durable cursor on a topic (needed before consuming it)."""
    with options.client() as client:
        offset = client.subscribe_topic(name, start=Start(start))
    click.echo(f"subscribed to topic {name} from offset {offset}")


@topic.command("unsubscribe")
@click.argument("name")
@pass_options
def topic_unsubscribe(options: _Options, name: str) -> None:
    """Drop your cursor on a topic."""
    with options.client() as client:
        client.unsubscribe_topic(name)
    click.echo(f"unsubscribed from topic {name}")


@queue.command("subscribe")
@click.argument("name")
@pass_options
def queue_subscribe(options: _Options, name: str) -> None:
    """Register yourself as a consumer of a queue."""
    with options.client() as client:
        client.subscribe_queue(name)
    click.echo(f"subscribed to queue {name}")


@queue.command("unsubscribe")
@click.argument("name")
@pass_options
def queue_unsubscribe(options: _Options, name: str) -> None:
    """Stop being a registered consumer of a queue."""
    with options.client() as client:
        client.unsubscribe_queue(name)
    click.echo(f"unsubscribed from queue {name}")


# ---- publishing ------------------------------------------------------------------------------

KIND_ARGUMENT = click.Choice([kind.value for kind in Kind])


def _stdin_batches(stream: BinaryIO) -> Iterator[list[bytes]]:
    """Lines of `stream` without their line ending, in batches of at most one PublishBatch
    (500 messages, 4 MiB), so memory stays bounded however long the input. Empty lines are
    skipped; a line longer than message_bytes_max is still yielded, for the client to refuse."""
    batch: list[bytes] = []
    batch_bytes = 0
    for line in stream:
        body = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
        if not body:
            continue
        if batch and (
            len(batch) >= limits.PUBLISH_BATCH_MESSAGES_MAX
            or batch_bytes + len(body) > limits.PUBLISH_BATCH_BYTES_MAX
        ):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(body)
        batch_bytes += len(body)
    if batch:
        yield batch


@main.command()
@click.argument("kind", type=KIND_ARGUMENT)
@click.argument("name")
@click.argument("messages", nargs=-1)
@click.option("--verbose", "-v", is_flag=True, help="Print one receipt line per message.")
@pass_options
def publish(
    options: _Options, kind: str, name: str, messages: tuple[str, ...], verbose: bool
) -> None:
    """Publish each MESSAGE, or each line of stdin when none is given.

    Stdin is read as bytes, one message per line; empty lines are skipped.
    """
    if messages:
        batches: Iterator[Sequence[bytes | str]] = iter([list(messages)])
    else:
        if sys.stdin.isatty():
            click.echo("reading messages from stdin, one per line; Ctrl-D ends", err=True)
        batches = _stdin_batches(sys.stdin.buffer)
    with options.client() as client:
        publish_many: Callable[[str, Sequence[bytes | str]], list[Receipt]] = (
            client.publish_many_queue if kind == Kind.QUEUE else client.publish_many_topic
        )
        published = 0
        for batch in batches:
            try:
                receipts = publish_many(name, batch)
            except errors.ChasquiError as error:
                if published:
                    # Earlier batches are committed; say so, so a rerun does not repeat them.
                    _fail(f"{error.message} (after {published} messages were published)")
                raise
            for receipt in receipts:
                published += 1
                if verbose:
                    duplicate = " (duplicate)" if receipt.duplicate else ""
                    click.echo(f"{kind} {name} sequence {receipt.sequence}{duplicate}")
    if not verbose:
        noun = "message" if published == 1 else "messages"
        click.echo(f"published {published} {noun} to {kind} {name}")


# ---- consuming -------------------------------------------------------------------------------


def _printable(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return repr(body)


@main.command()
@click.argument("kind", type=KIND_ARGUMENT)
@click.argument("name")
@click.option(
    "--count",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many messages  [default: no limit]",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep waiting for messages until Ctrl-C (or --count).",
)
@click.option(
    "--ack/--no-ack",
    default=True,
    show_default=True,
    help="Ack each message once printed; unacked queue messages are redelivered later.",
)
@click.option(
    "--wait-s",
    type=click.FloatRange(min=0, max=limits.CONSUME_WAIT_S_MAX),
    default=CONSUME_WAIT_S_DEFAULT,
    show_default=True,
    help="Long-poll: how long one call waits for a message. Without --follow, the command "
    "stops after waiting this long in vain.",
)
@pass_options
def consume(
    options: _Options,
    kind: str,
    name: str,
    count: int | None,
    follow: bool,
    ack: bool,
    wait_s: float,
) -> None:
    """Print message bodies, one per line (UTF-8, or a Python bytes literal otherwise).

    A topic must be subscribed to first (`chasqui topic subscribe NAME`).
    """
    if follow and wait_s == 0:
        raise click.UsageError("--follow needs --wait-s above 0 (it long-polls)")
    printed = 0
    with options.client() as client:
        consume_many: Callable[[str, int, float], list[Message]] = (
            client.consume_many_queue if kind == Kind.QUEUE else client.consume_many_topic
        )
        try:
            while count is None or printed < count:
                wanted = limits.CONSUME_MESSAGES_MAX
                if count is not None:
                    wanted = min(wanted, count - printed)
                messages = consume_many(name, wanted, wait_s)
                if not messages:
                    if follow:
                        continue  # the wait was server-side: poll again at once
                    break
                for message in messages:
                    click.echo(_printable(message.body))
                sys.stdout.flush()  # printed means seen, before the ack makes it final
                if ack:
                    client.ack(messages)
                printed += len(messages)
        except KeyboardInterrupt:
            # Ctrl-C is how --follow ends. A delivery printed but not yet acked is redelivered.
            raise SystemExit(130 if not follow else 0) from None


# ---- cluster ---------------------------------------------------------------------------------


def _ask_status(options: _Options, endpoint: str) -> ClusterStatus | str:
    """One node's own view, or why it did not give one."""
    timeout_s = min(options.timeout_s, STATUS_NODE_TIMEOUT_S_MAX)
    try:
        client = Client(
            [endpoint],
            options.key or _STATUS_ONLY_KEY,
            call_timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
        )
    except ValueError as error:
        return str(error)
    try:
        return client.cluster_status()
    except errors.ChasquiError:
        return "unreachable"
    finally:
        client.close()


def _ask_all(options: _Options, endpoints: Sequence[str]) -> dict[str, ClusterStatus | str]:
    answers: dict[str, ClusterStatus | str] = {}

    def ask(endpoint: str) -> None:
        answers[endpoint] = _ask_status(options, endpoint)

    threads = [
        threading.Thread(target=ask, args=(endpoint,), daemon=True) for endpoint in endpoints
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {endpoint: answers[endpoint] for endpoint in endpoints}


@main.command()
@pass_options
def status(options: _Options) -> None:
    """Each node's role, term, leader, commit and applied index, and lag behind the leader.

    Asks every endpoint, then any member they report that was not listed. Exits 1 when no node
    says it leads. Needs no key.
    """
    answers = _ask_all(options, options.endpoints)
    members = {
        member.client_address
        for answer in answers.values()
        if isinstance(answer, ClusterStatus)
        for member in answer.members
        if member.client_address
    }
    unlisted = sorted(members - set(answers))
    answers.update(_ask_all(options, unlisted))

    statuses = [answer for answer in answers.values() if isinstance(answer, ClusterStatus)]
    leaders = [status for status in statuses if status.role == "leader"]
    # During an election an old leader may still say it leads: the highest term is current.
    leader = max(leaders, key=lambda status: status.term, default=None)
    rows: list[tuple[str, ...]] = []
    for endpoint, answer in answers.items():
        if isinstance(answer, str):
            rows.append(("-", endpoint, answer, "-", "-", "-", "-", "-"))
            continue
        lag = "-" if leader is None else str(max(0, leader.commit_index - answer.applied_index))
        rows.append(
            (
                answer.node_id,
                endpoint,
                answer.role,
                str(answer.term),
                answer.leader_id or "-",
                str(answer.commit_index),
                str(answer.applied_index),
                lag,
            )
        )
    header = ("node", "address", "role", "term", "leader", "commit", "applied", "lag")
    _echo_table(header, rows)
    if leader is None:
        _fail("no node says it is the leader (election in progress, or no quorum)")


if __name__ == "__main__":
    main()
