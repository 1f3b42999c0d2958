"""The deflate policy of Raft messages (`AdaptiveZlib`, raft/patches.py): whatever it chooses,
any pysyncobj node inflates it with plain zlib; it deflates only what halves, so incompressible
entries (random bodies, base64 in JSON) cost a copy rather than 27 ms per 680 KB."""

from __future__ import annotations

import binascii
import os
import zlib

import pytest

from chasqui_node.raft.patches import AdaptiveZlib

REPEATED = binascii.b2a_base64(b"b" * 200_000)
RANDOM = binascii.b2a_base64(os.urandom(200_000))
SMALL = b"a small reply" * 10


@pytest.mark.parametrize(
    "data", [REPEATED, RANDOM, SMALL, b""], ids=["repeated", "random", "small", "empty"]
)
def test_plain_zlib_inflates_whatever_it_sends(data: bytes) -> None:
    assert zlib.decompress(AdaptiveZlib.compress(data, 3)) == data


def test_a_message_that_halves_is_deflated() -> None:
    assert len(AdaptiveZlib.compress(REPEATED, 3)) < len(REPEATED) // 100


def test_an_incompressible_or_small_message_is_stored() -> None:
    for data in (RANDOM, SMALL):
        stored = AdaptiveZlib.compress(data, 3)
        assert len(stored) >= len(data)  # stored blocks: the bytes plus framing
        assert stored == zlib.compress(data, 0)
