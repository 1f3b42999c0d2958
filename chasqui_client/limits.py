"""Stateless limits the client checks before sending anything.

These values mirror `chasqui_node/limits.py` (the client must not import `chasqui_node`; the two
share only the generated proto modules). The node checks them again and stays the authority: if a
node is configured differently, its answer wins and reaches the caller as `InvalidArgument`.
"""

MESSAGE_BYTES_MAX = 1 * 1024 * 1024  # one payload; bigger blobs belong in object storage
NAME_BYTES_MAX = 200  # queue and topic names, UTF-8 encoded
NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
PUBLISH_BATCH_MESSAGES_MAX = 500  # messages in one PublishBatch call
PUBLISH_BATCH_BYTES_MAX = 4 * 1024 * 1024  # summed bodies in one PublishBatch call
CONSUME_MESSAGES_MAX = 500  # messages handed out by one consume call
ACK_BATCH_MAX = 1000  # deliveries acked by one call; longer lists are split
GRPC_MESSAGE_BYTES_MAX = PUBLISH_BATCH_BYTES_MAX + 64 * 1024  # headroom for the envelope

CONSUME_WAIT_S_MAX = 60.0  # longest long-poll; longer waits are better as repeated calls
VISIBILITY_TIMEOUT_MS_MAX = 12 * 3600 * 1000  # a longer lease hides a dead consumer
DELAY_MS_MAX = 15 * 60 * 1000  # delayed delivery and nack delay
MESSAGE_TTL_MS_MAX = 14 * 24 * 3600 * 1000  # two weeks; queues are not archives
MAX_DELIVERIES_MAX = 1000  # beyond this a poison message should have been dead-lettered

# Client-only bounds: how long and how often the client keeps trying.
CALL_TIMEOUT_S_DEFAULT = 10.0  # overall budget of one call, retries and redirects included
CONNECT_TIMEOUT_S_DEFAULT = 2.0  # wait for a not-yet-connected endpoint before moving on
RECONNECT_BACKOFF_INITIAL_MS = 100  # gRPC channel reconnects to a node that was down
RECONNECT_BACKOFF_MAX_MS = 1000  # gRPC's default is 120 s: too slow for failover
BACKOFF_INITIAL_S = 0.05  # pause after a round in which every endpoint failed
BACKOFF_MAX_S = 1.0  # the pause doubles per round up to this
REDIRECTS_PER_ROUND_MAX = 3  # leader hints followed at once before backing off (elections flap)

# Iterators, streams and publishers.
ITER_BATCH_DEFAULT = 100  # messages leased per long-poll by iter_queue / iter_topic
ITER_WAIT_S_DEFAULT = 20.0  # long-poll of an iterator; it polls again when this passes empty
STREAM_WINDOW_DEFAULT = 100  # unacked deliveries a streaming subscription holds
STREAM_CREDIT_MAX = 10_000  # the node's cap on a stream's credit (its limits.STREAM_CREDIT_MAX)
STREAM_HEALTHY_S = 2.0  # a stream that lived this long was connected: its failures start afresh
ACKER_CALLS_IN_FLIGHT = 4  # Ack calls one Acker overlaps (acks need no order)...
ACKER_OVERLAP_ACKS_MIN = 100  # ...but a call starts beside another only for this many acks
PUBLISHER_WINDOW_DEFAULT = 1000  # messages a pipelined publisher holds unconfirmed
PUBLISHER_WINDOW_MAX = 100_000  # bounds the memory of the futures and bodies it holds
PUBLISHER_LINGER_S_DEFAULT = 0.002  # an idle publisher waits this long to fill its first batch
PUBLISHER_LINGER_S_MAX = 1.0

assert MESSAGE_BYTES_MAX <= PUBLISH_BATCH_BYTES_MAX
assert PUBLISH_BATCH_BYTES_MAX < GRPC_MESSAGE_BYTES_MAX
