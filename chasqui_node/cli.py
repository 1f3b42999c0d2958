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
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from chasqui_node import limits
from chasqui_node.cli_cluster import members, status
from chasqui_node.credentials import ADMIN_KEY_ENV, admin_key_hash, metrics_token_hash
from chasqui_node.journal import JournalCorrupt
from chasqui_node.logs import configure_logging
from chasqui_node.raft import PysyncobjMismatch
from chasqui_node.replication import RaftTimings
from chasqui_node.server import ConfigError, NodeConfig, create_server, parse_cluster
from chasqui_node.storage import StorageError
from chasqui_node.tls import write_dev_tls

logger = logging.getLogger("chasqui_node")

DEV_CLIENT_PORT_BASE = 7101
DEV_RAFT_PORT_BASE = 7201
DEV_METRICS_PORT_BASE = 7301
# `start` against another pysyncobj than the Raft layer's (sysexits EX_CONFIG); not 3, which
# means a damaged file in the data directory.
EXIT_PYSYNCOBJ_MISMATCH = 78


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
    configure_logging(log_level, log_format, node_id, (cluster_secret,))
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
    except PysyncobjMismatch as error:
        # The Raft layer's overrides could silently miss what they replace: no restart fixes
        # that, installing the pinned pysyncobj does.
        logger.critical("refusing to start: %s", error)
        raise SystemExit(EXIT_PYSYNCOBJ_MISMATCH) from error
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
            time.sleep(limits.DEV_WATCH_INTERVAL_S)
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
    deadline = time.monotonic() + limits.DEV_STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


main.add_command(status)
main.add_command(members)

if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(2) from error
