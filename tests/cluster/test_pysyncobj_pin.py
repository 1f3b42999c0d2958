"""`chasqui-node start` refuses to run on another pysyncobj than the one its Raft layer was
written against.

The real process is started with a directory ahead of the venv on PYTHONPATH that holds only a
`pysyncobj-0.3.16.dist-info/METADATA`: `importlib.metadata` takes the first distribution of a
name along `sys.path`, so the node sees version 0.3.16 while importing the installed code. It
must exit with `EXIT_PYSYNCOBJ_MISMATCH` and one line naming both versions, before it opens its
data directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chasqui_node.cli import EXIT_PYSYNCOBJ_MISMATCH
from tests.harness import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def shadowing_pysyncobj(directory: Path, version: str) -> Path:
    """A directory that makes `importlib.metadata` report pysyncobj `version` when first on
    the path (the modules themselves still come from the venv)."""
    dist_info = directory / f"pysyncobj-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: pysyncobj\nVersion: {version}\n"
    )
    return directory


def run(arguments: list[str], python_path: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={
            "PYTHONPATH": ":".join(str(path) for path in python_path),
            "PATH": "/usr/bin:/bin",
            "CHASQUI_CLUSTER_SECRET": "a cluster secret for this test",
        },
    )


def test_start_refuses_another_pysyncobj_in_one_line(tmp_path: Path) -> None:
    shadow = shadowing_pysyncobj(tmp_path / "shadow", "0.3.16")
    python_path = [shadow, REPO_ROOT]
    seen = run(["-c", "import importlib.metadata as m; print(m.version('pysyncobj'))"], python_path)
    assert seen.stdout.strip() == "0.3.16", "the shadow must be what the node sees"

    data_dir = tmp_path / "data"
    result = run(
        [
            "-m",
            "chasqui_node.cli",
            "start",
            "--node-id",
            "n1",
            "--data-dir",
            str(data_dir),
            "--cluster",
            "n1=127.0.0.1:17101/127.0.0.1:17201",
        ],
        python_path,
    )
    print(result.stderr)
    assert result.returncode == EXIT_PYSYNCOBJ_MISMATCH
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(
        "refusing to start: pysyncobj 0.3.16 is installed; this node's Raft layer is written "
        "against pysyncobj 0.3.17"
    )
    assert "Traceback" not in result.stderr
    assert not data_dir.exists(), "nothing is opened before the check"
