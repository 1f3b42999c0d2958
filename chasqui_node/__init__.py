"""Chasqui broker node: a replicated message broker on Raft (pysyncobj), LMDB and gRPC."""

__version__ = "0.1.0"
