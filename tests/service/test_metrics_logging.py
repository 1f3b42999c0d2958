"""The node's log formats: one line per event, JSON with fixed fields, secrets masked.

Records are built with the standard `logging` machinery and passed through the formatters the
node installs (`--log-format text|json`); the tests read back exactly the text a log file would
hold. The end-to-end check that a real node with a cluster secret and an admin key never writes
either lives in tests/cluster/test_operations.py.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from chasqui_node.logs import REDACTED, JsonLogFormatter, TextLogFormatter

SECRET = "cluster-secret-7b1f0c9d"


def _record(message: str, *args: object, with_traceback: bool = False) -> logging.LogRecord:
    exc_info = None
    if with_traceback:
        try:
            raise ValueError("disk said no\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "chasqui_node.server", logging.WARNING, __file__, 1, message, args, exc_info
    )


def test_json_lines_carry_ts_level_logger_message_and_node_id() -> None:
    line = JsonLogFormatter("n2", ()).format(_record("node %s stopped", "n2"))
    event = json.loads(line)
    assert set(event) == {"ts", "level", "logger", "message", "node_id"}
    assert event["level"] == "WARNING"
    assert event["logger"] == "chasqui_node.server"
    assert event["message"] == "node n2 stopped"
    assert event["node_id"] == "n2"
    assert event["ts"].endswith("+00:00") and "T" in event["ts"]


@pytest.mark.parametrize("formatter", [JsonLogFormatter("n1", ()), TextLogFormatter("n1", ())])
def test_an_event_with_a_traceback_is_still_one_line(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("apply failed", with_traceback=True))
    assert "\n" not in line
    assert "Traceback" in line and "disk said no" in line


def test_text_lines_name_the_node() -> None:
    line = TextLogFormatter("n3", ()).format(_record("hello"))
    assert " WARNING chasqui_node.server [n3]: hello" in line


@pytest.mark.parametrize("formatter_class", [JsonLogFormatter, TextLogFormatter])
def test_the_cluster_secret_and_bearer_tokens_are_masked(
    formatter_class: type[JsonLogFormatter] | type[TextLogFormatter],
) -> None:
    formatter = formatter_class("n1", (SECRET,))
    line = formatter.format(
        _record("peer sent %s with authorization: Bearer abcDEF123_-xyz", SECRET)
    )
    assert SECRET not in line
    assert "abcDEF123_-xyz" not in line
    assert line.count(REDACTED) == 2
