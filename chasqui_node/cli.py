"""`chasqui-node`: start a node, run a local dev cluster, show cluster status.

Every `start` flag may also come from `--config FILE` (TOML, same names with underscores) or a
`CHASQUI_<NAME>` environment variable; the command line wins, then the environment, then the
file.

Security flags: `--admin-key-file` (or the `CHASQUI_ADMIN_KEY` environment variable; never a
command-line value, which any local user could read with `ps`) names the bootstrap admin key;
`--signup closed` lets only admins create users; `--tls-cert`/`--tls-key` (and `--tls-client-ca`
for mutual TLS) put the client port behind TLS. `dev --tls` makes throwaway certificates.

Operations flags: `--metrics-port` serves Prometheus metrics at `http://CLIENT_HOST:PORT/metrics`
(off by default; they name every queue and its depth), `--metrics-bind 127.0.0.1` serves them on
another host than the client port's (here: to local scrapers only), and `--metrics-token-file`
makes /metrics require `Authorization: Bearer <token>`; `--log-format json` writes one JSON
object per line (ts, level, logger, message, node_id) instead of one text line per event.
Either way no log line carries the cluster secret or a key: the node never logs them, and the
formatter also masks the cluster secret and any `Bearer` token should a library ever echo one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import grpc

from chasqui_node import limits
from chasqui_node.journal import JournalCorrupt
from chasqui_node.replication import RaftTimings
from chasqui_node.server import ConfigError, NodeConfig, create_server, parse_cluster
from chasqui_node.service import LEADER_METADATA_KEY, hash_key
from chasqui_node.storage import StorageError
from chasqui_node.tls import write_dev_tls
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

logger = logging.getLogger("chasqui_node")

DEV_CLIENT_PORT_BASE = 7101
DEV_RAFT_PORT_BASE = 7201
DEV_METRICS_PORT_BASE = 7301
DEV_STOP_WAIT_S = 10.0  # SIGTERM, then SIGKILL after this long
ADMIN_KEY_ENV = "CHASQUI_ADMIN_KEY"
_KEY_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


_BEARER_TOKEN = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


class TextLogFormatter(logging.Formatter):
    """One event, one line: `ts LEVEL logger [node_id]: message`, a traceback folded onto the
    same line with literal `\\n`, and secrets masked (see `_scrub`)."""

    def __init__(self, node_id: str, secrets_to_mask: tuple[str, ...]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(node_id)s]: %(message)s")
        self._node_id = node_id
        self._secrets = secrets_to_mask

    def format(self, record: logging.LogRecord) -> str:
        record.node_id = self._node_id
        return _scrub(super().format(record), self._secrets).replace("\n", "\\n")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, node_id, and
    `exception` when there is a traceback. Secrets are masked as in text."""

    def __init__(self, node_id: str, secrets_to_mask: tuple[str, ...]) -> None:
        super().__init__()
        self._node_id = node_id
        self._secrets = secrets_to_mask

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, str] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage(), self._secrets),
            "node_id": self._node_id,
        }
        if record.exc_info:
            event["exception"] = _scrub(self.formatException(record.exc_info), self._secrets)
        return json.dumps(event, ensure_ascii=False)


def _scrub(text: str, secrets_to_mask: tuple[str, ...]) -> str:
    """Defence in depth: Chasqui never logs a secret, but a library might echo one."""
    for secret in secrets_to_mask:
        text = text.replace(secret, REDACTED)
    return _BEARER_TOKEN.sub(lambda match: match.group(1) + REDACTED, text)


