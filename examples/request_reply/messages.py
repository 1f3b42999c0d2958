"""The JSON messages the worker and the caller exchange, in one place so both agree.

A request, published to the worker's requests queue (`files.requests` by default):

    {"correlation_id": "5f0c...", "reply_to": "files.replies.5f0c...", "command": "find",
     "name": "report"}

A reply, published to the request's `reply_to` queue:

    {"correlation_id": "5f0c...", "ok": true, "result": ["docs/report.txt"], "truncated": false}
    {"correlation_id": "5f0c...", "ok": false, "error": "unknown command 'frob'; ..."}

Delivery is at-least-once: a caller may receive the same reply twice, or a late reply to an
earlier request, so it matches replies by `correlation_id` and ignores the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CORRELATION_ID_CHARS_MAX = 200  # ids are opaque to the worker, but not unbounded


class BadMessage(Exception):
    """A message that does not have the expected shape; `.message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Request:
    correlation_id: str
    reply_to: str
    command: str
    name: str = ""

    def encode(self) -> bytes:
        fields: dict[str, str] = {
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "command": self.command,
        }
        if self.name:
            fields["name"] = self.name
        return json.dumps(fields).encode("utf-8")


@dataclass(frozen=True)
class Reply:
    correlation_id: str
    ok: bool
    result: tuple[str, ...] = ()
    error: str = ""
    truncated: bool = False

    def encode(self) -> bytes:
        if self.ok:
            fields: dict[str, object] = {
                "correlation_id": self.correlation_id,
                "ok": True,
                "result": list(self.result),
                "truncated": self.truncated,
            }
        else:
            fields = {"correlation_id": self.correlation_id, "ok": False, "error": self.error}
        return json.dumps(fields).encode("utf-8")

    @staticmethod
    def decode(body: bytes) -> Reply:
        fields = _json_object(body, "reply")
        result = fields.get("result", [])
        if not isinstance(result, list) or not all(isinstance(item, str) for item in result):
            raise BadMessage("reply field 'result' must be a list of strings")
        return Reply(
            correlation_id=_string(fields, "correlation_id", "reply"),
            ok=fields.get("ok") is True,
            result=tuple(result),
            error=str(fields.get("error", "")),
            truncated=fields.get("truncated") is True,
        )


def reply_address(body: bytes) -> tuple[str, str]:
    """`(reply_to, correlation_id)` of a request, as far as they can be read.

    The worker calls this when a request is otherwise malformed, to send its error reply
    somewhere; empty strings mean the field is missing or unusable.
    """
    try:
        fields = _json_object(body, "request")
    except BadMessage:
        return "", ""
    reply_to = fields.get("reply_to")
    correlation_id = fields.get("correlation_id")
    return (
        reply_to if isinstance(reply_to, str) else "",
        correlation_id if isinstance(correlation_id, str) else "",
    )


def decode_request(body: bytes) -> Request:
    """The request in `body`; raises `BadMessage` naming the first problem found."""
    fields = _json_object(body, "request")
    correlation_id = _string(fields, "correlation_id", "request")
    if not 1 <= len(correlation_id) <= CORRELATION_ID_CHARS_MAX:
        raise BadMessage(
            f"request field 'correlation_id' must be 1 to {CORRELATION_ID_CHARS_MAX} characters"
        )
    name = fields.get("name", "")
    if not isinstance(name, str):
        raise BadMessage("request field 'name' must be a string")
    return Request(
        correlation_id=correlation_id,
        reply_to=_string(fields, "reply_to", "request"),
        command=_string(fields, "command", "request"),
        name=name,
    )


def _json_object(body: bytes, what: str) -> dict[str, object]:
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadMessage(f"{what} is not UTF-8 JSON") from None
    if not isinstance(fields, dict):
        raise BadMessage(f"{what} is not a JSON object")
    return fields


def _string(fields: dict[str, object], key: str, what: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value:
        raise BadMessage(f"{what} field {key!r} must be a non-empty string")
    return value
