"""`chasqui`, the user's command line, against a real 3-node cluster: a user is created and its key
works, queues and topics are created, published to (from arguments and from stdin) and consumed,
lists print aligned tables, `status` shows one leader, and every failure (bad name, missing
queue, missing or unknown key, unreachable cluster) prints `error: ...` and exits 1 without a
traceback.

Each test runs the CLI as a subprocess (`python -m chasqui_client.cli`) with a bounded timeout and
a clean environment, exactly as a user's shell would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module: these tests use distinct names, so they do not interfere."""
    running = Cluster(tmp_path_factory.mktemp("user-cli"))
    try:
        running.start()
        yield running
    finally:
        running.close()


def cli_environment(cluster: Cluster | None, key: str | None = None) -> dict[str, str]:
    environment = {"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if cluster is not None:
        environment["CHASQUI_ENDPOINTS"] = ",".join(cluster.endpoints)
    if key is not None:
        environment["CHASQUI_KEY"] = key
    return environment


def run_cli(
    cluster: Cluster | None,
    *arguments: str,
    key: str | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "chasqui_client.cli", *arguments],
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        cwd=REPO_ROOT,
        env=cli_environment(cluster, key),
    )
    completed = subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8"),
        result.stderr.decode("utf-8"),
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result.stdout


@pytest.fixture
def key(shared_cluster: Cluster) -> str:
    """A fresh user's key, obtained through `chasqui user create --quiet`."""
    return ok(run_cli(shared_cluster, "user", "create", "--quiet")).strip()


def table(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()]


# ---- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["user", "whoami", "topic", "queue", "publish", "consume", "status", "--endpoints"]),
        (
            ("queue", "create"),
            ["--visibility-timeout-s", "--max-deliveries", "--dead-letter-queue"],
        ),
        (("queue", "create"), ["--max-length", "--overflow", "--ttl-s", "--exist-ok"]),
        (("topic", "subscribe"), ["--from", "earliest", "latest"]),
        (("consume",), ["--count", "--follow", "--ack", "--no-ack", "--wait-s"]),
        (("publish",), ["--verbose"]),
    ],
)
def test_every_command_has_help(command: tuple[str, ...], expected: list[str]) -> None:
    output = ok(run_cli(None, *command, "--help"))
    for word in expected:
        assert word in output


# ---- users -----------------------------------------------------------------------------------


def test_user_create_prints_an_exportable_key_that_whoami_accepts(shared_cluster: Cluster) -> None:
    output = ok(run_cli(shared_cluster, "user", "create"))
    match = re.search(r"^export CHASQUI_KEY=(\S+)$", output, re.MULTILINE)
    assert match, output
    user_id = re.search(r"user (\S+) created", output)
    assert user_id, output
    assert ok(run_cli(shared_cluster, "whoami", key=match.group(1))).strip() == user_id.group(1)


def test_commands_without_a_key_print_the_hint(shared_cluster: Cluster) -> None:
    for arguments in (("whoami",), ("queue", "list"), ("publish", "queue", "jobs", "x")):
        result = run_cli(shared_cluster, *arguments)
        assert result.returncode == 1
        assert "no key: run `chasqui user create` and export CHASQUI_KEY" in result.stderr


def test_an_unknown_key_is_refused_with_a_hint(shared_cluster: Cluster) -> None:
    result = run_cli(shared_cluster, "whoami", key="not-a-real-key")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "chasqui user create" in result.stderr


# ---- queues ----------------------------------------------------------------------------------


