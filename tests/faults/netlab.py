"""Network namespaces for partition tests: one namespace per node, joined by a bridge.

    root namespace: bridge chq<tag> with 10.<x>.<y>.1/24 (the test's clients talk from here)
    namespace chq<tag>-nK: veth with 10.<x>.<y>.(10+K)/24, lo up

A partition is a set of blackhole routes inside the namespaces, so node-to-node traffic between
groups disappears (in both directions) while the test process still reaches every node. Every
namespace, link and route is created by this module and removed in `close()`, also when a test
fails. Creating namespaces needs root (CAP_NET_ADMIN); `available()` says whether it works here.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterable, Sequence


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=check)


def available() -> tuple[bool, str]:
    """Whether this machine lets the test create namespaces, and why not if it does not."""
    name = f"chqprobe{random.randrange(10**6)}"
    try:
        result = _run("ip", "netns", "add", name, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"cannot run `ip netns`: {error}"
    if result.returncode != 0:
        return False, f"cannot create a network namespace: {result.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return True, ""


class NetLab:
    def __init__(self, size: int) -> None:
        self.tag = f"{random.randrange(16**4):04x}"
        second, third = random.randrange(100, 250), random.randrange(1, 250)
        self.subnet = f"10.{second}.{third}"
        self.bridge = f"chq{self.tag}"
        self.namespaces = [f"chq{self.tag}-n{index + 1}" for index in range(size)]
        self.hosts = [f"{self.subnet}.{10 + index + 1}" for index in range(size)]
        self._blackholes: set[tuple[int, int]] = set()
        self._created_bridge = False
        self._created: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for index, (namespace, host) in enumerate(zip(self.namespaces, self.hosts, strict=True)):
            _run("ip", "netns", "add", namespace)
            self._created.append(namespace)
            outside, inside = f"chq{self.tag}h{index}", f"chq{self.tag}p{index}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", outside, "master", self.bridge)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "link", "set", inside, "netns", namespace)
            self.in_namespace(index, "ip", "link", "set", "lo", "up")
            self.in_namespace(index, "ip", "addr", "add", f"{host}/24", "dev", inside)
            self.in_namespace(index, "ip", "link", "set", inside, "up")

    def prefix(self, index: int) -> list[str]:
        """Command prefix that runs a program inside node `index`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[index]]

    def in_namespace(self, index: int, *command: str) -> None:
        _run(*self.prefix(index), *command)

    # -- partitions --------------------------------------------------------------------------

    def _block(self, source: int, target: int) -> None:
        if (source, target) not in self._blackholes:
            self.in_namespace(source, "ip", "route", "add", "blackhole", f"{self.hosts[target]}/32")
            self._blackholes.add((source, target))

    def cut(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Cut node-to-node traffic between each pair, both ways."""
        for first, second in pairs:
            self._block(first, second)
            self._block(second, first)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Only nodes in the same group can talk to each other."""
        group_of = {node: number for number, group in enumerate(groups) for node in group}
        self.cut(
            (first, second)
            for first in group_of
            for second in group_of
            if first < second and group_of[first] != group_of[second]
        )

    def heal(self) -> None:
        for source, target in sorted(self._blackholes):
            self.in_namespace(source, "ip", "route", "del", "blackhole", f"{self.hosts[target]}/32")
        self._blackholes.clear()

    def close(self) -> None:
        for namespace in self._created:
            _run("ip", "netns", "del", namespace, check=False)
        self._created.clear()
        if self._created_bridge:
            _run("ip", "link", "del", self.bridge, check=False)
            self._created_bridge = False
