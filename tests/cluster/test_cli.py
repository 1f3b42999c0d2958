"""`chasqui-node` as operators use it: --help, the three ways to configure `start` (flags, a
TOML file, CHASQUI_* environment variables) forming one cluster, `status`, and refusals of bad
configuration with a clear message instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, Cluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chasqui_node.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["start", "dev", "status"]),
        (("start",), ["--node-id", "--data-dir", "--cluster", "--bind-host", "--config"]),
        (("dev",), ["--nodes", "--data-dir"]),
        (("status",), ["--endpoints"]),
    ],
)
def test_every_command_has_help(command: tuple[str, ...], expected: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    for word in expected:
        assert word in result.stdout


@pytest.fixture
def unstarted(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def test_flags_config_file_and_environment_form_one_cluster(
    unstarted: Cluster, tmp_path: Path
) -> None:
    cluster = unstarted
    _, n2, n3 = cluster.nodes.values()
    cluster.start_node("n1")  # flags
    config = tmp_path / "n2.toml"
    config.write_text(
        f'node_id = "n2"\ndata_dir = "{n2.data_dir}"\ncluster = "{cluster.cluster_arg}"\n'
    )
    cluster.start_node("n2", arguments=["--config", str(config)])
    cluster.start_node(
        "n3",
        arguments=[],
        environment={
            "CHASQUI_NODE_ID": "n3",
            "CHASQUI_DATA_DIR": str(n3.data_dir),
            "CHASQUI_CLUSTER": cluster.cluster_arg,
        },
    )
    cluster.wait_for_leader()
    wait_until(lambda: len(cluster.statuses()) == 3, 30, "all three nodes to answer")

    result = run_cli("status", "--endpoints", ",".join(cluster.endpoints))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["endpoint", "node", "role"]
    roles = sorted(line.split()[2] for line in lines[1:])
    assert roles == ["follower", "follower", "leader"]


def test_status_of_unreachable_endpoints_exits_nonzero() -> None:
    result = run_cli("status", "--endpoints", "127.0.0.1:1", "--timeout-s", "0.5")
    assert result.returncode == 1
    assert "unreachable" in result.stdout


@pytest.mark.parametrize(
    ("cluster_text", "message"),
    [
        ("n1=127.0.0.1:7101", "is not ID=CLIENT_HOST:PORT/RAFT_HOST:PORT"),
        ("n1=127.0.0.1:x/127.0.0.1:7201", "is not HOST:PORT"),
        ("n2=127.0.0.1:7101/127.0.0.1:7201", "node id 'n1' is not in the cluster"),
        (
            "n1=127.0.0.1:7101/127.0.0.1:7201,n2=127.0.0.1:7101/127.0.0.1:7202",
            "repeat a client address",
        ),
    ],
)
def test_bad_cluster_configuration_is_refused_clearly(
    tmp_path: Path, cluster_text: str, message: str
) -> None:
    result = run_cli(
        "start", "--node-id", "n1", "--data-dir", str(tmp_path), "--cluster", cluster_text
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
