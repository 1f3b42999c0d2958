"""Shared pieces of the deploy tests: the renderer in deploy/render.py, loaded from its path
(deploy/ is not a package), and a way to run a rendered bootstrap as a node of a harness
`Cluster`, so that the harness's PID bookkeeping, status polling and clean-up apply unchanged."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT, Cluster

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


def write_local_bootstraps(
    render: ModuleType, cluster: Cluster, root: Path, secret_file: Path
) -> dict[str, Path]:
    """Render every node's bootstrap for a local run; returns node id -> bootstrap.sh."""
    bootstraps: dict[str, Path] = {}
    for node_id, node in cluster.nodes.items():
        config_dir = root / "etc" / node_id
        settings = render.local_settings(
            node_id,
            cluster.cluster_arg,
            config_dir=config_dir,
            data_dir=node.data_dir,
            secret_file=secret_file,
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
