"""The rendered bootstrap, run for real: deploy/render.py renders each node's node.toml and
bootstrap.sh from the templates Terraform uses, and three of those bootstraps, run locally with
the install, data-volume and systemd steps switched off, write node.env (mode 0600, from the
secret file) and become a three-node loopback cluster that elects a leader and serves a client.

Also: the cloud-config embeds exactly the rendered files and the repository's systemd unit, the
EC2 bootstrap is valid bash, and the renderer refuses values it could not embed safely.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY_DIR, start_bootstrap, write_local_bootstraps
from tests.harness import Cluster, wait_until

RENDER_TIMEOUT_S = 30


def ec2_settings(render: ModuleType) -> Any:
    return render.NodeBootstrap(
        node_id="n3",
        cluster=render.cluster_string(["10.40.0.10", "10.40.1.10", "10.40.2.10"]),
        data_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
        install_source="chasqui==0.1.0",
        secret_parameter="/chasqui/cluster-secret",
        secret_region="eu-west-1",
    )


def test_node_toml_holds_the_start_options(render: ModuleType) -> None:
    rendered = render.render_node(ec2_settings(render))
    config = tomllib.loads(rendered["node.toml"])
    assert config == {
        "node_id": "n3",
        "data_dir": "/var/lib/chasqui",
        "cluster": "n1=10.40.0.10:7100/10.40.0.10:7200,n2=10.40.1.10:7100/10.40.1.10:7200,"
        "n3=10.40.2.10:7100/10.40.2.10:7200",
        "fsync": "always",
    }
    assert "CHASQUI_CLUSTER_SECRET" not in rendered["node.toml"]


def test_cloud_config_embeds_the_rendered_files(render: ModuleType) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a checkov dependency) reads cloud-config")
    rendered = render.render_node(ec2_settings(render))
    assert rendered["user-data.yaml"].startswith("#cloud-config\n")
    cloud_config = yaml.safe_load(rendered["user-data.yaml"])
    files = {
        entry["path"]: (base64.b64decode(entry["content"]).decode(), entry["permissions"])
        for entry in cloud_config["write_files"]
    }
    unit = (DEPLOY_DIR / "systemd" / "chasqui-node.service").read_text()
    assert files == {
        "/etc/chasqui/node.toml": (rendered["node.toml"], "0644"),
        "/etc/systemd/system/chasqui-node.service": (unit, "0644"),
        "/usr/local/sbin/chasqui-bootstrap": (rendered["bootstrap.sh"], "0700"),
    }
    assert cloud_config["runcmd"] == [["/usr/local/sbin/chasqui-bootstrap"]]


def test_ec2_bootstrap_is_valid_bash_and_runs_every_step(
    render: ModuleType, tmp_path: Path
) -> None:
    bootstrap = render.write_node(ec2_settings(render), tmp_path)["bootstrap.sh"]
    completed = subprocess.run(["bash", "-n", str(bootstrap)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    text = bootstrap.read_text()
    for step in (
        "DATA_DEVICE='/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0'",
        "INSTALL_SOURCE='chasqui==0.1.0'",
        "SECRET_PARAMETER='/chasqui/cluster-secret'",
        "SERVICE_MODE='systemd'",
        "systemctl enable --now chasqui-node.service",
        "blkid -p",
    ):
        assert step in text
    assert "set -x" not in text.replace("no `set -x`", "")


def test_renderer_cli_writes_the_files(tmp_path: Path) -> None:
    command = [
        sys.executable, str(DEPLOY_DIR / "render.py"),
        "--node-id", "n1",
        "--addresses", "10.40.0.10,10.40.1.10,10.40.2.10",
        "--secret-parameter", "/chasqui/cluster-secret",
        "--region", "eu-west-1",
        "--out", str(tmp_path / "n1"),
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(path.name for path in (tmp_path / "n1").iterdir()) == [
        "bootstrap.sh", "node.toml", "user-data.yaml",
    ]  # fmt: skip
    assert tomllib.loads((tmp_path / "n1" / "node.toml").read_text())["node_id"] == "n1"


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("node_id", "n9", "not a member"),
        ("node_id", "n 1", "letters, digits"),
        ("data_dir", "/var/lib/it's", "quote"),
        ("cluster", 'n1=a:1/a:2"', "quote"),
        ("service_mode", "docker", "service mode"),
        ("secret_parameter", "", "secret"),
    ],
)
def test_renderer_refuses_values_it_cannot_embed(
    render: ModuleType, field: str, value: str, complaint: str
) -> None:
    base = render.NodeBootstrap(
        node_id="n1", cluster=render.cluster_string(["10.0.0.1"]), secret_parameter="/p"
    )
    with pytest.raises(render.RenderError, match=complaint):
        render.render_node(dataclasses.replace(base, **{field: value}))


def test_renderer_refuses_template_syntax_terraform_would_treat_differently(
    render: ModuleType,
) -> None:
    assert render.render_template("a=${a} b=$${b} c=%%{c}", {"a": "1"}) == "a=1 b=${b} c=%{c}"
    for template in ("${upper(a)}", "%{ if a }x%{ endif }", "${missing}"):
        with pytest.raises(render.RenderError):
            render.render_template(template, {"a": "1"})


# -- a real cluster from the rendered bootstrap ------------------------------------------------


@pytest.fixture
def rendered_cluster(tmp_path: Path, render: ModuleType) -> Iterator[Cluster]:
    """Three loopback nodes, each started by running its rendered bootstrap.sh; every process is
    stopped by PID afterwards, pass or fail."""
    cluster = Cluster(tmp_path / "nodes", size=3, secret="unused: the secret comes from node.env")
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    bootstraps = write_local_bootstraps(render, cluster, tmp_path, secret_file)
    try:
        for node_id, bootstrap in bootstraps.items():
            start_bootstrap(cluster, node_id, bootstrap)
        yield cluster
    finally:
        cluster.close()


def test_rendered_bootstrap_starts_a_cluster_that_elects_a_leader(
    rendered_cluster: Cluster, tmp_path: Path
) -> None:
    rendered_cluster.wait_for_leader()
    wait_until(lambda: len(rendered_cluster.statuses()) == 3, 30, "all three nodes to answer")

    client = rendered_cluster.client()
    client.create_queue("deploy-check")
    client.publish_queue("deploy-check", b"rendered")
    message = client.consume_queue("deploy-check", timeout_s=10)
    assert message is not None and message.body == b"rendered"
    client.ack(message)
    rendered_cluster.wait_converged()

    secret = (tmp_path / "cluster-secret").read_text().splitlines()[0]
    for node_id, node in rendered_cluster.nodes.items():
        # The bootstrap exec'd the node: the PID the harness holds is the node process itself.
        assert node.process is not None
        command_line = Path(f"/proc/{node.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"chasqui_node.cli" in command_line and b"--config" in command_line, command_line
        node_env = tmp_path / "etc" / node_id / "node.env"
        assert stat.S_IMODE(os.stat(node_env).st_mode) == 0o600
        assert node_env.read_text() == f"CHASQUI_CLUSTER_SECRET={secret}\n"
    for node_id, log in rendered_cluster.logs().items():
        assert "no --cluster-secret given" not in log, f"{node_id} did not get the secret"
        assert secret not in log, f"{node_id} logged the cluster secret"
    rendered_cluster.assert_logs_clean()
