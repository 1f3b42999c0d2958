"""`chasqui-node status` and `chasqui-node members add|remove`: commands that call the nodes'
client port, with TLS options like the client's."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import grpc

from chasqui_node import limits
from chasqui_node.credentials import ADMIN_KEY_ENV, admin_key, client_credentials
from chasqui_node.server import ConfigError, parse_cluster
from chasqui_node.service import LEADER_METADATA_KEY
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc


def _client_tls_options(command: Any) -> Any:
    """--tls-ca, --tls-cert and --tls-key, for commands that call the nodes' client port."""
    for option in (
        click.option(
            "--tls-key",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            default=None,
            envvar="CHASQUI_TLS_CLIENT_KEY",
            help="Private key of --tls-cert.",
        ),
        click.option(
            "--tls-cert",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            default=None,
            envvar="CHASQUI_TLS_CLIENT_CERT",
            help="Client certificate for nodes that require mutual TLS (with --tls-key).",
        ),
        click.option(
            "--tls-ca",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            default=None,
            envvar="CHASQUI_TLS_CA",
            help="Connect over TLS, trusting this PEM CA bundle.",
        ),
    ):
        command = option(command)
    return command


@click.command()
@click.option(
    "--endpoints",
    required=True,
    envvar="CHASQUI_ENDPOINTS",
    help="Client addresses, comma separated.",
)
@click.option("--timeout-s", default=limits.STATUS_TIMEOUT_S_DEFAULT, show_default=True)
@_client_tls_options
def status(
    endpoints: str,
    timeout_s: float,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Print each node's role, term, commit/applied index and lag."""
    rows: list[tuple[str, ...]] = []
    answers: list[Any] = []
    credentials = client_credentials(tls_ca, tls_cert, tls_key)
    for endpoint in filter(None, (e.strip() for e in endpoints.split(","))):
        channel = (
            grpc.insecure_channel(endpoint)
            if credentials is None
            else grpc.secure_channel(endpoint, credentials)
        )
        with channel:
            try:
                answer = pb_grpc.BrokerStub(channel).ClusterStatus(
                    pb.ClusterStatusRequest(), timeout=timeout_s
                )
                answers.append((endpoint, answer))
            except grpc.RpcError as error:
                answers.append((endpoint, error))
    leader_commit = max(
        (
            a.commit_index
            for _, a in answers
            if not isinstance(a, grpc.RpcError) and a.role == "leader"
        ),
        default=0,
    )
    for endpoint, answer in answers:
        if isinstance(answer, grpc.RpcError):
            rows.append((endpoint, "-", "unreachable", "-", "-", "-", "-", "-"))
            continue
        lag = str(max(0, leader_commit - answer.applied_index)) if leader_commit else "?"
        rows.append(
            (
                endpoint,
                answer.node_id,
                answer.role,
                str(answer.term),
                answer.leader_id or "-",
                str(answer.commit_index),
                str(answer.applied_index),
                lag,
            )
        )
    header = ("endpoint", "node", "role", "term", "leader", "commit", "applied", "lag")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
    if not any(not isinstance(a, grpc.RpcError) and a.role == "leader" for _, a in answers):
        raise SystemExit(1)


@click.group()
def members() -> None:
    """Add or remove one cluster member at a time (on the leader; needs an admin key)."""


def _members_options(command: Any) -> Any:
    command = _client_tls_options(command)  # listed after the options below
    for option in reversed(
        [
            click.option(
                "--endpoints",
                required=True,
                envvar="CHASQUI_ENDPOINTS",
                help="Client addresses of current members, comma separated.",
            ),
            click.option(
                "--admin-key-file",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                default=None,
                help=f"File holding an admin key (default: ${ADMIN_KEY_ENV}).",
            ),
            click.option(
                "--timeout-s", default=limits.MEMBERS_TIMEOUT_S_DEFAULT, show_default=True
            ),
        ]
    ):
        command = option(command)
    return command


def _call_leader(method: str, request: Any, endpoints: str, options: dict[str, Any]) -> Any:
    """Send an admin call to the leader, following `chasqui-leader` hints. Exits 1 with the
    node's message on any refusal; never prints the key."""
    key = admin_key(options["admin_key_file"], dict(os.environ))
    if key is None:
        raise click.UsageError(f"give --admin-key-file or set {ADMIN_KEY_ENV}")
    credentials = client_credentials(options["tls_ca"], options["tls_cert"], options["tls_key"])
    listed = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not listed:
        raise click.UsageError("--endpoints lists no address")
    deadline = time.monotonic() + options["timeout_s"]
    endpoint = listed[0]
    last_error: grpc.RpcError | None = None
    for attempt in range(1, limits.MEMBERS_CALL_ATTEMPTS_MAX + 1):
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            break
        channel = (
            grpc.insecure_channel(endpoint)
            if credentials is None
            else grpc.secure_channel(endpoint, credentials)
        )
        with channel:
            try:
                return getattr(pb_grpc.BrokerStub(channel), method)(
                    request, metadata=(("authorization", f"Bearer {key}"),), timeout=remaining_s
                )
            except grpc.RpcError as error:
                last_error = error
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    break
                hint = dict(error.trailing_metadata() or ()).get(LEADER_METADATA_KEY)
                if hint:
                    endpoint = str(hint)
                else:
                    endpoint = listed[attempt % len(listed)]
                    time.sleep(limits.MEMBERS_RETRY_PAUSE_S)
    if last_error is None:
        click.echo(f"error: no answer within {options['timeout_s']} s", err=True)
    else:
        click.echo(f"error: {last_error.code().name}: {last_error.details()}", err=True)
    raise SystemExit(1)


def _echo_members(response: Any) -> None:
    click.echo("members:")
    for member in response.members:
        click.echo(f"  {member.node_id}={member.client_address}/{member.raft_address}")


@members.command("add")
@_members_options
@click.argument("member")
def members_add(member: str, endpoints: str, **options: Any) -> None:
    """Add MEMBER, given as ID=CLIENT_HOST:PORT/RAFT_HOST:PORT. Then start that node with
    --cluster listing every member, itself included."""
    try:
        (parsed,) = parse_cluster(member)
    except (ConfigError, ValueError) as error:
        raise click.BadParameter(f"{member!r}: expected ID=CLIENT/RAFT ({error})") from error
    request = pb.AddMemberRequest(
        node_id=parsed.node_id,
        client_address=parsed.client_address,
        raft_address=parsed.raft_address,
    )
    response = _call_leader("AddMember", request, endpoints, options)
    click.echo(f"added {parsed.node_id}")
    _echo_members(response)


@members.command("remove")
@_members_options
@click.argument("node_id")
def members_remove(node_id: str, endpoints: str, **options: Any) -> None:
    """Remove member NODE_ID (not the current leader: stop it first, then remove it)."""
    response = _call_leader(
        "RemoveMember", pb.RemoveMemberRequest(node_id=node_id), endpoints, options
    )
    click.echo(f"removed {node_id}")
    _echo_members(response)
