"""Secrets an operator hands the node or its admin commands: the bootstrap admin key, the
metrics token, and client TLS material for commands that call the nodes' client port.

A key or token is read from the first line of a file or from the environment, never from the
command line (any local user could read it with `ps`), checked against the admin key's rules,
and only its hash goes further (`hash_key`), except for the admin commands that send it.
"""

from __future__ import annotations

from pathlib import Path

import click
import grpc

from chasqui_node import limits
from chasqui_node.server import ConfigError
from chasqui_node.service import hash_key

ADMIN_KEY_ENV = "CHASQUI_ADMIN_KEY"
_KEY_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def admin_key_hash(key_file: Path | None, environment: dict[str, str]) -> str | None:
    """The hash of the configured admin key (file first, then `CHASQUI_ADMIN_KEY`), or None.
    Raises ConfigError for a key too short or not URL-safe; the message never shows the key."""
    key = admin_key(key_file, environment)
    return None if key is None else hash_key(key)


def metrics_token_hash(token_file: Path | None) -> str | None:
    """The hash of the bearer token /metrics requires (first line of `token_file`), or None
    for none. The token follows the admin key's rules; raises ConfigError as `admin_key` does."""
    if token_file is None:
        return None
    source = f"metrics token file {token_file}"
    return hash_key(_checked_key(_first_line(token_file, source), source))


def admin_key(key_file: Path | None, environment: dict[str, str]) -> str | None:
    """The configured admin key itself (see `admin_key_hash`); only the membership commands,
    which must send it, use it unhashed."""
    if key_file is not None:
        source = f"admin key file {key_file}"
        key = _first_line(key_file, source)
    elif environment.get(ADMIN_KEY_ENV):
        key = environment[ADMIN_KEY_ENV].strip()
        source = ADMIN_KEY_ENV
    else:
        return None
    return _checked_key(key, source)


def _first_line(key_file: Path, source: str) -> str:
    try:
        lines = key_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {source}: {error}") from error
    return lines[0].strip() if lines else ""


def _checked_key(key: str, source: str) -> str:
    """`key`, when it is long and URL-safe enough; the ConfigError never shows it."""
    if not (
        limits.ADMIN_KEY_CHARS_MIN <= len(key) <= limits.ADMIN_KEY_CHARS_MAX
        and set(key) <= _KEY_ALPHABET
    ):
        raise ConfigError(
            f"the key in {source} must be {limits.ADMIN_KEY_CHARS_MIN} to "
            f"{limits.ADMIN_KEY_CHARS_MAX} URL-safe characters [A-Za-z0-9_-] (at least 128 "
            "random bits); make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))'"
        )
    return key


def client_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    if ca is None and cert is None:
        return None
    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together; give both")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