def test_publish_from_arguments_and_stdin_then_consume_with_count(
    shared_cluster: Cluster, key: str
) -> None:
    assert ok(run_cli(shared_cluster, "queue", "create", "cli.jobs", key=key)) == (
        "created queue cli.jobs\n"
    )
    output = ok(
        run_cli(shared_cluster, "publish", "queue", "cli.jobs", "one", "two words", key=key)
    )
    assert output == "published 2 messages to queue cli.jobs\n"
    stdin = b"three\n\nfour\r\nfive"  # blank lines are skipped; a last line needs no newline
    output = ok(run_cli(shared_cluster, "publish", "queue", "cli.jobs", key=key, stdin=stdin))
    assert output == "published 3 messages to queue cli.jobs\n"

    first = ok(run_cli(shared_cluster, "consume", "queue", "cli.jobs", "--count", "2", key=key))
    assert first.splitlines() == ["one", "two words"]
    rest = ok(run_cli(shared_cluster, "consume", "queue", "cli.jobs", "--wait-s", "0.5", key=key))
    assert rest.splitlines() == ["three", "four", "five"]
    # Everything was acked: nothing is left, and an empty consume is not an error.
    empty = run_cli(shared_cluster, "consume", "queue", "cli.jobs", "--wait-s", "0", key=key)
    assert ok(empty) == ""


def test_publish_verbose_prints_one_receipt_per_message(shared_cluster: Cluster, key: str) -> None:
    ok(run_cli(shared_cluster, "queue", "create", "cli.receipts", key=key))
    stdin = b"".join(f"m{number}\n".encode() for number in range(5))
    output = ok(
        run_cli(shared_cluster, "publish", "queue", "cli.receipts", "-v", key=key, stdin=stdin)
    )
    lines = output.splitlines()
    assert len(lines) == 5
    assert all(line.startswith("queue cli.receipts sequence ") for line in lines)
    assert len(set(lines)) == 5


def test_consume_without_ack_leaves_the_message_for_redelivery(
    shared_cluster: Cluster, key: str
) -> None:
    ok(
        run_cli(
            shared_cluster, "queue", "create", "cli.noack", "--visibility-timeout-s", "1", key=key
        )
    )
    ok(run_cli(shared_cluster, "publish", "queue", "cli.noack", "again", key=key))
    first = run_cli(shared_cluster, "consume", "queue", "cli.noack", "-n", "1", "--no-ack", key=key)
    assert ok(first) == "again\n"
    # The lease runs out after 1 s; the long-poll then hands the message out again.
    second = run_cli(shared_cluster, "consume", "queue", "cli.noack", "-n", "1", key=key)
    assert ok(second) == "again\n"


def test_non_utf8_bodies_are_printed_as_bytes_literals(shared_cluster: Cluster, key: str) -> None:
    ok(run_cli(shared_cluster, "queue", "create", "cli.binary", key=key))
    ok(run_cli(shared_cluster, "publish", "queue", "cli.binary", key=key, stdin=b"\xff\xfe\n"))
    output = ok(run_cli(shared_cluster, "consume", "queue", "cli.binary", "-n", "1", key=key))
    assert output == "b'\\xff\\xfe'\n"


def test_queue_create_options_reach_the_broker(shared_cluster: Cluster, key: str) -> None:
    arguments = ["queue", "create", "cli.bounded", "--max-length", "1", "--max-deliveries", "3"]
    ok(run_cli(shared_cluster, *arguments, "--ttl-s", "60", key=key))
    assert "exists already" in ok(run_cli(shared_cluster, *arguments, "--exist-ok", key=key))
    ok(run_cli(shared_cluster, "publish", "queue", "cli.bounded", "fits", key=key))
    full = run_cli(shared_cluster, "publish", "queue", "cli.bounded", "overflows", key=key)
    assert full.returncode == 1
    assert full.stderr.startswith("error: ") and "full" in full.stderr


# ---- topics ----------------------------------------------------------------------------------


