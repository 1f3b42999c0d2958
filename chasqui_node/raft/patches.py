"""The module-level changes Chasqui makes inside pysyncobj, applied by `apply()` and only then.

Importing this module changes nothing: `chasqui_node.raft.install()` (the door) checks the
pysyncobj version first and then calls `apply()`, once per process. Each change is one
assignment into a pysyncobj module, and each keeps the wire format every pysyncobj node reads,
so nodes with and without them understand each other:

- `pysyncobj.tcp_connection.zlib` becomes `AdaptiveZlib`: deflate only what halves;
- pysyncobj's pickle protocol becomes `RAFT_PICKLE_PROTOCOL` (4): bytes travel verbatim;
- `pysyncobj.transport.TcpConnection`, `pysyncobj.tcp_server.TcpConnection` and
  `pysyncobj.transport.TcpServer` become transport.py's `RaftConnection` and `RaftServer`:
  the Raft port's bounds and the AES-GCM cipher;
- pysyncobj's "truncating already-applied log entries" alarm is filtered out of its log
  (`BenignTruncationFilter`): the durable Raft log keeps matching entries.
"""

from __future__ import annotations

import logging
import threading
import zlib

import pysyncobj.pickle
import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport

from chasqui_node.raft.transport import RaftConnection, RaftServer

# pysyncobj pickles commands and messages with protocol 2, which has no bytes opcode: bytes
# travel as a latin-1 str re-encoded as UTF-8 (1.5x for random bodies, slowly, and once more
# when the pickled command is pickled into an append-entries message). Protocol 4 keeps them
# verbatim. Unpickling reads any protocol, so nodes with and without this understand each
# other; the packed entry format (entries.py) relies on it. A wire format, not a bound.
RAFT_PICKLE_PROTOCOL = 4

_lock = threading.Lock()
_applied = False


class AdaptiveZlib:
    """The zlib pysyncobj's TCP connections use: deflate only messages that shrink by half.

    pysyncobj deflates every Raft message at level 3 on the sending tick thread: 6.3 ms for
    an entry of 500 random 256-byte bodies (base64 in JSON: it shrinks only to 76%), 27 ms
    for 680 KB, once per follower, on the commit path. Bodies that compress well (repeated
    text) shrink to 1% in 1.5 ms and then cross the connection, the encryption and the
    journal of the follower far cheaper. So a 4 KiB sample from the middle of a message of
    8 KiB or more is deflated at level 1 (57 us); if it halves, the message is deflated at
    level 1, otherwise stored at level 0 (1.2 ms for 680 KB). Every form is the zlib format
    any pysyncobj node inflates, so nodes with and without this agree.
    """

    SAMPLE_BYTES = 4096

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        sample_bytes = AdaptiveZlib.SAMPLE_BYTES
        if len(data) >= 2 * sample_bytes:
            middle = len(data) // 2
            sample = data[middle : middle + sample_bytes]
            if 2 * len(zlib.compress(sample, 1)) <= len(sample):
                return zlib.compress(data, 1)
        return zlib.compress(data, 0)

    decompress = staticmethod(zlib.decompress)


class BenignTruncationFilter(logging.Filter):
    """pysyncobj logs CRITICAL "truncating already-applied log entries" whenever a leader
    re-sends entries a follower already holds, before it deletes and re-adds them. The
    durable Raft log (log.py) keeps matching entries, so nothing applied is lost; it logs its
    own CRITICAL ("dropping log entries ... applied") when entries really go. Drop
    pysyncobj's alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("truncating already-applied log entries")


def apply() -> None:
    """Make the changes listed in the module docstring. Idempotent and thread-safe: a second
    call changes nothing, so whatever a caller changed after the first (a test's stand-in for
    an older node puts pysyncobj's own connection class back) stays."""
    global _applied
    with _lock:
        if _applied:
            return
        pysyncobj.tcp_connection.zlib = AdaptiveZlib
        setattr(pysyncobj.pickle, "__protocol", RAFT_PICKLE_PROTOCOL)  # the module's global
        # pysyncobj's transport and server build connections, and the transport its server, by
        # these names in their modules; the node passes `RaftTransport` to pysyncobj itself.
        pysyncobj.transport.TcpConnection = RaftConnection
        pysyncobj.tcp_server.TcpConnection = RaftConnection
        pysyncobj.transport.TcpServer = RaftServer
        logging.getLogger("pysyncobj.syncobj").addFilter(BenignTruncationFilter())
        _applied = True


def applied() -> bool:
    """Whether `apply()` has run in this process."""
    return _applied
