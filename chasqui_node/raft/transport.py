"""The Raft port: pysyncobj's TCP connection, server and transport, with bounds on what a
stranger can make a node hold.

Part of the one door to pysyncobj (chasqui_node/raft/__init__.py): `install()` points
pysyncobj's modules at `RaftConnection` and `RaftServer`, and the node is built with
`RaftTransport`; importing this module changes nothing in pysyncobj. Written against
pysyncobj 0.3.17, whose name-mangled methods it overrides; `install()` refuses to go on against
another version, or one without the methods named in `OVERRIDDEN`.

pysyncobj frames each message with a 4-byte length and trusts it before anything is
authenticated. Measured against it (tests/cluster/test_raft_port_abuse.py): one connection
claiming a 2 GiB frame, or only 16 MiB, and sending 150 MiB raised a leader's RSS by 236-252 MB
and cost it its term (the tick thread reads until the socket is empty, appending to an
immutable `bytes`: a quadratic copy); 40 connections that sent 4 MiB each and went quiet held
220 MB on a follower until closed (the idle timeout is checked only when bytes arrive); every
stranger's connection was kept, and with a listen backlog of 5 and one accept per poll round a
real peer could stay out. The departures here:

- A connection is *authenticated* once a message on it carried the random key this side
  picked for it (pysyncobj's key exchange): the message decrypted under the cluster secret,
  and the key is new with the connection, so a recorded handshake replayed does not pass.
- A frame's length is checked as soon as its 4 bytes are in, before its body is buffered:
  at most `RAFT_HANDSHAKE_FRAME_BYTES_MAX` before authentication, `RAFT_FRAME_BYTES_MAX` after.
  Before authentication a read asks for no more than the frame can hold, so a node holds
  about a kilobyte for a stranger.
- Received bytes go into a bytearray consumed by offset (`Inbox`); a read event reads until
  the current frame is complete, not until the socket is empty, so a sender faster than the
  node cannot keep the tick thread in one read loop.
- An incoming connection that has not authenticated within `RAFT_HANDSHAKE_S_MAX` is dropped
  by a check every tick (`RaftTransport._onTick`), whether or not bytes arrive; at most
  `RAFT_UNAUTHENTICATED_CONNECTIONS_MAX` are held, a new one dropping the oldest of those that
  never sent a valid message (a real peer sends one in its first round trip).
- The listener's backlog is `RAFT_LISTEN_BACKLOG`, a poll round accepts up to
  `RAFT_ACCEPTS_PER_EVENT_MAX`, and running out of descriptors is a pause, not (as in
  pysyncobj) a reason to close the Raft port for good.

AES-GCM between Chasqui nodes and Fernet to older ones (cipher.py) are as before: the
random key this side picks carries `KEY_MARK`, and messages to a peer whose key carries it
are sealed with AES-GCM.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import pysyncobj.pickle
import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport
from pysyncobj.monotonic import monotonic as monotonicTime
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

from chasqui_node import limits
from chasqui_node.raft.cipher import KEY_MARK, ClusterCipher, ConnectionCipher, marked

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("i")  # pysyncobj's frame prefix: a native signed 32-bit length
# Errors of accept() that say nothing about the listening socket: the next round retries.
_ACCEPT_TRANSIENT = frozenset(
    {
        errno.ECONNABORTED,
        errno.EINTR,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EPERM,
        errno.EPROTO,
    }
)


# pysyncobj's name-mangled methods and hooks this module overrides or calls, by their owner:
# `install()` checks they exist before anything is built on them.
OVERRIDDEN: dict[type, tuple[str, ...]] = {
    pysyncobj.tcp_connection.TcpConnection: (
        "_TcpConnection__tryReadBuffer",
        "_TcpConnection__processRead",
        "_TcpConnection__processParseMessage",
        "_TcpConnection__processConnection",
    ),
    pysyncobj.tcp_server.TcpServer: ("_TcpServer__onNewConnection", "bind"),
    pysyncobj.transport.TCPTransport: ("_onTick", "_onNewIncomingConnection"),
}


class FrameRefused(Exception):
    """A frame that claims a length outside what the connection may send now."""


class RefusalLog:
    """What the Raft port turned away, logged at most once per `interval_s`: one warning per
    attack rather than one per connection. `note` from any thread (every node of a process
    shares one); `flush`, from the tick, reports what is left once the interval has passed."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = monotonicTime) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._latest = ""
        self._logged_at: float | None = None

    def note(self, reason: str) -> None:
        with self._lock:
            self._count += 1
            self._latest = reason
        self.flush()

    def flush(self) -> None:
        with self._lock:
            now = self._clock()
            if not self._count or (
                self._logged_at is not None and now - self._logged_at < self._interval_s
            ):
                return
            count, latest = self._count, self._latest
            self._count = 0
            self._logged_at = now
        logger.warning(
            "Raft port: dropped %d connection(s) since the last report; the latest: %s",
            count,
            latest,
        )


