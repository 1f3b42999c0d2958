"""The node's log lines: one event per line on stderr, as text or JSON, secrets masked.

No log line carries the cluster secret or a key: the node never logs them, and the formatters
also mask the cluster secret and any `Bearer` token should a library ever echo one.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

_BEARER_TOKEN = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


class TextLogFormatter(logging.Formatter):
    """One event, one line: `ts LEVEL logger [node_id]: message`, a traceback folded onto the
    same line with literal `\\n`, and secrets masked (see `_scrub`)."""

    def __init__(self, node_id: str, secrets_to_mask: tuple[str, ...]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(node_id)s]: %(message)s")
        self._node_id = node_id
        self._secrets = secrets_to_mask

    def format(self, record: logging.LogRecord) -> str:
        record.node_id = self._node_id
        return _scrub(super().format(record), self._secrets).replace("\n", "\\n")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, node_id, and
    `exception` when there is a traceback. Secrets are masked as in text."""

    def __init__(self, node_id: str, secrets_to_mask: tuple[str, ...]) -> None:
        super().__init__()
        self._node_id = node_id
        self._secrets = secrets_to_mask

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, str] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage(), self._secrets),
            "node_id": self._node_id,
        }
        if record.exc_info:
            event["exception"] = _scrub(self.formatException(record.exc_info), self._secrets)
        return json.dumps(event, ensure_ascii=False)


def _scrub(text: str, secrets_to_mask: tuple[str, ...]) -> str:
    """Defence in depth: Chasqui never logs a secret, but a library might echo one."""
    for secret in secrets_to_mask:
        text = text.replace(secret, REDACTED)
    return _BEARER_TOKEN.sub(lambda match: match.group(1) + REDACTED, text)


def configure_logging(
    level: str,
    log_format: str = "text",
    node_id: str = "-",
    secrets_to_mask: tuple[str, ...] = (),
) -> None:
    """Route every log record to stderr, one line per event, in `log_format` (text or json).
    `secrets_to_mask` are replaced by [redacted] wherever they would appear."""
    masked = tuple(secret for secret in secrets_to_mask if secret)
    formatter: logging.Formatter = (
        JsonLogFormatter(node_id, masked)
        if log_format == "json"
        else TextLogFormatter(node_id, masked)
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # pysyncobj logs every reconnect attempt at WARNING while peers start up.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