def _configure_logging(
    level: str,
    log_format: str = "text",
    node_id: str = "-",
    secrets_to_mask: tuple[str, ...] = (),
) -> None:
    """Route every log record to stderr, one line per event, in `log_format` (text or json).
    `secrets_to_mask` are replaced by [redacted] wherever they would appear."""
    masked = tuple(secret for secret in secrets_to_mask if secret)
    formatter: logging.Formatter = (
        JsonLogFormatter(node_id, masked)
        if log_format == "json"
        else TextLogFormatter(node_id, masked)
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # pysyncobj logs every reconnect attempt at WARNING while peers start up.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    try:
        with open(value, "rb") as source:
            settings = tomllib.load(source)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise click.BadParameter(f"cannot read config {value}: {error}") from error
    ctx.default_map = {key.replace("-", "_"): item for key, item in settings.items()}


def _derived_secret(cluster: str) -> str:
    """A stand-in secret when none is configured: better than an open pickle port, but anyone
    who knows the member list can derive it. The node warns; production sets a real one."""
    members = ",".join(sorted(cluster.split(",")))
    return hashlib.sha256(f"chasqui-dev-secret:{members}".encode()).hexdigest()


def admin_key_hash(key_file: Path | None, environment: dict[str, str]) -> str | None:
    """The hash of the configured admin key (file first, then `CHASQUI_ADMIN_KEY`), or None.
    Raises ConfigError for a key too short or not URL-safe; the message never shows the key."""
    key = admin_key(key_file, environment)
    return None if key is None else hash_key(key)


def metrics_token_hash(token_file: Path | None) -> str | None:
    """The hash of the bearer token /metrics requires (first line of `token_file`), or None
    for none. The token follows the admin key's rules; raises ConfigError as `admin_key` does."""
    if token_file is None:
        return None
    source = f"metrics token file {token_file}"
    return hash_key(_checked_key(_first_line(token_file, source), source))


def admin_key(key_file: Path | None, environment: dict[str, str]) -> str | None:
    """The configured admin key itself (see `admin_key_hash`); only the membership commands,
    which must send it, use it unhashed."""
    if key_file is not None:
        source = f"admin key file {key_file}"
        key = _first_line(key_file, source)
    elif environment.get(ADMIN_KEY_ENV):
        key = environment[ADMIN_KEY_ENV].strip()
        source = ADMIN_KEY_ENV
    else:
        return None
    return _checked_key(key, source)


def _first_line(key_file: Path, source: str) -> str:
    try:
        lines = key_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {source}: {error}") from error
    return lines[0].strip() if lines else ""


def _checked_key(key: str, source: str) -> str:
    """`key`, when it is long and URL-safe enough; the ConfigError never shows it."""
    if not (
        limits.ADMIN_KEY_CHARS_MIN <= len(key) <= limits.ADMIN_KEY_CHARS_MAX
        and set(key) <= _KEY_ALPHABET
    ):
        raise ConfigError(
            f"the key in {source} must be {limits.ADMIN_KEY_CHARS_MIN} to "
            f"{limits.ADMIN_KEY_CHARS_MAX} URL-safe characters [A-Za-z0-9_-] (at least 128 "
            "random bits); make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))'"
        )
    return key


def _client_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    if ca is None and cert is None:
        return None
    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together; give both")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


@click.group()
def main() -> None:
    """Chasqui broker node."""


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    envvar="CHASQUI_CONFIG",
    help="TOML file with any of these options (underscores for dashes).",
)
@click.option("--node-id", required=True, envvar="CHASQUI_NODE_ID", help="This node's id.")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CHASQUI_DATA_DIR",
    help="Directory for the Raft journal, snapshots and LMDB state.",
)
@click.option(
    "--cluster",
    required=True,
    envvar="CHASQUI_CLUSTER",
    help="Members: ID=CLIENT_HOST:PORT/RAFT_HOST:PORT, comma separated.",
)
@click.option(
    "--bind-host",
    default=None,
    envvar="CHASQUI_BIND_HOST",
    help="Bind this host (e.g. 0.0.0.0) instead of the listed addresses.",
)
@click.option(
    "--cluster-secret",
    default=None,
    envvar="CHASQUI_CLUSTER_SECRET",
    help="Shared secret encrypting and authenticating Raft traffic (all nodes alike).",
)
@click.option(
    "--cluster-secret-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    envvar="CHASQUI_CLUSTER_SECRET_FILE",
    help="File holding the cluster secret (first line).",
)
@click.option(
    "--fsync",
    type=click.Choice(["always", "never"]),
    default="always",
    envvar="CHASQUI_FSYNC",
    help="Sync state to disk before acknowledging; 'never' is unsafe.",
)
@click.option(
    "--raft-compaction-entries",
    type=click.IntRange(min=10),
    default=RaftTimings().log_compaction_entries_min,
    show_default=True,
    envvar="CHASQUI_RAFT_COMPACTION_ENTRIES",
    help=(
        "Snapshot the state and trim the Raft log after this many entries (up to 1.5 times as"
        " many, staggered by node, so the nodes do not all pause at once)."
    ),
)
@click.option(
    "--admin-key-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="CHASQUI_ADMIN_KEY_FILE",
    help=f"File holding the bootstrap admin key (first line); or set {ADMIN_KEY_ENV}.",
)
@click.option(
    "--signup",
    type=click.Choice(["open", "closed"]),
    default="open",
    show_default=True,
    envvar="CHASQUI_SIGNUP",
    help="'closed': only an admin key may create users. Set every node alike.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="CHASQUI_TLS_CERT",
    help="PEM certificate chain for the client port; clients must then use TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="CHASQUI_TLS_KEY",
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="CHASQUI_TLS_CLIENT_CA",
    help="PEM CA bundle: clients must present a certificate it signed (mutual TLS).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    envvar="CHASQUI_METRICS_PORT",
    help="Serve Prometheus metrics on http://CLIENT_HOST:PORT/metrics (off when not given).",
)
@click.option(
    "--metrics-bind",
    default=None,
    envvar="CHASQUI_METRICS_BIND",
    help=(
        "Host /metrics listens on instead of the client port's (e.g. 127.0.0.1: local"
        " scrapers only); the metrics name every queue and its depth."
    ),
)
@click.option(
    "--metrics-token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="CHASQUI_METRICS_TOKEN_FILE",
    help="File holding a token (first line) that /metrics then requires as 'Bearer <token>'.",
)
@click.option("--log-level", default="info", envvar="CHASQUI_LOG_LEVEL", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="CHASQUI_LOG_FORMAT",
    help="One line per event: plain text, or a JSON object (ts, level, logger, message, node_id).",
)
def start(
    node_id: str,
    data_dir: Path,
    cluster: str,
    bind_host: str | None,
    cluster_secret: str | None,
    cluster_secret_file: str | None,
    fsync: str,
    raft_compaction_entries: int,
    admin_key_file: Path | None,
    signup: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    metrics_port: int | None,
    metrics_bind: str | None,
    metrics_token_file: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    """Start one node of a cluster and serve until SIGTERM or SIGINT."""
    if cluster_secret_file:
        cluster_secret = Path(cluster_secret_file).read_text().splitlines()[0].strip()
    secret_derived = not cluster_secret
    if not cluster_secret:
        cluster_secret = _derived_secret(cluster)
    _configure_logging(log_level, log_format, node_id, (cluster_secret,))
    if secret_derived:
        logger.warning(
            "no --cluster-secret given: using one derived from the member list, which anyone "
            "who knows the members can derive; set CHASQUI_CLUSTER_SECRET in production"
        )
    try:
        config = NodeConfig(
            node_id=node_id,
            data_dir=data_dir,
            members=parse_cluster(cluster),
            cluster_secret=cluster_secret,
            bind_host=bind_host,
            fsync=fsync == "always",
            timings=RaftTimings(log_compaction_entries_min=raft_compaction_entries),
            admin_key_hash=admin_key_hash(admin_key_file, dict(os.environ)),
            signup_open=signup == "open",
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            metrics_port=metrics_port,
            metrics_bind=metrics_bind,
            metrics_token_hash=metrics_token_hash(metrics_token_file),
        )
        config.member()
        server, _port = create_server(config)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    except (JournalCorrupt, StorageError) as error:
        # Serving or voting with a damaged log could lose or invent confirmed messages.
        logger.critical("refusing to start: %s", error)
        raise SystemExit(3) from error

    # What start-up built (about 42,000 objects: modules, gRPC, pysyncobj) lives as long as
    # the process. Frozen, it is left out of the cyclic collector's full passes, which took
    # 15-50 ms each during W4 (a pause in every call in flight) and about 2 ms after.
    gc.collect()
    gc.freeze()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        # Stop on another thread: grpc's stop must not run inside a signal handler frame
        # that may interrupt one of its own locks.
        import threading

        threading.Thread(target=server.stop, name="chasqui-shutdown").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()


@main.command()
@click.option("--nodes", default=3, show_default=True, help="Cluster size (odd: 3 or 5).")
@click.option(
    "--data-dir",
    default="./var",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="One subdirectory per node is created here.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--client-port", default=DEV_CLIENT_PORT_BASE, show_default=True)
@click.option("--raft-port", default=DEV_RAFT_PORT_BASE, show_default=True)
@click.option(
    "--metrics-port",
    default=DEV_METRICS_PORT_BASE,
    show_default=True,
    help="First node's Prometheus port; node i gets this + i - 1.",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Serve clients over TLS with a throwaway CA and node certificate made under DATA_DIR/tls.",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def dev(
    nodes: int,
    data_dir: Path,
    host: str,
    client_port: int,
    raft_port: int,
    metrics_port: int,
    tls: bool,
    log_format: str,
) -> None:
    """Start a local cluster in the foreground; Ctrl-C stops every node."""
    if nodes < 1:
        raise click.UsageError(f"--nodes {nodes} must be at least 1")
    data_dir.mkdir(parents=True, exist_ok=True)
    secret_file = data_dir / "cluster-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        secret_file.chmod(0o600)
    tls_arguments: list[str] = []
    ca_path: Path | None = None
    if tls:
        files = write_dev_tls(data_dir / "tls", (host,))
        ca_path = files.ca_cert
        tls_arguments = ["--tls-cert", str(files.node_cert), "--tls-key", str(files.node_key)]
    ids = [f"n{number}" for number in range(1, nodes + 1)]
    cluster = ",".join(
        f"{node_id}={host}:{client_port + i}/{host}:{raft_port + i}"
        for i, node_id in enumerate(ids)
    )
    processes: list[subprocess.Popen[bytes]] = []
    for i, node_id in enumerate(ids):
        node_dir = data_dir / node_id
        node_dir.mkdir(exist_ok=True)
        command = [
            sys.executable, "-m", "chasqui_node.cli", "start",
            "--node-id", node_id,
            "--data-dir", str(node_dir),
            "--cluster", cluster,
            "--cluster-secret-file", str(secret_file),
            "--metrics-port", str(metrics_port + i),
            "--log-format", log_format,
            *tls_arguments,
        ]  # fmt: skip
        with open(node_dir / "node.log", "ab") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    preexec_fn=_stop_with_parent,
                )
            )
    endpoints = [f"{host}:{client_port + i}" for i in range(nodes)]
    click.echo(
        f"Chasqui dev cluster: {nodes} nodes, data in {data_dir}/, logs in {data_dir}/n*/node.log"
    )
    for i, (node_id, endpoint, process) in enumerate(zip(ids, endpoints, processes, strict=True)):
        metrics_url = f"http://{host}:{metrics_port + i}/metrics"
        click.echo(f"  {node_id}  {endpoint}  metrics {metrics_url}  (pid {process.pid})")
    click.echo("\nTry it from Python (.venv/bin/python):")
    click.echo("  from chasqui_client import Client")
    if ca_path is None:
        click.echo(
            f"  c = Client({endpoints!r}); c.create_queue('jobs'); c.publish_queue('jobs', b'hi')"
        )
    else:
        click.echo("  import grpc")
        click.echo(f"  tls = grpc.ssl_channel_credentials(open({str(ca_path)!r}, 'rb').read())")
        click.echo(f"  c = Client({endpoints!r}, credentials=tls); c.create_queue('jobs')")
        click.echo(f"\nTLS is on: clients trust the CA certificate {ca_path}")
        click.echo(f"  chasqui-node status --endpoints {','.join(endpoints)} --tls-ca {ca_path}")
    click.echo("\nCtrl-C stops every node.")
    try:
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        click.echo("a node exited; stopping the cluster (see its node.log)", err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        _stop_processes(processes)


def _stop_with_parent() -> None:
    """Runs in each dev node's child process before exec: ask Linux to SIGTERM it when `dev`
    dies, however it dies (even SIGKILL), so no node outlives the cluster it belonged to."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + DEV_STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


@main.command()
@click.option(
    "--endpoints",
    required=True,
    envvar="CHASQUI_ENDPOINTS",
    help="Client addresses, comma separated.",
)
@click.option("--timeout-s", default=2.0, show_default=True)
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
    credentials = _client_credentials(tls_ca, tls_cert, tls_key)
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


MEMBERS_CALL_ATTEMPTS_MAX = 10  # endpoints tried (following leader hints) per membership change
MEMBERS_RETRY_PAUSE_S = 0.3  # between attempts when no node names a leader


@main.group()
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
            click.option("--timeout-s", default=15.0, show_default=True),
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
    credentials = _client_credentials(options["tls_ca"], options["tls_cert"], options["tls_key"])
    listed = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not listed:
        raise click.UsageError("--endpoints lists no address")
    deadline = time.monotonic() + options["timeout_s"]
    endpoint = listed[0]
    last_error: grpc.RpcError | None = None
    for attempt in range(1, MEMBERS_CALL_ATTEMPTS_MAX + 1):
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
                    time.sleep(MEMBERS_RETRY_PAUSE_S)
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


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(2) from error
