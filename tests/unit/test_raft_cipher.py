"""raft/cipher.py: AES-GCM agreed through pysyncobj's random keys, Fernet for everyone else.

Two `_End`s stand for the two sides of one pysyncobj connection and go through its handshake
as pysyncobj's transport does: the outgoing side sends its random key, the incoming side
answers with its own, and from then on each message carries the key its receiver picked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from cryptography.fernet import Fernet, InvalidToken
from pysyncobj.encryptor import getEncryptor

from chasqui_node.raft.cipher import (
    FRAME_MAGIC,
    KEY_MARK,
    ClusterCipher,
    ConnectionCipher,
    FrameRejected,
    marked,
)

SECRET = "cluster secret"
FERNET = getEncryptor(SECRET)  # pysyncobj's own derivation, as an older node has it
CLUSTER = ClusterCipher(SECRET, FERNET)


@dataclass
class _End:
    """One side of a connection: the fields pysyncobj keeps, and the encryptor it calls."""

    new: bool = True  # a Chasqui node with AES-GCM; False: one from before
    sendRandKey: bytes | None = None
    recvRandKey: bytes | None = None
    recvLastTimestamp: int = 0
    cipher: ConnectionCipher | Fernet = field(init=False)

    def __post_init__(self) -> None:
        self.cipher = ConnectionCipher(CLUSTER, self) if self.new else FERNET

    def pick_key(self) -> bytes:
        key = os.urandom(32)
        self.recvRandKey = marked(key) if self.new else key
        return self.recvRandKey

    def seal(self, data: bytes) -> bytes:
        return self.cipher.encrypt_at_time(data, 1000)

    def open(self, token: bytes) -> bytes:
        timestamp = self.cipher.extract_timestamp(token)
        assert timestamp >= self.recvLastTimestamp  # pysyncobj's check
        self.recvLastTimestamp = timestamp
        return self.cipher.decrypt(token)


def _handshake(outgoing: _End, incoming: _End) -> None:
    """pysyncobj's key exchange; each step's token must open at the other end."""
    first = outgoing.seal(outgoing.pick_key())
    incoming.sendRandKey = incoming.open(first)
    answer = incoming.seal(incoming.pick_key())
    outgoing.sendRandKey = outgoing.open(answer)


def _is_fernet(token: bytes) -> bool:
    return token.startswith(b"gAAAAA")


def test_two_new_nodes_seal_both_directions_with_aes_gcm() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    assert a.sendRandKey is not None and a.sendRandKey.endswith(KEY_MARK)
    for body in (b"", b"x", os.urandom(200_000)):
        to_b, to_a = a.seal(body), b.seal(body[::-1])
        assert to_b.startswith(FRAME_MAGIC) and to_a.startswith(FRAME_MAGIC)
        # Plaintext never shows in the frame; a 1-byte body matches some ciphertext byte by
        # chance (1 in 256 per byte), so only bodies long enough to mean something are looked for.
        assert len(body) < 16 or body not in to_b
        assert b.open(to_b) == body
        assert a.open(to_a) == body[::-1]


def test_the_first_message_is_fernet_and_the_answer_is_aes_gcm() -> None:
    a, b = _End(), _End()
    first = a.seal(a.pick_key())
    assert _is_fernet(first)  # it carries the key it would have been sealed under
    b.sendRandKey = b.open(first)
    answer = b.seal(b.pick_key())
    assert answer.startswith(FRAME_MAGIC)
    a.sendRandKey = a.open(answer)
    assert a.sendRandKey == b.recvRandKey


@pytest.mark.parametrize(("outgoing_new", "incoming_new"), [(True, False), (False, True)])
def test_a_node_from_before_gets_fernet_both_ways(outgoing_new: bool, incoming_new: bool) -> None:
    outgoing, incoming = _End(new=outgoing_new), _End(new=incoming_new)
    _handshake(outgoing, incoming)
    for sender, receiver in ((outgoing, incoming), (incoming, outgoing)):
        token = sender.seal(b"append entries")
        assert _is_fernet(token)
        assert receiver.open(token) == b"append entries"


def test_a_replayed_frame_is_rejected() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    frame = a.seal(b"commit index 7")
    assert b.open(frame) == b"commit index 7"
    with pytest.raises(FrameRejected, match="frame 0 where frame 1 was due"):
        b.open(frame)


def test_a_dropped_or_reordered_frame_is_rejected() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    first, second = a.seal(b"one"), a.seal(b"two")
    with pytest.raises(FrameRejected, match="frame 1 where frame 0 was due"):
        b.open(second)
    assert b.open(first) == b"one"
    assert b.open(second) == b"two"


def test_a_tampered_or_truncated_frame_is_rejected() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    frame = bytearray(a.seal(b"vote for n2"))
    frame[-1] ^= 1
    with pytest.raises(FrameRejected, match="failed authentication"):
        b.open(bytes(frame))
    with pytest.raises(FrameRejected, match="shorter than its header"):
        b.open(FRAME_MAGIC + b"\x00")


def test_a_frame_cannot_be_reflected_back_to_its_sender() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    a.seal(b"append entries")
    frame = a.seal(b"append entries")  # frame 1: the count a's own end expects next
    with pytest.raises(FrameRejected, match="failed authentication"):
        a.open(frame)  # each direction has its own key


def test_another_cluster_secret_cannot_open_or_forge_a_frame() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    intruder = ConnectionCipher(ClusterCipher("another secret", FERNET), a)
    with pytest.raises(FrameRejected, match="failed authentication"):
        b.open(intruder.encrypt_at_time(b"forged", 1000))


def test_a_frame_where_none_was_offered_is_rejected() -> None:
    receiver = _End()
    receiver.recvRandKey = os.urandom(32)  # a key sent without the mark
    sender = _End()
    sender.sendRandKey = marked(receiver.recvRandKey)  # a forged claim that it had one
    with pytest.raises(FrameRejected, match="did not offer it"):
        receiver.open(sender.seal(b"x"))


def test_a_reconnection_counts_anew_and_refuses_the_old_connections_frames() -> None:
    a, b = _End(), _End()
    _handshake(a, b)
    old_frame = a.seal(b"before")
    assert b.open(old_frame) == b"before"
    for end in (a, b):  # pysyncobj's disconnect
        end.sendRandKey = end.recvRandKey = None
        end.recvLastTimestamp = 0
    _handshake(a, b)
    frame = a.seal(b"after")
    assert frame[len(FRAME_MAGIC) : len(FRAME_MAGIC) + 8] == bytes(8)  # counter 0 again
    with pytest.raises(FrameRejected, match="failed authentication"):
        b.open(old_frame)
    assert b.open(frame) == b"after"


def test_the_cluster_cipher_alone_is_fernet() -> None:
    token = CLUSTER.encrypt_at_time(b"x", 1000)
    assert FERNET.decrypt(token) == b"x"
    assert CLUSTER.extract_timestamp(token) == 1000
    assert CLUSTER.decrypt(FERNET.encrypt(b"y")) == b"y"
    with pytest.raises(InvalidToken):
        ClusterCipher("another secret", getEncryptor("another secret")).decrypt(token)