def test_topic_subscribe_publish_consume(shared_cluster: Cluster, key: str) -> None:
    ok(run_cli(shared_cluster, "topic", "create", "cli.news", key=key))
    ok(run_cli(shared_cluster, "publish", "topic", "cli.news", "before", key=key))
    subscribed = ok(run_cli(shared_cluster, "topic", "subscribe", "cli.news", key=key))
    assert subscribed == "subscribed to topic cli.news from offset 1\n"
    ok(run_cli(shared_cluster, "publish", "topic", "cli.news", "after", key=key))
    output = ok(
        run_cli(shared_cluster, "consume", "topic", "cli.news", "-n", "5", "--wait-s", "1", key=key)
    )
    assert output.splitlines() == ["after"]

    # A second user starting from the earliest offset sees both messages.
    reader = ok(run_cli(shared_cluster, "user", "create", "-q")).strip()
    ok(run_cli(shared_cluster, "topic", "subscribe", "cli.news", "--from", "earliest", key=reader))
    output = ok(run_cli(shared_cluster, "consume", "topic", "cli.news", "-n", "2", key=reader))
    assert output.splitlines() == ["before", "after"]


def test_consume_follow_prints_messages_as_they_come_until_ctrl_c(
    shared_cluster: Cluster, key: str
) -> None:
    ok(run_cli(shared_cluster, "queue", "create", "cli.follow", key=key))
    follower = subprocess.Popen(
        [sys.executable, "-m", "chasqui_client.cli", "consume", "queue", "cli.follow", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=cli_environment(shared_cluster, key),
        # A test runner may ignore SIGINT; the user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        ok(run_cli(shared_cluster, "publish", "queue", "cli.follow", "first", key=key))
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"first\n"
        ok(run_cli(shared_cluster, "publish", "queue", "cli.follow", "second", key=key))
        assert follower.stdout.readline() == b"second\n"
        time.sleep(0.2)  # let it return to its long-poll
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=CLI_TIMEOUT_S)
        assert follower.returncode == 0, stderr
        assert b"Traceback" not in stderr
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=CLI_TIMEOUT_S)


# ---- lists -----------------------------------------------------------------------------------


def test_lists_print_aligned_tables(shared_cluster: Cluster, key: str) -> None:
    other = ok(run_cli(shared_cluster, "user", "create", "-q")).strip()
    ok(run_cli(shared_cluster, "queue", "create", "cli.list.mine", key=key))
    ok(run_cli(shared_cluster, "queue", "create", "cli.list.a-much-longer-name", key=other))
    ok(run_cli(shared_cluster, "publish", "queue", "cli.list.mine", "a", "b", key=key))
    ok(run_cli(shared_cluster, "queue", "subscribe", "cli.list.mine", key=key))
    user_id = ok(run_cli(shared_cluster, "whoami", key=key)).strip()

    output = ok(run_cli(shared_cluster, "queue", "list", key=key))
    lines = output.splitlines()
    assert lines[0].split() == ["name", "owner", "subscribed", "depth", "in_flight"]
    # Aligned: every column starts at the same position on every line.
    owner_column = lines[0].index("owner")
    assert all(line[owner_column - 2 : owner_column] == "  " for line in lines)
    rows = {row[0]: row for row in table(output)[1:]}
    assert rows["cli.list.mine"] == ["cli.list.mine", user_id, "yes", "2", "0"]
    assert rows["cli.list.a-much-longer-name"][2] == "no"

    mine = table(ok(run_cli(shared_cluster, "queue", "list", "--mine", key=key)))
    assert {row[0] for row in mine[1:]} == {"cli.list.mine"}

    ok(run_cli(shared_cluster, "topic", "create", "cli.list.topic", key=key))
    ok(run_cli(shared_cluster, "publish", "topic", "cli.list.topic", "x", "y", "z", key=key))
    topics = table(ok(run_cli(shared_cluster, "topic", "list", "--mine", key=key)))
    assert topics[0] == ["name", "owner", "subscribed", "first_offset", "next_offset"]
    assert ["cli.list.topic", user_id, "no", "0", "3"] in topics[1:]

    fresh = ok(run_cli(shared_cluster, "user", "create", "-q")).strip()
    assert ok(run_cli(shared_cluster, "topic", "list", "--mine", key=fresh)) == "no topics\n"


