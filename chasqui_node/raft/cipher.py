"""AES-GCM for Raft messages between Chasqui nodes, agreed per connection, Fernet otherwise.

pysyncobj encrypts every Raft message with Fernet (AES-CBC, HMAC-SHA256, then base64 of the
whole token) on the tick threads of both ends. Measured here for an entry of 500 random
256-byte bodies (140 KB): 0.73 ms to encrypt, once per follower, and 1.7 ms to decrypt on
each follower (the timestamp check decodes the base64 a second time). AES-GCM takes 14 us each
way. Compressible bodies shrink before encryption, so they cost Fernet far less.

pysyncobj hands each connection an `encryptor` with Fernet's three methods. The one here
(`ConnectionCipher`) keeps Fernet's token format for nodes that know nothing else and frames
AES-GCM for those that do, without a new handshake: each side of a pysyncobj connection sends
the other a random key, which the other returns inside every message it sends (pysyncobj's
guard against replay across connections). A Chasqui node appends `KEY_MARK` to the random key
it picks. A node older than this returns the key as it is and never looks inside, so:

- a message to a peer whose key carries the mark is sealed with AES-GCM under a key derived
  from the cluster secret and that peer's random key, so each direction of each connection has
  its own key; its nonce is a counter, and the receiver takes only the next count (no replay,
  no reordering, no dropped message goes unnoticed);
- a message to a peer whose key lacks the mark (an older node, or pysyncobj's admin tool) is a
  Fernet token, and either kind is read by looking at the first bytes: a Fernet token is
  base64 text starting "gAAAAA", an AES-GCM frame starts with a zero byte.

A mixed cluster during a rolling upgrade therefore keeps talking, Fernet between old and new.
The first message on a connection (the outgoing side's random key) is always Fernet: the key
it would be sealed under is the one it carries.
"""

from __future__ import annotations

import struct
from typing import Protocol, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

KEY_MARK = b"chasqui-aes-gcm-1"  # appended to a connection's random key: "I read AES-GCM"
FRAME_MAGIC = b"\x00CQ1"  # first bytes of a frame; a Fernet token starts with b"gAAAAA"
_COUNTER = struct.Struct(">Q")
_HEADER_BYTES = len(FRAME_MAGIC) + _COUNTER.size
_MASTER_KEY_SALT = b"chasqui raft aes-gcm master key v1"
_MASTER_KEY_ITERATIONS = 100_000  # as pysyncobj's Fernet key: a weak secret stays slow to guess
_DIRECTION_KEY_INFO = b"chasqui raft aes-gcm direction key v1"
_Direction = tuple[bytes, AESGCM, int]  # receiver's random key, its AESGCM, next counter


class FrameRejected(Exception):
    """A frame that fails authentication or arrives out of order. pysyncobj drops the
    connection on any exception while reading, as it does for a bad Fernet token."""


def master_key(cluster_secret: str | bytes) -> bytes:
    """The key every direction key is derived from: 0.05-0.1 s of PBKDF2, once per node."""
    return PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_MASTER_KEY_SALT,
        iterations=_MASTER_KEY_ITERATIONS,
    ).derive(cluster_secret.encode() if isinstance(cluster_secret, str) else cluster_secret)


def marked(random_key: bytes) -> bytes:
    """A connection's random key as a Chasqui node sends it."""
    return random_key + KEY_MARK


def reads_aes_gcm(random_key: bytes | None) -> TypeGuard[bytes]:
    return random_key is not None and random_key.endswith(KEY_MARK)


def _direction_key(master: bytes, receiver_key: bytes) -> AESGCM:
    """The AES-256-GCM key for messages to the side that picked `receiver_key`."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=receiver_key, info=_DIRECTION_KEY_INFO
    ).derive(master)
    return AESGCM(derived)


class ClusterCipher:
    """The cluster's secret in both forms; what a node gives pysyncobj as its encryptor.

    Used directly (by a connection that does not make its own `ConnectionCipher`) it is
    plain Fernet."""

    def __init__(self, cluster_secret: str | bytes, fernet: Fernet) -> None:
        self.fernet = fernet
        self.master_key = master_key(cluster_secret)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self.fernet.encrypt_at_time(data, current_time)

    def extract_timestamp(self, token: bytes) -> int:
        return self.fernet.extract_timestamp(token)

    def decrypt(self, token: bytes) -> bytes:
        return self.fernet.decrypt(token)


class KeyedConnection(Protocol):
    """What a `ConnectionCipher` reads from its pysyncobj connection, in pysyncobj's names."""

    sendRandKey: bytes | None  # the peer's random key: it goes out inside each message
    recvRandKey: bytes | None  # this side's random key: it comes back inside each message
    recvLastTimestamp: int


class ConnectionCipher:
    """One connection's encryptor (Fernet's interface): AES-GCM once the peer has shown it
    reads it, Fernet before and otherwise. It runs on the tick thread only, as the connection.
    """

    def __init__(self, cluster: ClusterCipher, connection: KeyedConnection) -> None:
        self._cluster = cluster
        self._connection = connection
        # sending is keyed by the peer's random key, reading by this side's
        self._send: _Direction | None = None
        self._receive: _Direction | None = None

    def _direction(self, current: _Direction | None, receiver_key: bytes) -> _Direction:
        """`current`, or a fresh count under `receiver_key` when that key is new (a new
        connection, or a reconnection of this one)."""
        if current is not None and current[0] == receiver_key:
            return current
        return (receiver_key, _direction_key(self._cluster.master_key, receiver_key), 0)

    def seals_with_aes_gcm(self) -> bool:
        """Whether the next message out is an AES-GCM frame."""
        return reads_aes_gcm(self._connection.sendRandKey)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        peer_key = self._connection.sendRandKey
        if not reads_aes_gcm(peer_key):
            return self._cluster.fernet.encrypt_at_time(data, current_time)
        _, aead, counter = self._direction(self._send, peer_key)
        self._send = (peer_key, aead, counter + 1)
        header = FRAME_MAGIC + _COUNTER.pack(counter)
        return header + aead.encrypt(_nonce(counter), data, FRAME_MAGIC)

    def extract_timestamp(self, token: bytes) -> int:
        if token.startswith(FRAME_MAGIC):
            # pysyncobj checks that timestamps never go back; a frame's order is checked by
            # its counter in decrypt.
            return self._connection.recvLastTimestamp
        return self._cluster.fernet.extract_timestamp(token)

    def decrypt(self, token: bytes) -> bytes:
        if not token.startswith(FRAME_MAGIC):
            return self._cluster.fernet.decrypt(token)
        own_key = self._connection.recvRandKey
        if not reads_aes_gcm(own_key):
            raise FrameRejected("an AES-GCM frame on a connection that did not offer it")
        _, aead, expected = self._receive = self._direction(self._receive, own_key)
        if len(token) < _HEADER_BYTES:
            raise FrameRejected(f"a frame of {len(token)} bytes, shorter than its header")
        (counter,) = _COUNTER.unpack_from(token, len(FRAME_MAGIC))
        if counter != expected:
            raise FrameRejected(f"frame {counter} where frame {expected} was due")
        try:
            data = aead.decrypt(_nonce(counter), token[_HEADER_BYTES:], FRAME_MAGIC)
        except InvalidTag:
            raise FrameRejected(f"frame {counter} failed authentication") from None
        self._receive = (own_key, aead, expected + 1)
        return data


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + _COUNTER.pack(counter)