_refusals = RefusalLog(limits.RAFT_REFUSALS_LOG_INTERVAL_S)


def frame_bytes_max(authenticated: bool) -> int:
    """The longest frame a connection may announce now."""
    return limits.RAFT_FRAME_BYTES_MAX if authenticated else limits.RAFT_HANDSHAKE_FRAME_BYTES_MAX


class Inbox:
    """A connection's received bytes not yet taken as frames: one bytearray, read by offset.

    pysyncobj appended each read to a `bytes` and sliced each frame off the front, copying
    everything buffered every time: quadratic in a frame's size, on the tick thread. Here a read
    is appended in place and a frame is copied out once; the consumed front is cut away only
    when it is at least half the buffer, and an emptied buffer is released."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._buffer) - self._start

    def append(self, data: bytes) -> None:
        self._buffer += data

    def clear(self) -> None:
        self._buffer = bytearray()
        self._start = 0

    def frame_length(self, bytes_max: int) -> int | None:
        """The length the next frame announces, None before its 4 bytes are in. Raises
        `FrameRefused` when it is negative or above `bytes_max`."""
        if len(self) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer, self._start)
        if not 0 <= length <= bytes_max:
            raise FrameRefused(f"a frame announcing {length} bytes (at most {bytes_max} here)")
        return int(length)

    def missing(self, bytes_max: int) -> int:
        """Bytes the next frame still needs; while its length is unknown, as many as the
        longest allowed frame would. 0 when a whole frame is buffered. Raises `FrameRefused`."""
        length = self.frame_length(bytes_max)
        whole = _LENGTH.size + (bytes_max if length is None else length)
        return max(0, whole - len(self))

    def take_frame(self, bytes_max: int) -> bytes | None:
        """The next whole frame's body, or None until it is all in. Raises `FrameRefused`."""
        length = self.frame_length(bytes_max)
        if length is None or len(self) < _LENGTH.size + length:
            return None
        body_start = self._start + _LENGTH.size
        with memoryview(self._buffer) as view:  # one copy, not two
            body = bytes(view[body_start : body_start + length])
        self._start = body_start + length
        if self._start == len(self._buffer):
            self.clear()
        elif 2 * self._start >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
        return body


