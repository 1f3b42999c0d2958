"""The door to pysyncobj (chasqui_node/raft/__init__.py): the version check, the check of the
internals it overrides, and `install()`.

They prove that only the pinned pysyncobj passes (the pin in setup.cfg is the same version),
that the refusal names both versions in one line, that `install()` refuses a pysyncobj whose
metadata or internals differ before it changes anything, that a second `install()` changes
nothing (the old-wire test node relies on it), and that no Raft node is built before it.
The whole process is proved by tests/cluster/test_pysyncobj_pin.py.
"""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

import pysyncobj.tcp_connection
import pysyncobj.transport
import pytest

from chasqui_node import raft
from chasqui_node.clock import ClusterClock
from chasqui_node.raft import patches
from chasqui_node.raft.transport import RaftConnection

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_pinned_version_is_the_one_setup_cfg_installs() -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"].split()
    assert f"pysyncobj=={raft.PYSYNCOBJ_VERSION}" in requirements
    assert raft.installed_pysyncobj_version() == raft.PYSYNCOBJ_VERSION


def test_the_pinned_version_passes() -> None:
    raft.check_version(raft.PYSYNCOBJ_VERSION)


@pytest.mark.parametrize("installed", ["0.3.16", "0.3.18", "0.3.17.post1", "0.3.1"])
def test_any_other_version_is_refused_naming_both(installed: str) -> None:
    with pytest.raises(raft.PysyncobjMismatch) as refusal:
        raft.check_version(installed)
    assert str(refusal.value) == (
        f"pysyncobj {installed} is installed; this node's Raft layer is written against "
        "pysyncobj 0.3.17"
    )


def test_a_missing_pysyncobj_is_refused() -> None:
    with pytest.raises(raft.PysyncobjMismatch, match=r"^no pysyncobj is installed; "):
        raft.check_version(None)


def test_install_refuses_the_version_the_metadata_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.3.16")
    with pytest.raises(raft.PysyncobjMismatch, match=r"pysyncobj 0\.3\.16 is installed"):
        raft.install()


def test_install_refuses_a_pysyncobj_without_an_overridden_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(pysyncobj.tcp_connection.TcpConnection, "_TcpConnection__processRead")
    with pytest.raises(raft.PysyncobjMismatch, match="TcpConnection lacks _TcpConnection__"):
        raft.install()


def test_a_second_install_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    raft.install()
    assert patches.applied()
    assert pysyncobj.transport.TcpConnection is RaftConnection
    assert pysyncobj.tcp_connection.zlib is patches.AdaptiveZlib
    plain = pysyncobj.tcp_connection.TcpConnection
    monkeypatch.setattr(pysyncobj.transport, "TcpConnection", plain)  # as old_wire_node does
    raft.install()
    assert pysyncobj.transport.TcpConnection is plain


def test_no_raft_node_is_built_before_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patches, "_applied", False)
    with pytest.raises(RuntimeError, match=r"install\(\) must run before"):
        raft.RaftGroup(
            "n1",
            "127.0.0.1:1",
            [],
            "127.0.0.1:1",
            tmp_path,
            None,  # type: ignore[arg-type]  # never reached
            ClusterClock(0),
            cluster_secret="secret",
            timings=raft.RaftTimings(),
            log_compaction_entries=100,
            fsync=False,
            apply_encoded=lambda _index, _data: None,
            on_snapshot_installed=lambda: None,
            on_fatal=lambda _reason: None,
        )
    assert list(tmp_path.iterdir()) == [], "nothing was opened"
