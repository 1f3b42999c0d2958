"""`python -m tests.cluster.old_wire_node start ...`: a node that speaks Raft as nodes from
before AES-GCM did (raft/cipher.py): pysyncobj's own connections, an unmarked random key and
Fernet for every message. Everything else is today's node, which is all the wire can tell.

`raft.install()` runs first and points pysyncobj at Chasqui's connection class; this module
then points it back. The node's own `install()` at start-up checks again and changes nothing,
so pysyncobj's class stays."""

from __future__ import annotations

import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport

from chasqui_node import raft
from chasqui_node.cli import main

raft.install()
pysyncobj.transport.TcpConnection = pysyncobj.tcp_connection.TcpConnection
pysyncobj.tcp_server.TcpConnection = pysyncobj.tcp_connection.TcpConnection

if __name__ == "__main__":
    main()
