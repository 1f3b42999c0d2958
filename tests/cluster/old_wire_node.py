"""`python -m tests.cluster.old_wire_node start ...`: a node that speaks Raft as nodes from
before AES-GCM did (raft_cipher.py): pysyncobj's own connections, an unmarked random key and
Fernet for every message. Everything else is today's node, which is all the wire can tell."""

from __future__ import annotations

import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport

import chasqui_node.replication  # noqa: F401 (points pysyncobj at its own connection class)
from chasqui_node.cli import main

pysyncobj.transport.TcpConnection = pysyncobj.tcp_connection.TcpConnection
pysyncobj.tcp_server.TcpConnection = pysyncobj.tcp_connection.TcpConnection

if __name__ == "__main__":
    main()
