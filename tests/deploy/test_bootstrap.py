"""The rendered bootstrap, run for real: deploy/render.py renders each node's node.toml and
bootstrap.sh from the templates Terraform uses, and three of those bootstraps, run locally with
the install, data-volume and systemd steps switched off, write node.env (mode 0600: the cluster
secret and the admin key, from files) and the client port's TLS files (key mode 0600), and
become a three-node loopback cluster as production runs it: signup closed, so an anonymous
CreateUser is refused and the admin key creates users; TLS on the client port, so a client that
trusts the CA connects and a plaintext one is refused.

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

import grpc
import pytest

from chasqui_client import Client
from chasqui_client.errors import Unauthenticated
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.deploy.conftest import (
    DEPLOY_DIR,
    TlsCluster,
    bearer,
    start_bootstrap,
    wait_for_admin,
    write_local_bootstraps,
    write_node_credentials,
)
from tests.harness import wait_until

RENDER_TIMEOUT_S = 30


def ec2_settings(render: ModuleType) -> Any:
    return render.NodeBootstrap(
        node_id="n3",
        cluster=render.cluster_string(["10.40.0.10", "10.40.1.10", "10.40.2.10"]),
        data_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
        install_source="chasqui==0.1.0",
        secret_parameter="/chasqui/cluster-secret",
        secret_region="eu-west-1",
        admin_key_parameter="/chasqui/admin-key",
        tls_ca_parameter="/chasqui/tls/ca-cert",
        tls_cert_parameter="/chasqui/tls/n3/cert",
        tls_key_parameter="/chasqui/tls/n3/key",
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
        "signup": "closed",
        "tls_cert": "/etc/chasqui/tls/node.crt",
        "tls_key": "/etc/chasqui/tls/node.key",
    }
    for secret_name in ("CHASQUI_CLUSTER_SECRET", "CHASQUI_ADMIN_KEY", "admin_key"):
        assert secret_name not in rendered["node.toml"]


def test_node_toml_without_tls_comments_the_tls_lines_out(render: ModuleType) -> None:
    plaintext = dataclasses.replace(
        ec2_settings(render), tls_ca_parameter="", tls_cert_parameter="", tls_key_parameter=""
    )
    rendered = render.render_node(plaintext)
    config = tomllib.loads(rendered["node.toml"])
    assert "tls_cert" not in config and "tls_key" not in config
    assert config["signup"] == "closed"
    assert '# tls_cert = "/etc/chasqui/tls/node.crt"' in rendered["node.toml"]
    assert "TLS_KEY_PARAMETER=''" in rendered["bootstrap.sh"]
    opened = render.render_node(dataclasses.replace(plaintext, signup="open"))
    assert tomllib.loads(opened["node.toml"])["signup"] == "open"


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
        "ADMIN_KEY_PARAMETER='/chasqui/admin-key'",
        "TLS_KEY_PARAMETER='/chasqui/tls/n3/key'",
        "SERVICE_MODE='systemd'",
        'chown chasqui:chasqui "$tls_dir/node.key.new"',
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
        "--admin-key-parameter", "/chasqui/admin-key",
        "--tls-ca-parameter", "/chasqui/tls/ca-cert",
        "--tls-cert-parameter", "/chasqui/tls/n1/cert",
        "--tls-key-parameter", "/chasqui/tls/n1/key",
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
    config = tomllib.loads((tmp_path / "n1" / "node.toml").read_text())
    assert config["node_id"] == "n1" and config["signup"] == "closed" and "tls_key" in config
    bootstrap = (tmp_path / "n1" / "bootstrap.sh").read_text()
    assert "TLS_KEY_PARAMETER='/chasqui/tls/n1/key'" in bootstrap

    # Closed signup (the default) without an admin key would leave nobody able to add users.
    command.remove("--admin-key-parameter")
    command.remove("/chasqui/admin-key")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    assert refused.returncode != 0 and "admin key" in refused.stderr


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("node_id", "n9", "not a member"),
        ("node_id", "n 1", "letters, digits"),
        ("data_dir", "/var/lib/it's", "quote"),
        ("cluster", 'n1=a:1/a:2"', "quote"),
        ("service_mode", "docker", "service mode"),
        ("secret_parameter", "", "secret"),
        ("signup", "invite", "signup"),
        ("admin_key_parameter", "", "admin key"),
        ("admin_key_parameter", "/p'", "quote"),
        ("tls_key_parameter", "", "all three TLS parameters"),
        ("tls_ca_file", "/ca.crt", "all three TLS files"),
    ],
)
def test_renderer_refuses_values_it_cannot_embed(
    render: ModuleType, field: str, value: str, complaint: str
) -> None:
    base = render.NodeBootstrap(
        node_id="n1",
        cluster=render.cluster_string(["10.0.0.1"]),
        secret_parameter="/p",
        admin_key_parameter="/a",
        tls_ca_parameter="/t/ca",
        tls_cert_parameter="/t/cert",
        tls_key_parameter="/t/key",
    )
    render.render_node(base)
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
def rendered_cluster(tmp_path: Path, render: ModuleType) -> Iterator[TlsCluster]:
    """Three loopback nodes, each started by running its rendered bootstrap.sh with closed
    signup, an admin key and TLS on its client port; every process is stopped by PID
    afterwards, pass or fail."""
    cluster = TlsCluster(tmp_path / "nodes", size=3, secret="unused: in node.env", ca_pem=b"")
    admin_key_file, cluster.ca_pem = write_node_credentials(cluster, tmp_path)
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    bootstraps = write_local_bootstraps(
        render, cluster, tmp_path, secret_file, admin_key_file=admin_key_file, tls=True
    )
    try:
        for node_id, bootstrap in bootstraps.items():
            start_bootstrap(cluster, node_id, bootstrap)
        yield cluster
    finally:
        cluster.close()


def test_rendered_bootstrap_starts_a_closed_tls_cluster_that_serves_the_admin(
    rendered_cluster: TlsCluster, tmp_path: Path
) -> None:
    cluster = rendered_cluster
    cluster.wait_for_leader()
    wait_until(lambda: len(cluster.statuses()) == 3, 30, "all three nodes to answer over TLS")
    admin_key = (tmp_path / "admin.key").read_text().splitlines()[0]

    # Signup is closed: a client without a key cannot make itself a user.
    stub = wait_for_admin(cluster, admin_key)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateUser(pb.CreateUserRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Unauthenticated):
        Client(cluster.endpoints, credentials=cluster.credentials(), call_timeout_s=5)

    # The admin key creates a user, whose client (trusting the CA) works through TLS.
    user_key = stub.CreateUser(pb.CreateUserRequest(), metadata=bearer(admin_key), timeout=5).key
    client = cluster.client(user_key)
    client.create_queue("deploy-check")
    client.publish_queue("deploy-check", b"rendered")
    message = client.consume_queue("deploy-check", timeout_s=10)
    assert message is not None and message.body == b"rendered"
    client.ack(message)
    cluster.wait_converged()

    # A plaintext client gets no answer from any node, and neither does one without the CA.
    for node in cluster.nodes.values():
        with grpc.insecure_channel(node.client_address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.BrokerStub(channel).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(
        cluster.nodes["n1"].client_address, grpc.ssl_channel_credentials()
    ) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.BrokerStub(channel).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

    secret = (tmp_path / "cluster-secret").read_text().splitlines()[0]
    for node_id, node in cluster.nodes.items():
        # The bootstrap exec'd the node: the PID the harness holds is the node process itself.
        assert node.process is not None
        command_line = Path(f"/proc/{node.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"chasqui_node.cli" in command_line and b"--config" in command_line, command_line
        config_dir = tmp_path / "etc" / node_id
        node_env = config_dir / "node.env"
        assert stat.S_IMODE(os.stat(node_env).st_mode) == 0o600
        assert node_env.read_text() == (
            f"CHASQUI_CLUSTER_SECRET={secret}\nCHASQUI_ADMIN_KEY={admin_key}\n"
        )
        config = tomllib.loads((config_dir / "node.toml").read_text())
        assert config["signup"] == "closed"
        assert config["tls_key"] == str(config_dir / "tls" / "node.key")
        assert stat.S_IMODE(os.stat(config_dir / "tls" / "node.key").st_mode) == 0o600
        assert (config_dir / "tls" / "node.key").read_bytes() == (
            tmp_path / "tls" / node_id / "node.key"
        ).read_bytes()
        assert (config_dir / "tls" / "ca.crt").read_bytes() == cluster.ca_pem
    for node_id, log in cluster.logs().items():
        assert "no --cluster-secret given" not in log, f"{node_id} did not get the secret"
        assert secret not in log, f"{node_id} logged the cluster secret"
        assert admin_key not in log and user_key not in log, f"{node_id} logged a key"
    cluster.assert_logs_clean()
