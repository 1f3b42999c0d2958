"""Shared pieces of the deploy tests: the renderer in deploy/render.py, loaded from its path
(deploy/ is not a package), and a way to run a rendered bootstrap as a node of a harness
`Cluster`, so that the harness's PID bookkeeping, status polling and clean-up apply unchanged;
`TlsCluster` polls and connects over TLS, for nodes whose client port serves it, and
`write_node_credentials` makes what Terraform makes on EC2 (an admin key, a CA and a
certificate per node for its address), here with `chasqui_node.tls`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from chasqui_client import Client
from chasqui_node.tls import issue, make_ca
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import REPO_ROOT, Cluster, wait_until

DEPLOY_DIR = REPO_ROOT / "deploy"
TERRAFORM_DIR = DEPLOY_DIR / "terraform"


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chasqui_deploy_render", DEPLOY_DIR / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render() -> ModuleType:
    return load_renderer()


def node_environment() -> dict[str, str]:
    """The test's environment without any CHASQUI_* setting, which would override node.toml and
    node.env: a node started from a rendered bootstrap must get everything from those files."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("CHASQUI_")
    }
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return environment


class TlsCluster(Cluster):
    """A harness cluster whose client ports serve TLS: status polls and clients trust `ca_pem`."""

    def __init__(self, *arguments: Any, ca_pem: bytes, **options: Any) -> None:
        super().__init__(*arguments, **options)
        self.ca_pem = ca_pem

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)

    def node_status(self, node_id: str, timeout_s: float = 1.0) -> Any:
        address = self.nodes[node_id].client_address
        with grpc.secure_channel(address, self.credentials()) as channel:
            return pb_grpc.BrokerStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=timeout_s
            )

    def client(self, key: str | None = None, **options: Any) -> Client:
        return super().client(key, credentials=self.credentials(), **options)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def wait_for_admin(cluster: TlsCluster, admin_key: str, timeout_s: float = 30) -> Any:
    """Wait until the leader knows the admin key (a new leader registers it through Raft);
    returns a TLS stub to the leader."""

    def admin_ready() -> Any:
        leader = cluster.nodes[cluster.wait_for_leader()]
        channel = grpc.secure_channel(leader.client_address, cluster.credentials())
        stub = pb_grpc.BrokerStub(channel)
        with contextlib.suppress(grpc.RpcError):
            if stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(admin_key), timeout=2).admin:
                return stub
        channel.close()
        return None

    return wait_until(admin_ready, timeout_s, "the admin key to be registered")


def write_node_credentials(cluster: Cluster, root: Path) -> tuple[Path, bytes]:
    """An admin key file, and per node a TLS directory (ca.crt, node.crt for the node's client
    host, node.key) under `root`, as render.py's --tls-dir expects; returns the key file and the
    CA certificate. The CA key is not written: like Terraform's, it signs and stays behind."""
    admin_key_file = root / "admin.key"
    admin_key_file.write_text(secrets.token_urlsafe(32) + "\n")
    ca = make_ca("Chasqui deploy-test CA")
    for node_id, node in cluster.nodes.items():
        host = node.client_address.rpartition(":")[0]
        issued = issue(ca, node_id, (host,))
        tls_dir = root / "tls" / node_id
        tls_dir.mkdir(parents=True)
        (tls_dir / "ca.crt").write_bytes(ca.cert_pem)
        (tls_dir / "node.crt").write_bytes(issued.cert_pem)
        (tls_dir / "node.key").touch(mode=0o600)
        (tls_dir / "node.key").write_bytes(issued.key_pem)
    return admin_key_file, ca.cert_pem


def write_local_bootstraps(
    render: ModuleType,
    cluster: Cluster,
    root: Path,
    secret_file: Path,
    admin_key_file: Path | None = None,
    tls: bool = False,
) -> dict[str, Path]:
    """Render every node's bootstrap for a local run; returns node id -> bootstrap.sh. With an
    admin key, signup is closed (the production default); without one it is open. With `tls`,
    each node's TLS files come from `root`/tls/NODE_ID (see `write_node_credentials`)."""
    bootstraps: dict[str, Path] = {}
    for node_id, node in cluster.nodes.items():
        config_dir = root / "etc" / node_id
        settings = render.local_settings(
            node_id,
            cluster.cluster_arg,
            config_dir=config_dir,
            data_dir=node.data_dir,
            secret_file=secret_file,
            admin_key_file=admin_key_file,
            tls_dir=root / "tls" / node_id if tls else None,
            signup="closed" if admin_key_file else "open",
        )
        bootstraps[node_id] = render.write_node(settings, config_dir)["bootstrap.sh"]
    return bootstraps


def start_bootstrap(
    cluster: Cluster, node_id: str, bootstrap: Path, prefix: Sequence[str] = ()
) -> None:
    """Run a rendered bootstrap (which execs the node) as `node_id`'s process of `cluster`.

    `prefix` wraps the command, e.g. `ip netns exec NAME`; both `ip netns exec` and the script
    exec, so the PID the harness stops is the node's own."""
    node = cluster.nodes[node_id]
    assert not node.alive(), f"{node_id} is already running"
    node.data_dir.mkdir(parents=True, exist_ok=True)
    with open(node.log_path, "ab") as log:
        node.process = subprocess.Popen(
            [*prefix, "bash", str(bootstrap)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=node_environment(),
        )
