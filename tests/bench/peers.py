"""`make bench-peers`: Chasqui, NATS JetStream and RabbitMQ through the same harness in one run,
then one table of figures and Chasqui/peer ratios.

    python -m tests.bench.peers [--rounds 1] [--peers-dir ../shared/bench/peers] [--no-peers]

1. Starts a 3-node Chasqui cluster on free loopback ports (tests/harness.py, `--fsync always`),
   runs the harness's bench.py with tests/bench/peer_adapter.py, stops the cluster.
2. Runs the harness's install.sh and run_all.sh (Debian packages for nats-server and
   rabbitmq-server, each on a fresh 3-node cluster, stopped by PID afterwards).
3. Prints the median of each figure over the rounds, per broker, and the ratios.
Results (JSON and logs) go to var/bench-peers/<time>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness import Cluster

ROOT = Path(__file__).resolve().parents[2]

# (label, workload, path into its result, higher is better)
FIGURES: list[tuple[str, str, tuple[str, ...], bool]] = [
    ("W1 sync publish, msg/s", "W1_publish_sync", ("msgs_per_s",), True),
    ("W1 confirm p50, ms", "W1_publish_sync", ("confirm_latency", "p50_ms"), False),
    ("W1 confirm p99, ms", "W1_publish_sync", ("confirm_latency", "p99_ms"), False),
    ("W2 pipelined publish, msg/s", "W2_publish_pipelined", ("msgs_per_s",), True),
    ("W3 consume + ack, msg/s", "W3_consume_ack", ("msgs_per_s",), True),
    ("W4 end-to-end p50, ms", "W4_e2e", ("latency", "p50_ms"), False),
    ("W4 end-to-end p99, ms", "W4_e2e", ("latency", "p99_ms"), False),
    ("W2 server CPU per message, us", "W2_publish_pipelined", ("cpu_us_per_msg",), False),
    ("W3 server CPU per message, us", "W3_consume_ack", ("cpu_us_per_msg",), False),
]


def run_chasqui(peers_dir: Path, results: Path, rounds: int) -> Path | None:
    out = results / "chasqui.json"
    with tempfile.TemporaryDirectory(prefix="chasqui-bench-") as data:
        cluster = Cluster(Path(data))
        try:
            cluster.start()
            cluster.wait_for_leader(timeout_s=60)
            pids = ",".join(
                str(node.process.pid) for node in cluster.nodes.values() if node.process
            )
            env = {
                **os.environ,
                "CHASQUI_ENDPOINTS": ",".join(cluster.endpoints),
                "PYTHONPATH": f"{ROOT}{os.pathsep}{peers_dir}",
            }
            command = [
                sys.executable,
                str(peers_dir / "bench.py"),
                str(ROOT / "tests/bench/peer_adapter.py") + ":ChasquiAdapter",
                "--rounds", str(rounds),
                "--out", str(out),
                "--server-pids", pids,
            ]  # fmt: skip
            print(f"== chasqui: {' '.join(command)}", flush=True)
            with open(results / "chasqui.log", "w") as log:
                subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
        finally:
            cluster.close()
    return out if out.exists() else None


def run_peers(peers_dir: Path, results: Path, rounds: int) -> list[Path]:
    subprocess.run([str(peers_dir / "install.sh")], check=True, timeout=1800)
    env = {**os.environ, "PEERBENCH_RESULTS": str(results), "ROUNDS": str(rounds)}
    subprocess.run([str(peers_dir / "run_all.sh")], env=env, timeout=3600)
    return sorted(results.glob("nats-*.json")) + sorted(results.glob("rabbitmq-*.json"))


def figure(result: dict[str, Any], workload: str, path: tuple[str, ...]) -> float | None:
    values = []
    for round_result in result.get("rounds", []):
        value: Any = round_result.get(workload)
        if path == ("cpu_us_per_msg",) and isinstance(value, dict):
            # The three servers' CPU (% of one core) over the measured interval, per message.
            cpu, rate = value.get("server_cpu_pct_total"), value.get("msgs_per_s")
            value = {"cpu_us_per_msg": cpu / 100 * 1e6 / rate} if cpu and rate else None
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(float(value))
    return statistics.median(values) if values else None


def table(files: list[Path]) -> str:
    brokers = {}
    for path in files:
        result = json.loads(path.read_text())
        brokers[str(result.get("broker", path.stem))] = result
    names = list(brokers)
    chasqui = "chasqui" if "chasqui" in brokers else None
    peers = [name for name in names if name != chasqui]
    header = ["figure (median of rounds)", *names] + [f"chasqui/{peer}" for peer in peers]
    rows = [header, ["---"] * len(header)]
    for label, workload, path, higher_better in FIGURES:
        values = {name: figure(brokers[name], workload, path) for name in names}
        row = [label] + [
            f"{values[name]:,.2f}" if values[name] is not None else "-" for name in names
        ]
        for peer in peers:
            mine, theirs = values.get(chasqui or ""), values[peer]
            if mine and theirs:
                # Ratios read "how many times as good": above 1 means Chasqui is ahead.
                ratio = mine / theirs if higher_better else theirs / mine
                row.append(f"{ratio:.2f}x")
            else:
                row.append("-")
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers-dir", type=Path, default=ROOT.parent / "shared/bench/peers")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true", help="only Chasqui")
    arguments = parser.parse_args()
    peers_dir = arguments.peers_dir.resolve()
    if not (peers_dir / "bench.py").exists():
        raise SystemExit(f"no peer harness at {peers_dir} (pass --peers-dir)")
    results = ROOT / "var/bench-peers" / time.strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True)
    files = []
    chasqui = run_chasqui(peers_dir, results, arguments.rounds)
    if chasqui is not None:
        files.append(chasqui)
    if not arguments.no_peers:
        files.extend(run_peers(peers_dir, results, arguments.rounds))
    text = table(files)
    (results / "table.md").write_text(text + "\n")
    print(f"\n{text}\n\nresults in {results}")


if __name__ == "__main__":
    main()