def test_delete_removes_the_queue_and_topic(shared_cluster: Cluster, key: str) -> None:
    ok(run_cli(shared_cluster, "queue", "create", "cli.gone", key=key))
    ok(run_cli(shared_cluster, "topic", "create", "cli.gone", key=key))
    assert ok(run_cli(shared_cluster, "queue", "delete", "cli.gone", key=key)) == (
        "deleted queue cli.gone\n"
    )
    assert ok(run_cli(shared_cluster, "topic", "delete", "cli.gone", key=key)) == (
        "deleted topic cli.gone\n"
    )
    assert "cli.gone" not in ok(run_cli(shared_cluster, "queue", "list", "--mine", key=key))


# ---- errors ----------------------------------------------------------------------------------


def test_bad_name_exits_1_with_the_brokers_message(shared_cluster: Cluster, key: str) -> None:
    result = run_cli(shared_cluster, "queue", "create", "bad name!", key=key)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: queue name 'bad name!' is invalid: character ' ' is not one of [A-Za-z0-9._-]\n"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("consume", "queue", "cli.missing"), 'queue "cli.missing" does not exist'),
        (("publish", "topic", "cli.missing", "x"), 'topic "cli.missing" does not exist'),
        (("queue", "delete", "cli.missing"), 'queue "cli.missing" does not exist'),
    ],
)
def test_server_errors_exit_1_with_the_servers_message(
    shared_cluster: Cluster, key: str, arguments: tuple[str, ...], message: str
) -> None:
    result = run_cli(shared_cluster, *arguments, key=key)
    assert result.returncode == 1
    assert result.stderr == f"error: {message}\n"


def test_creating_twice_says_it_exists(shared_cluster: Cluster, key: str) -> None:
    ok(run_cli(shared_cluster, "topic", "create", "cli.twice", key=key))
    result = run_cli(shared_cluster, "topic", "create", "cli.twice", key=key)
    assert result.returncode == 1
    assert result.stderr == 'error: topic "cli.twice" already exists\n'


def test_usage_errors_exit_2() -> None:
    assert run_cli(None, "publish", "mailbox", "jobs", "x", key="k").returncode == 2
    assert run_cli(None, "consume", "queue", "jobs", "--count", "0", key="k").returncode == 2
    assert run_cli(None, "--endpoints", "nonsense", "status").returncode == 2


def test_an_unreachable_cluster_is_an_error_not_a_hang(tmp_path: Path) -> None:
    dead = Cluster(tmp_path)  # addresses reserved, never started
    started = time.monotonic()
    result = run_cli(dead, "--timeout-s", "1", "whoami", key="k")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no endpoint answered within 1 s")
    status = run_cli(dead, "--timeout-s", "1", "status")
    assert status.returncode == 1
    assert "unreachable" in status.stdout
    assert time.monotonic() - started < 30


# ---- cluster ---------------------------------------------------------------------------------


def test_status_shows_every_node_and_one_leader(shared_cluster: Cluster) -> None:
    output = ok(run_cli(shared_cluster, "status"))  # needs no key
    rows = table(output)
    assert rows[0] == ["node", "address", "role", "term", "leader", "commit", "applied", "lag"]
    nodes = rows[1:]
    assert sorted(row[0] for row in nodes) == ["n1", "n2", "n3"]
    assert sorted(row[1] for row in nodes) == sorted(shared_cluster.endpoints)
    leaders = [row for row in nodes if row[2] == "leader"]
    assert len(leaders) == 1
    assert all(row[4] == leaders[0][0] for row in nodes)


def test_status_discovers_members_from_one_endpoint(shared_cluster: Cluster) -> None:
    one = shared_cluster.endpoints[0]
    rows = table(ok(run_cli(shared_cluster, "--endpoints", one, "status")))
    assert sorted(row[1] for row in rows[1:]) == sorted(shared_cluster.endpoints)
