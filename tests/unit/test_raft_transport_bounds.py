"""raft/transport.py: what a connection to the Raft port can make a node hold.

A `RaftConnection` is driven as pysyncobj's poller drives it (a read event at a time) over a
fake socket that hands out scripted bytes and records what it was asked for; no network.
Peers' messages are built as a Chasqui peer builds them (raft/cipher.py, pysyncobj's pickle and
zlib, a native 4-byte length), so a message that opens here opens on a node. Proves: a frame's
length is checked before its body is buffered (the handshake bound before authentication, the
message bound after, each just under, at and just over); a stranger's read never asks for more
than the frame may hold; a read event ends once a frame is whole; frames split anywhere come
out whole; a large frame in small pieces costs linear time; authentication needs this side's
random key back; and the transport's policy drops the oldest stranger first and every handshake
that overstays, from the tick, without bytes arriving.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pickle
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj import SyncObjConf
from pysyncobj.encryptor import getEncryptor
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

from chasqui_node import limits
from chasqui_node.raft.cipher import ClusterCipher, ConnectionCipher, marked
from chasqui_node.raft.transport import (
    FrameRefused,
    Inbox,
    RaftConnection,
    RaftTransport,
    RefusalLog,
    overdue_handshakes,
    surplus_handshakes,
)

SECRET = "cluster secret"
CLUSTER = ClusterCipher(SECRET, getEncryptor(SECRET))
HANDSHAKE_MAX = limits.RAFT_HANDSHAKE_FRAME_BYTES_MAX
MESSAGE_MAX = limits.RAFT_FRAME_BYTES_MAX
FILENO = 7
RECV_BUFFER_BYTES = 64 * 1024


def frame(body: bytes) -> bytes:
    return struct.pack("i", len(body)) + body


def prefix(length: int) -> bytes:
    return struct.pack("i", length)


class FakeSocket:
    """A non-blocking socket: `incoming` is what the peer sent; `endless` is a peer that never
    stops sending (those bytes, again and again)."""

    def __init__(self, incoming: bytes = b"", endless: bytes = b"") -> None:
        self.incoming = bytearray(incoming)
        self.endless = endless
        self.recv_sizes: list[int] = []
        self.sent = bytearray()
        self.closed = False
        self.served = 0  # bytes recv() handed out

    def feed(self, data: bytes) -> None:
        self.incoming += data

    def recv(self, size: int) -> bytes:
        self.recv_sizes.append(size)
        if not self.incoming and self.endless:
            while len(self.incoming) < size:
                self.incoming += self.endless
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "no data")
        data = bytes(self.incoming[:size])
        del self.incoming[:size]
        self.served += len(data)
        return data

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def getsockopt(self, *_args: Any) -> int:
        return 0

    def setsockopt(self, *_args: Any) -> None:
        pass

    def fileno(self) -> int:
        return FILENO

    def close(self) -> None:
        self.closed = True


class FakePoller:
    def __init__(self) -> None:
        self.subscribed: dict[int, Any] = {}

    def subscribe(self, descr: int, callback: Any, _events: int) -> None:
        self.subscribed[descr] = callback

    def unsubscribe(self, descr: int) -> None:
        self.subscribed.pop(descr, None)


@dataclass
class Peer:
    """The far end of a connection, as a Chasqui node keeps it (pysyncobj's field names)."""

    recvRandKey: bytes = field(default_factory=lambda: marked(os.urandom(32)))
    sendRandKey: bytes | None = None
    recvLastTimestamp: int = 0
    cipher: ConnectionCipher = field(init=False)

    def __post_init__(self) -> None:
        self.cipher = ConnectionCipher(CLUSTER, self)

    def message(self, message: Any) -> bytes:
        """A framed message as pysyncobj's send() builds it."""
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = zlib.compress(pickle.dumps(message, protocol=4), 0)
        return frame(self.cipher.encrypt_at_time(data, 1000))

    def first_message(self) -> bytes:
        """The outgoing side's random key: always Fernet (raft/cipher.py)."""
        return self.message(self.recvRandKey)


class Incoming:
    """An accepted connection and what reached its message callback; `answer_key` does what
    pysyncobj's transport does with the first message (it picks and sends this side's key)."""

    def __init__(self, sock: FakeSocket, answer_key: bool = True) -> None:
        self.sock = sock
        self.connection = RaftConnection(
            poller=FakePoller(),
            socket=sock,
            timeout=10.0,
            sendBufferSize=RECV_BUFFER_BYTES,
            recvBufferSize=RECV_BUFFER_BYTES,
        )
        self.connection.encryptor = CLUSTER
        self.messages: list[Any] = []
        self.answer_key = answer_key
        self.connection.setOnMessageReceivedCallback(self._received)

    def _received(self, message: Any) -> None:
        connection = self.connection
        if self.answer_key and not connection.sendRandKey:
            connection.sendRandKey = message
            connection.recvRandKey = os.urandom(32)
            connection.send(connection.recvRandKey)
        self.messages.append(message)

    def read_event(self) -> None:
        self.connection._TcpConnection__processConnection(FILENO, POLL_EVENT_TYPE.READ)

    @property
    def open(self) -> bool:
        return bool(self.connection.state != CONNECTION_STATE.DISCONNECTED)


def authenticated_pair() -> tuple[Incoming, Peer]:
    """An incoming connection through pysyncobj's key exchange, and its peer."""
    peer = Peer()
    incoming = Incoming(FakeSocket(peer.first_message()))
    incoming.read_event()
    assert incoming.connection.keyed and not incoming.connection.authenticated
    peer.sendRandKey = incoming.connection.recvRandKey
    incoming.sock.feed(peer.message("127.0.0.1:7201"))
    incoming.read_event()
    assert incoming.connection.authenticated
    return incoming, peer


# -- the inbox --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_split_anywhere_come_out_whole_and_in_order(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(body) for body in bodies)
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    inbox = Inbox()
    taken = []
    for start, stop in itertools.pairwise(points):
        inbox.append(stream[start:stop])
        while (body := inbox.take_frame(HANDSHAKE_MAX)) is not None:
            taken.append(body)
    assert taken == bodies
    assert len(inbox) == 0


def test_a_large_frame_in_small_pieces_costs_linear_time() -> None:
    # pysyncobj appended each piece to a bytes: 8 MiB in 1 KiB pieces copied 34 GB.
    body = os.urandom(8 * 1024 * 1024)
    stream = frame(body)
    inbox = Inbox()
    taken = []
    started = time.monotonic()
    for start in range(0, len(stream), 1024):
        inbox.append(stream[start : start + 1024])
        if (whole := inbox.take_frame(MESSAGE_MAX)) is not None:
            taken.append(whole)
    assert time.monotonic() - started < 2.0
    assert taken == [body]


@pytest.mark.parametrize(
    ("length", "refused"),
    [(HANDSHAKE_MAX - 1, False), (HANDSHAKE_MAX, False), (HANDSHAKE_MAX + 1, True), (-1, True)],
    ids=["just under", "exactly at", "just over", "negative"],
)
def test_the_inbox_checks_a_length_as_soon_as_it_is_in(length: int, refused: bool) -> None:
    inbox = Inbox()
    inbox.append(prefix(length)[:3])
    assert inbox.frame_length(HANDSHAKE_MAX) is None
    inbox.append(prefix(length)[3:])
    if refused:
        with pytest.raises(FrameRefused):
            inbox.missing(HANDSHAKE_MAX)
    else:
        assert inbox.missing(HANDSHAKE_MAX) == length


# -- a stranger's connection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "kept"),
    [(HANDSHAKE_MAX - 1, True), (HANDSHAKE_MAX, True), (HANDSHAKE_MAX + 1, False)],
    ids=["just under", "exactly at", "just over"],
)
def test_before_authentication_a_frame_is_bounded_by_the_handshake(length: int, kept: bool) -> None:
    incoming = Incoming(FakeSocket(prefix(length) + b"x" * (length // 2)))
    incoming.read_event()
    assert incoming.open is kept
    assert incoming.sock.closed is not kept
    assert incoming.messages == []


@pytest.mark.parametrize("claimed", [2**31 - 1, limits.RAFT_MESSAGE_BYTES_MAX, -5])
def test_a_stranger_claiming_a_large_frame_is_dropped_after_a_kilobyte(claimed: int) -> None:
    sock = FakeSocket(prefix(claimed), endless=os.urandom(4096))
    incoming = Incoming(sock)
    incoming.read_event()
    assert not incoming.open and sock.closed
    assert all(size <= 4 + HANDSHAKE_MAX for size in sock.recv_sizes)
    assert sock.served <= 4 + HANDSHAKE_MAX


def test_a_stranger_that_sends_endlessly_gets_one_bounded_read_per_event() -> None:
    # Within the bound but never a valid message: the frame fails to open and the connection
    # goes; the event never read more than the frame could hold.
    sock = FakeSocket(endless=prefix(HANDSHAKE_MAX) + b"y" * HANDSHAKE_MAX)
    incoming = Incoming(sock)
    incoming.read_event()
    assert not incoming.open
    assert sock.served <= 4 + HANDSHAKE_MAX


def test_bytes_under_a_wrong_secret_never_reach_the_callback() -> None:
    stranger = ClusterCipher("another secret", getEncryptor("another secret"))
    token = stranger.encrypt_at_time(zlib.compress(pickle.dumps(b"k" * 49)), 1000)
    incoming = Incoming(FakeSocket(frame(token)))
    incoming.read_event()
    assert not incoming.open and incoming.messages == []


# -- authentication ---------------------------------------------------------------------------


def test_a_peer_authenticates_by_returning_this_sides_random_key() -> None:
    incoming, peer = authenticated_pair()
    assert incoming.messages == [peer.recvRandKey, "127.0.0.1:7201"]
    assert incoming.connection.seals_with_aes_gcm()


def test_a_valid_first_message_alone_does_not_authenticate() -> None:
    # A recorded first message (the only one sealed without a fresh key) can be replayed.
    peer = Peer()
    incoming = Incoming(FakeSocket(peer.first_message()))
    incoming.read_event()
    assert incoming.connection.keyed and not incoming.connection.authenticated
    incoming.sock.feed(prefix(HANDSHAKE_MAX + 1))
    incoming.read_event()
    assert not incoming.open


def test_a_message_carrying_another_key_is_refused() -> None:
    peer = Peer()
    incoming = Incoming(FakeSocket(peer.first_message()))
    incoming.read_event()
    peer.sendRandKey = marked(os.urandom(32))  # not the key this side sent
    incoming.sock.feed(peer.message("127.0.0.1:7201"))
    incoming.read_event()
    assert not incoming.open and not incoming.connection.authenticated


def test_an_outgoing_connection_authenticates_with_the_first_answer() -> None:
    # pysyncobj's outgoing side picks its key before anything arrives; the answer carries it.
    incoming = Incoming(FakeSocket(), answer_key=False)
    connection = incoming.connection
    connection.recvRandKey = os.urandom(32)
    peer = Peer(sendRandKey=connection.recvRandKey)
    incoming.sock.feed(peer.message(peer.recvRandKey))
    incoming.read_event()
    assert connection.authenticated and incoming.messages == [peer.recvRandKey]


@pytest.mark.parametrize(
    ("length", "kept"),
    [(MESSAGE_MAX - 1, True), (MESSAGE_MAX, True), (MESSAGE_MAX + 1, False)],
    ids=["just under", "exactly at", "just over"],
)
def test_after_authentication_a_frame_is_bounded_by_the_message_limit(
    length: int, kept: bool
) -> None:
    incoming, _peer = authenticated_pair()
    incoming.sock.feed(prefix(length) + b"z" * 1000)
    incoming.read_event()
    assert incoming.open is kept


def test_an_authenticated_peer_sends_a_large_message_in_small_reads() -> None:
    incoming, peer = authenticated_pair()
    entries = [(os.urandom(1024 * 1024), index, 3) for index in range(6)]
    incoming.sock.feed(peer.message({"type": "append_entries", "entries": entries}))
    for _ in range(200):  # a read event per recv buffer at most, as the poller would call
        incoming.read_event()
        if len(incoming.messages) == 3:
            break
    assert incoming.open
    assert incoming.messages[-1]["entries"] == entries


def test_a_read_event_ends_once_a_frame_is_whole() -> None:
    # A peer sending faster than the node reads cannot hold the tick thread in one event.
    incoming, peer = authenticated_pair()
    heartbeats = b"".join(
        peer.message({"type": "append_entries", "entries": [], "commit_index": index})
        for index in range(1000)
    )
    assert len(heartbeats) > RECV_BUFFER_BYTES  # one recv never reaches a repeat
    incoming.sock.endless = heartbeats
    recvs_before = len(incoming.sock.recv_sizes)
    incoming.read_event()
    assert incoming.open
    assert len(incoming.sock.recv_sizes) - recvs_before == 1
    assert len(incoming.messages) >= 3


# -- the transport's policy -------------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    name: str
    keyed: bool
    opened_at: float


def test_beyond_the_count_the_oldest_stranger_goes_first() -> None:
    handshakes = [
        Handshake("peer, keyed, oldest", True, 1.0),
        Handshake("stranger, old", False, 2.0),
        Handshake("stranger, newer", False, 3.0),
        Handshake("stranger, newest", False, 4.0),
    ]
    assert surplus_handshakes(handshakes, 5) == []
    assert surplus_handshakes(handshakes, 4) == []
    assert [h.name for h in surplus_handshakes(handshakes, 3)] == ["stranger, old"]
    dropped = surplus_handshakes(handshakes, 1)
    assert [h.name for h in dropped] == ["stranger, old", "stranger, newer", "stranger, newest"]


def test_a_handshake_overstays_only_after_the_deadline() -> None:
    deadline = limits.RAFT_HANDSHAKE_S_MAX
    handshakes = [
        Handshake("just under", False, 100.0 - deadline + 0.01),
        Handshake("exactly at", False, 100.0 - deadline),
        Handshake("just over", True, 100.0 - deadline - 0.01),
    ]
    assert [h.name for h in overdue_handshakes(handshakes, 100.0, deadline)] == ["just over"]


class FakeSyncObj:
    """What pysyncobj's TCPTransport reads of its node."""

    def __init__(self) -> None:
        self.conf = SyncObjConf(bindAddress="127.0.0.1:1")
        self._poller = FakePoller()
        self.encryptor = CLUSTER
        self.tick_callbacks: list[Any] = []

    def addOnTickCallback(self, callback: Any) -> None:
        self.tick_callbacks.append(callback)


def _transport() -> RaftTransport:
    transport = RaftTransport(FakeSyncObj(), TCPNode("127.0.0.1:1"), [])
    transport._ready = True  # as if bound: the tick binds nothing here
    return transport


def _accept(transport: RaftTransport, sock: FakeSocket) -> RaftConnection:
    connection = RaftConnection(
        poller=transport._syncObj._poller,
        socket=sock,
        timeout=10.0,
        recvBufferSize=RECV_BUFFER_BYTES,
    )
    transport._onNewIncomingConnection(connection)
    return connection


def test_the_transport_holds_a_bounded_number_of_strangers_and_keeps_a_keyed_peer() -> None:
    transport = _transport()
    peer = Peer()
    real = _accept(transport, FakeSocket(peer.first_message()))
    real._TcpConnection__processConnection(FILENO, POLL_EVENT_TYPE.READ)
    assert real.keyed and real.sendRandKey == peer.recvRandKey  # pysyncobj answered its key
    strangers = [
        _accept(transport, FakeSocket(prefix(100)))
        for _ in range(limits.RAFT_UNAUTHENTICATED_CONNECTIONS_MAX + 10)
    ]
    held = [c for c in strangers if c.state != CONNECTION_STATE.DISCONNECTED]
    assert len(held) + 1 == limits.RAFT_UNAUTHENTICATED_CONNECTIONS_MAX
    assert held == strangers[-len(held) :]  # the oldest went
    assert real.state != CONNECTION_STATE.DISCONNECTED


def test_the_tick_drops_a_handshake_that_overstays_without_any_bytes_arriving() -> None:
    transport = _transport()
    quiet = _accept(transport, FakeSocket(prefix(100) + b"q" * 10))
    quiet._TcpConnection__processConnection(FILENO, POLL_EVENT_TYPE.READ)
    fresh = _accept(transport, FakeSocket())
    transport._onTick()
    assert quiet.state != CONNECTION_STATE.DISCONNECTED
    quiet._opened_at -= limits.RAFT_HANDSHAKE_S_MAX + 0.1
    transport._onTick()
    assert quiet.state == CONNECTION_STATE.DISCONNECTED
    assert fresh.state != CONNECTION_STATE.DISCONNECTED
    assert quiet not in transport._unknownConnections


def test_after_a_stalled_tick_the_poll_reads_before_anything_is_dropped() -> None:
    transport = _transport()
    late = _accept(transport, FakeSocket())
    late._opened_at -= limits.RAFT_HANDSHAKE_S_MAX + 0.1
    transport._swept_at -= limits.RAFT_TICK_STALL_S + 0.1  # the tick thread stood still
    transport._onTick()
    assert late.state != CONNECTION_STATE.DISCONNECTED
    transport._onTick()
    assert late.state == CONNECTION_STATE.DISCONNECTED


def test_refusals_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="chasqui_node.raft.transport"):
        for step in range(25):
            now[0] = step * 1.0
            log.note(f"refusal {step}")
        log.flush()  # within the interval: nothing yet
        now[0] = 30.0
        log.flush()
        log.flush()  # nothing left
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4  # at 0 s, 10 s, 20 s, and the rest at 30 s
    assert "dropped 1 connection(s)" in lines[0] and "refusal 0" in lines[0]
    assert "dropped 10 connection(s)" in lines[1] and "refusal 10" in lines[1]
    assert "dropped 4 connection(s)" in lines[3] and "refusal 24" in lines[3]