class RaftConnection(pysyncobj.tcp_connection.TcpConnection):  # type: ignore[misc]
    """pysyncobj's TCP connection with its own `ConnectionCipher` (cipher.py) and the
    bounds in the module docstring. pysyncobj's transport and server build connections by the
    name `TcpConnection` in their modules, which `install()` points here. Tick thread only,
    as pysyncobj's."""

    _cipher: ConnectionCipher | Any
    _own_key: bytes | None

    recvLastTimestamp: int  # pysyncobj's: the last Fernet timestamp read

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._inbox = Inbox()
        self._authenticated = False
        self._keyed = False
        self._opened_at: float = monotonicTime()
        super().__init__(*args, **kwargs)

    # -- the cipher (cipher.py) ------------------------------------------------------------

    @property
    def encryptor(self) -> ConnectionCipher | Any:
        return self._cipher

    @encryptor.setter
    def encryptor(self, cipher: ClusterCipher | Any) -> None:
        own = isinstance(cipher, ClusterCipher)
        self._cipher = ConnectionCipher(cipher, self) if own else cipher

    @property
    def recvRandKey(self) -> bytes | None:  # pysyncobj's name
        return self._own_key

    @recvRandKey.setter
    def recvRandKey(self, key: bytes | None) -> None:
        self._own_key = key if key is None or key.endswith(KEY_MARK) else marked(key)

    def seals_with_aes_gcm(self) -> bool:
        return isinstance(self._cipher, ConnectionCipher) and self._cipher.seals_with_aes_gcm()

    # -- authentication state ---------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """A message on this connection carried the random key this side picked for it."""
        return self._authenticated

    @property
    def keyed(self) -> bool:
        """A message on this connection decrypted (it may be a replayed first message)."""
        return self._keyed

    @property
    def opened_at(self) -> float:
        """When the connection was accepted or last connected (pysyncobj's monotonic clock)."""
        return self._opened_at

    def connect(self, host: str, port: int) -> bool:
        self._forget()
        self._opened_at = float(monotonicTime())
        connected: bool = super().connect(host, port)
        return connected

    def disconnect(self) -> None:
        self._forget()
        super().disconnect()

    def _forget(self) -> None:
        self._inbox.clear()
        self._authenticated = False
        self._keyed = False

    def _refuse(self, reason: str) -> None:
        _refusals.note(reason)
        self.disconnect()

    # -- reading (pysyncobj's name-mangled methods) -----------------------------------------

    def _TcpConnection__tryReadBuffer(self) -> None:
        while self._TcpConnection__processRead():
            pass
        self._TcpConnection__lastReadTime = monotonicTime()

    def _TcpConnection__processRead(self) -> bool:
        """One read into the inbox. False when a whole frame is in (to be taken first), the
        socket has nothing more, or the connection was dropped."""
        try:
            missing = self._inbox.missing(frame_bytes_max(self._authenticated))
        except FrameRefused as refusal:
            self._refuse(f"{refusal}, {self.phase()}")
            return False
        if missing == 0:
            return False
        size: int = self._TcpConnection__recvBufferSize
        if not self._authenticated:
            size = min(size, missing)
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(size)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or not incoming:
            self.disconnect()
            return False
        self._inbox.append(incoming)
        return True

    def _TcpConnection__processParseMessage(self) -> Any:
        """The next message, or None until one is whole (or the connection was dropped)."""
        try:
            frame = self._inbox.take_frame(frame_bytes_max(self._authenticated))
        except FrameRefused as refusal:
            self._refuse(f"{refusal}, {self.phase()}")
            return None
        if frame is None:
            return None
        try:
            return self._open(frame)
        except Exception as error:  # anything a stranger's bytes can raise; pysyncobj's rule
            self._refuse(f"a message that did not open ({type(error).__name__}), {self.phase()}")
            return None

    def _open(self, frame: bytes) -> Any:
        """pysyncobj's checks, without `assert` (gone under python -O): timestamps never go
        back, the frame decrypts, and once this side has sent its random key, every message
        carries it."""
        cipher = self.encryptor
        if cipher:
            timestamp = cipher.extract_timestamp(frame)
            if timestamp < self.recvLastTimestamp:
                raise FrameRefused("a Fernet timestamp went back")
            self.recvLastTimestamp = timestamp
            frame = cipher.decrypt(frame)
        message = pysyncobj.pickle.loads(zlib.decompress(frame))
        own_key = self.recvRandKey
        if own_key:
            random_key, message = message
            if random_key != own_key:
                raise FrameRefused("a message for another connection")
            self._authenticated = True
        elif not cipher:
            self._authenticated = True  # no cluster secret: nothing to prove
        self._keyed = True
        return message

    def phase(self) -> str:
        """How far the handshake got, for log lines."""
        if self._authenticated:
            return "authenticated"
        return "after a valid first message" if self._keyed else "before any valid message"


class Handshake(Protocol):
    """What the transport's policy reads of an unauthenticated connection."""

    @property
    def keyed(self) -> bool: ...

    @property
    def opened_at(self) -> float: ...


H = TypeVar("H", bound=Handshake)


def surplus_handshakes(handshakes: Sequence[H], count_max: int) -> list[H]:
    """The connections to drop so that `count_max` remain: the oldest of those that never
    sent a valid message first (a stranger's), then the oldest of the rest."""
    surplus = len(handshakes) - count_max
    if surplus <= 0:
        return []
    return sorted(handshakes, key=lambda handshake: (handshake.keyed, handshake.opened_at))[
        :surplus
    ]


def overdue_handshakes(handshakes: Sequence[H], now: float, handshake_s_max: float) -> list[H]:
    """The connections still unauthenticated `handshake_s_max` after they opened."""
    return [handshake for handshake in handshakes if now - handshake.opened_at > handshake_s_max]


