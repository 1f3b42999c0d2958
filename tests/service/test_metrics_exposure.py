"""Who can read /metrics: it names every queue and its depth, so an operator chooses the host it
listens on (`--metrics-bind`) and may require a bearer token (`--metrics-token-file`).

The bind tests start a real one-node `NodeServer` in-process (`support.real_node`: pysyncobj,
LMDB in a temporary directory; about half a second), not the fake replicator, because what they
prove is server.py's wiring: the member's client address is on 127.0.0.2, so the default (the
client port's host, as before the option existed) and `metrics_bind = 127.0.0.1` land on
different loopback addresses, and each test connects to both. The token tests serve a registry
with `MetricsHttpServer` alone; the CLI tests run `chasqui-node start` through click with
`create_server` replaced, to see each source of the settings (flag, environment, TOML file)
reach `NodeConfig`.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter

from chasqui_node import cli, credentials
from chasqui_node.metrics import MetricsHttpServer
from chasqui_node.server import ConfigError, NodeConfig, NodeServer
from chasqui_node.service import hash_key
from tests.service.support import free_port, real_node

CLIENT_HOST = "127.0.0.2"  # the member's client address; 127.0.0.1 is then "somewhere else"


def can_bind(host: str) -> bool:
    try:
        free_port(host)
    except OSError:
        return False
    return True


def get(url: str, token: str | None = None) -> tuple[int, str]:
    """(HTTP status, body) of a GET, with `Authorization: Bearer <token>` when given."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=5
        ) as answer:
            status: int = answer.status
            return status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def refused(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (the connection is refused)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Start a one-node cluster whose client port is on CLIENT_HOST, with the given settings;
    every node started is stopped afterwards."""
    if not can_bind(CLIENT_HOST):
        pytest.skip(f"{CLIENT_HOST} is not a loopback address here")
    with contextlib.ExitStack() as nodes:
        started = itertools.count()

        def start(**settings: Any) -> NodeServer:
            data_dir = tmp_path / f"node-{next(started)}"
            return nodes.enter_context(real_node(data_dir, CLIENT_HOST, **settings))

        yield start


def test_metrics_listen_on_the_client_ports_host_by_default(start_node: Any) -> None:
    node = start_node()
    assert node.metrics_server is not None
    port = node.metrics_server.port
    status, body = get(f"http://{CLIENT_HOST}:{port}/metrics")
    assert status == 200 and 'chasqui_node_info{node_id="n1"} 1.0' in body
    assert refused("127.0.0.1", port)


def test_metrics_bind_puts_metrics_on_that_host_only(start_node: Any) -> None:
    node = start_node(metrics_bind="127.0.0.1")
    assert node.metrics_server is not None
    port = node.metrics_server.port
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and 'chasqui_node_info{node_id="n1"} 1.0' in body
    assert refused(CLIENT_HOST, port)


def test_a_node_with_a_metrics_token_serves_only_its_bearer(start_node: Any) -> None:
    token = secrets.token_urlsafe(24)
    node = start_node(metrics_bind="127.0.0.1", metrics_token_hash=hash_key(token))
    assert node.metrics_server is not None
    url = f"http://127.0.0.1:{node.metrics_server.port}/metrics"
    assert get(url)[0] == 401
    status, body = get(url, token)
    assert status == 200 and 'chasqui_node_info{node_id="n1"} 1.0' in body


@pytest.fixture
def guarded_registry() -> Iterator[tuple[str, str]]:
    """A registry with one counter served behind a token: (url, token)."""
    registry = CollectorRegistry()
    Counter("canary", "Proves the metrics were served.", registry=registry).inc()
    token = secrets.token_urlsafe(24)
    server = MetricsHttpServer(registry, "127.0.0.1", 0, token_hash=hash_key(token))
    try:
        yield f"http://127.0.0.1:{server.port}/metrics", token
    finally:
        server.close()


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Bearer wrong-token", "Basic {token}", "{token}", "Bearer {token}x"],
    ids=["none", "empty", "wrong", "basic-scheme", "no-scheme", "token-plus-one"],
)
def test_metrics_without_the_token_get_401_and_nothing_else(
    guarded_registry: tuple[str, str], authorization: str | None
) -> None:
    url, token = guarded_registry
    headers = {} if authorization is None else {"Authorization": authorization.format(token=token)}
    with pytest.raises(urllib.error.HTTPError) as refusal:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
    assert refusal.value.code == 401
    assert refusal.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert "canary" not in refusal.value.read().decode()


def test_metrics_with_the_token_are_served(guarded_registry: tuple[str, str]) -> None:
    url, token = guarded_registry
    status, body = get(url, token)
    assert status == 200 and "canary_total 1.0" in body


@pytest.mark.parametrize("source", ["flag", "environment", "config file"])
def test_start_takes_metrics_bind_and_token_file_from_each_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "metrics-token"
    token_file.write_text(token + "\n")
    configs: list[NodeConfig] = []

    def capture(config: NodeConfig) -> tuple[NodeServer, int]:
        configs.append(config)
        raise ConfigError("captured")  # start stops here, with a usage error

    monkeypatch.setattr(cli, "create_server", capture)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    arguments = [
        "start", "--node-id", "n1", "--data-dir", str(tmp_path / "data"),
        "--cluster", "n1=127.0.0.1:7401/127.0.0.1:7501", "--cluster-secret", "s" * 32,
    ]  # fmt: skip
    environment: dict[str, str] = {}
    if source == "flag":
        arguments += ["--metrics-bind", "127.0.0.1", "--metrics-token-file", str(token_file)]
    elif source == "environment":
        environment = {
            "CHASQUI_METRICS_BIND": "127.0.0.1",
            "CHASQUI_METRICS_TOKEN_FILE": str(token_file),
        }
    else:
        config_file = tmp_path / "node.toml"
        config_file.write_text(f'metrics_bind = "127.0.0.1"\nmetrics_token_file = "{token_file}"\n')
        arguments += ["--config", str(config_file)]
    result = CliRunner().invoke(cli.main, arguments, env=environment)
    assert "captured" in result.output, result.output
    (config,) = configs
    assert config.metrics_bind == "127.0.0.1"
    assert config.metrics_token_hash == hash_key(token)
    assert token not in repr(config)


def test_start_leaves_metrics_bind_and_token_unset_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs: list[NodeConfig] = []

    def capture(config: NodeConfig) -> tuple[NodeServer, int]:
        configs.append(config)
        raise ConfigError("captured")

    monkeypatch.setattr(cli, "create_server", capture)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    arguments = [
        "start", "--node-id", "n1", "--data-dir", str(tmp_path / "data"),
        "--cluster", "n1=127.0.0.1:7401/127.0.0.1:7501", "--cluster-secret", "s" * 32,
    ]  # fmt: skip
    result = CliRunner().invoke(cli.main, arguments, env={})
    assert "captured" in result.output, result.output
    (config,) = configs
    assert config.metrics_bind is None and config.metrics_token_hash is None


def test_a_metrics_token_too_short_is_refused_without_showing_it(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("short-token\n")
    with pytest.raises(ConfigError) as refusal:
        credentials.metrics_token_hash(token_file)
    assert "short-token" not in str(refusal.value)
    assert "metrics token file" in str(refusal.value)