class RaftServer(pysyncobj.tcp_server.TcpServer):  # type: ignore[misc]
    """pysyncobj's listener with a longer backlog and several accepts per poll round.

    pysyncobj accepted one connection per poll round from a backlog of 5 and closed the port
    for good on any accept error but EAGAIN (a full descriptor table included). Connections are
    built by the name `TcpConnection` in pysyncobj.tcp_server, as pysyncobj does."""

    def bind(self) -> None:
        super().bind()
        self._TcpServer__socket.listen(limits.RAFT_LISTEN_BACKLOG)  # Linux updates the backlog

    def _TcpServer__onNewConnection(self, descr: int, event: int) -> None:
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(limits.RAFT_ACCEPTS_PER_EVENT_MAX):
                if not self._accept_one():
                    break
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()

    def _accept_one(self) -> bool:
        """Accept one connection; False when there is none to take now."""
        listener = self._TcpServer__socket
        if listener is None or self._TcpServer__fileno is None:
            return False
        try:
            sock, _address = listener.accept()
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno in _ACCEPT_TRANSIENT:
                _refusals.note(f"accept failed: {error.strerror}")
                return error.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO)
            logger.error("Raft port: the listening socket failed (%s); closing it", error)
            self.unbind()
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError:  # the peer is gone already
            sock.close()
            return True
        connection = pysyncobj.tcp_server.TcpConnection(
            poller=self._TcpServer__poller,
            socket=sock,
            timeout=self._TcpServer__connectionTimeout,
            sendBufferSize=self._TcpServer__sendBufferSize,
            recvBufferSize=self._TcpServer__recvBufferSize,
            keepalive=self._TcpServer__keepalive,
        )
        self._TcpServer__onNewConnectionCallback(connection)
        return True


class RaftTransport(pysyncobj.transport.TCPTransport):  # type: ignore[misc]
    """pysyncobj's TCP transport that keeps unauthenticated incoming connections few and
    short-lived (see the module docstring). Tick thread only.

    Connections of pysyncobj's own class (a test's stand-in for an older node installs it)
    are left as pysyncobj leaves them."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._swept_at = monotonicTime()
        super().__init__(syncObj, selfNode, otherNodes)

    def _handshakes(self) -> list[RaftConnection]:
        return [
            connection
            for connection in self._unknownConnections
            if isinstance(connection, RaftConnection)
            and not connection.authenticated
            and connection.state != CONNECTION_STATE.DISCONNECTED
        ]

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        handshakes = self._handshakes()
        for connection in surplus_handshakes(
            handshakes, limits.RAFT_UNAUTHENTICATED_CONNECTIONS_MAX
        ):
            _refusals.note(
                f"{len(handshakes)} unauthenticated connections, more than "
                f"{limits.RAFT_UNAUTHENTICATED_CONNECTIONS_MAX}: dropped the oldest"
            )
            connection.disconnect()

    def _onTick(self) -> None:
        super()._onTick()
        now = monotonicTime()
        stalled = now - self._swept_at > limits.RAFT_TICK_STALL_S
        self._swept_at = now
        _refusals.flush()
        if stalled:
            return  # the poll ending this tick reads what arrived meanwhile first
        for connection in overdue_handshakes(self._handshakes(), now, limits.RAFT_HANDSHAKE_S_MAX):
            _refusals.note(
                f"no authentication within {limits.RAFT_HANDSHAKE_S_MAX:g} s, {connection.phase()}"
            )
            connection.disconnect()


def send_rest_when_writable(connection: Any) -> None:
    """Have the poller finish sending what a pysyncobj connection could not send at once.

    A message larger than the socket's free buffer (an entry of 500 messages is 240 KB on the
    wire) is sent in part; pysyncobj keeps the rest but asks the poller for write readiness
    only after a write event, not after a send, so the rest went out with the connection's
    next message: a heartbeat period later when nothing else was sent. The tick thread owns
    the poller and every send, so this runs there."""
    if connection._TcpConnection__writeBuffer and connection.fileno() is not None:
        connection._TcpConnection__poller.subscribe(
            connection.fileno(),
            connection._TcpConnection__processConnection,
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
        )
