"""Every bound Chasqui enforces, with its unit and the reason for its value.

Stateless limits (sizes, name rules) are checked at the edges: in `service.py` and again in the
client. State-dependent limits (queue full, queue count) are decided inside `apply()`.
"""

MESSAGE_BYTES_MAX = 1 * 1024 * 1024  # one payload; bigger blobs belong in object storage
NAME_BYTES_MAX = 200  # queue and topic names, UTF-8 encoded
NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
PRODUCER_ID_BYTES_MAX = 64  # a UUID as text fits with room to spare
QUEUE_DEPTH_MAX = 1_000_000  # undelivered messages per queue
QUEUES_MAX = 10_000  # per cluster; keeps snapshots bounded
TOPICS_MAX = 10_000  # per cluster; keeps snapshots bounded
USERS_MAX = 100_000  # per cluster; open signup must not grow state without bound
PUBLISH_BATCH_MESSAGES_MAX = 500
PUBLISH_BATCH_BYTES_MAX = 4 * 1024 * 1024
CONSUME_MESSAGES_MAX = 500  # messages handed out by one consume call
ACK_BATCH_MAX = 1000  # deliveries acked by one call
GRPC_MESSAGE_BYTES_MAX = PUBLISH_BATCH_BYTES_MAX + 64 * 1024  # headroom for the envelope
# One consume reply, counting each delivery's body, name, producer id and envelope: what one
# publish batch carried fits in one reply, and the reply stays under GRPC_MESSAGE_BYTES_MAX.
CONSUME_BYTES_MAX = PUBLISH_BATCH_BYTES_MAX + 32 * 1024
DELIVERY_ENVELOPE_BYTES = 64  # a delivery's field tags, lengths and integers, encoded (at most)

OFFSET_MAX = 2**63 - 1  # topic offsets and sequences are signed 64-bit in the state
TOPIC_WINDOWS_MAX = 64  # unacked consume replies per topic subscription before a rewind
STREAM_CREDIT_MAX = 10_000  # unacked deliveries a streaming consumer may ask for at once
CONSUME_WAIT_S_MAX = 60.0  # longest long-poll; longer waits are better as repeated calls
VISIBILITY_TIMEOUT_MS_DEFAULT = 30_000  # ARCHITECTURE section 2
VISIBILITY_TIMEOUT_MS_MAX = (
    12 * 3600 * 1000
)  # SQS allows 12 h; a longer lease hides a dead consumer
DELAY_MS_MAX = 15 * 60 * 1000  # delayed delivery and nack delay; SQS caps delays at 15 min
MESSAGE_TTL_MS_MAX = 14 * 24 * 3600 * 1000  # two weeks; queues are not archives
MAX_DELIVERIES_MAX = 1000  # beyond this a poison message should have been dead-lettered long ago
TOPIC_RETENTION_MS_DEFAULT = 7 * 24 * 3600 * 1000  # topic messages older than this are dropped
TOPIC_RETENTION_BYTES_DEFAULT = 1024 * 1024 * 1024  # per topic

# Cluster time (clock.py): a node whose wall clock is further than this from cluster time logs
# a warning (NTP keeps healthy hosts within milliseconds), at most once per interval.
CLOCK_SKEW_WARN_S = 1.0
CLOCK_SKEW_WARN_INTERVAL_S = 60.0

DEDUP_WINDOW_MS = 10 * 60 * 1000  # a retry older than this may be stored twice (NATS: 2 min)
DEDUP_PURGE_PER_COMMAND = 64  # expired dedup entries removed per applied command; bounds apply time
RETENTION_PURGE_PER_COMMAND = 64  # expired topic messages removed per applied command
DELETED_PURGE_PER_COMMAND = 256  # records of a deleted queue or topic removed per command
IN_FLIGHT_COUNT_MAX = 10_000  # list_queues counts leased messages up to this, then reports it
KEY_HASH_CHARS_MAX = 128  # a SHA-256 hex digest is 64; leaves room for a longer hash

# Raft entries: pysyncobj sends entries of 64 KiB or more down a slow chunked path (see
# ARCHITECTURE section 3), so the proposer closes a batch before it reaches this size.
RAFT_ENTRY_BYTES_TARGET = 48 * 1024
# A single command can still be larger (a 1 MiB message, a 4 MiB batch: about 5.6 MB encoded).
# pysyncobj sends an entry of appendEntriesBatchSizeBytes or more down its broken chunked
# path, so that knob is set above the largest possible entry and such entries go whole.
RAFT_MESSAGE_BYTES_MAX = 16 * 1024 * 1024
RAFT_ENTRY_COMMANDS_MAX = 500
# Socket buffers asked for on Raft connections (the kernel caps them at net.core.wmem_max and
# rmem_max): room for a whole entry of a publish batch, so it crosses in one poll round.
RAFT_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
PROPOSAL_TIMEOUT_S_DEFAULT = 5.0  # longest wait for a proposal to commit before ABORTED
PROPOSALS_IN_FLIGHT_MAX = 10_000  # queued proposals on the leader before RESOURCE_EXHAUSTED

# Replication (replication.py and raft/). Raft entries proposed and not yet applied: while
# this many are in flight, further proposals wait and pile up into bigger entries (group commit).
ENTRIES_IN_FLIGHT_MAX = 16
# An in-flight entry with no callback after this many seconds stops counting towards
# ENTRIES_IN_FLIGHT_MAX: pysyncobj calls back every entry it accepted, but a lost callback must
# not stall proposing for good. Twice PROPOSAL_TIMEOUT_S_DEFAULT: its callers gave up by then.
ENTRY_FORGOTTEN_S = 10.0
# A stopping node lets the snapshot being written finish for up to this long (1.9 s for an
# 850 MB state measured): a half-written one is discarded, and the log it would trim is kept.
SNAPSHOT_WRITE_WAIT_S = 60.0
# After a failed snapshot write (a full disk), seconds before the next attempt: one error line
# per pause, not one per tick.
SNAPSHOT_RETRY_S = 5.0
# pysyncobj's getStatus() iterates its dicts while the tick thread may change them; a rare
# "changed size during iteration" is retried this many times (1 ms apart), then reads as empty.
RAFT_STATUS_READ_ATTEMPTS_MAX = 5

KEY_BYTES = 24  # random bytes in a user key (192 bits, above the 128 required)
# A configured admin key is checked too: 22 URL-safe characters carry 132 bits.
ADMIN_KEY_CHARS_MIN = 22
ADMIN_KEY_CHARS_MAX = 512  # a key is a bearer token in a header, not a document

# Per user. Admins are exempt: they clean up and may need room to do it.
USER_QUEUES_MAX = 1_000  # queues one user owns; a tenth of QUEUES_MAX, so no one user fills it
USER_TOPICS_MAX = 1_000  # topics one user owns; a tenth of TOPICS_MAX likewise
USER_ID_BYTES_MAX = 32  # "u" and a counter below USERS_MAX, with room to spare
# Users named on one access list. A queue's metadata is rewritten on every publish, so the
# lists stay small; a larger audience can share one key per service instead.
ACCESS_LIST_USERS_MAX = 100

# The gRPC server (see admission.py). Every call holds one of GRPC_WORKERS threads until it
# answers: long-polls and streams (waiting calls) for seconds to hours, the rest for a Raft
# round. Waiting calls may take at most WAITING_CALLS_MAX threads in all and
# WAITING_CALLS_PER_KEY_MAX per key, so the other GRPC_WORKERS - WAITING_CALLS_MAX (64) always
# answer health checks, status and other users' short calls. Beyond a bound a call gets
# RESOURCE_EXHAUSTED at once instead of queueing.
GRPC_WORKERS = 256  # Python threads; idle ones cost a stack's address space, not memory
GRPC_CONCURRENT_CALLS_MAX = 512  # gRPC refuses new calls beyond this rather than queue them
WAITING_CALLS_MAX = 192  # long-polls and streams on one node
WAITING_CALLS_PER_KEY_MAX = 32  # one user's; a sixth of the node's, so no one key holds them
# Users created through open signup, per node (admins create users without this bound): a
# steady 10 a second fills USERS_MAX in hours, not minutes; a burst covers a test run or a
# fleet of services starting together. Production closes signup (deploy/ does).
SIGNUPS_PER_SECOND_MAX = 10.0
SIGNUP_BURST_MAX = 200
# In-flight calls on one client connection (gRPC peer), of any kind.
CALLS_IN_FLIGHT_PER_CONNECTION_MAX = 64

assert MESSAGE_BYTES_MAX <= PUBLISH_BATCH_BYTES_MAX
assert WAITING_CALLS_PER_KEY_MAX <= WAITING_CALLS_MAX < GRPC_WORKERS <= GRPC_CONCURRENT_CALLS_MAX
assert USER_QUEUES_MAX <= QUEUES_MAX and USER_TOPICS_MAX <= TOPICS_MAX
assert PUBLISH_BATCH_BYTES_MAX < GRPC_MESSAGE_BYTES_MAX
# A consume always returns at least one ready message, so the largest must fit in a reply.
assert (
    MESSAGE_BYTES_MAX + NAME_BYTES_MAX + PRODUCER_ID_BYTES_MAX + DELIVERY_ENVELOPE_BYTES
    <= CONSUME_BYTES_MAX
)
assert CONSUME_BYTES_MAX + 16 * 1024 <= GRPC_MESSAGE_BYTES_MAX  # room for the reply's framing
NODE_ID_BYTES_MAX = 64  # a cluster member's id, e.g. "n4" or a host name
ADDRESS_BYTES_MAX = 260  # host:port of a member; a DNS name is at most 253 bytes
MEMBER_RECORDS_MAX = 1000  # registry records (members and tombstones); a cluster has a handful
MEMBERSHIP_CHANGE_TIMEOUT_S = 10.0  # wait for pysyncobj to commit one configuration change

# Raft transport (raft/transport.py): what a connection to the Raft port can make a node hold.
# A connection is authenticated once a message on it carried the random key this node picked
# for it (the cluster secret and a fresh key: a replayed handshake does not pass). Before that
# its messages are the peer's random key (a Fernet token of 184 bytes from a Chasqui node,
# about 230 from plain pysyncobj) and its address (under 600 bytes for a 260-byte address in
# Fernet): a frame claiming more than this is not a handshake.
RAFT_HANDSHAKE_FRAME_BYTES_MAX = 1024
# An append-entries message gathers entries up to RAFT_MESSAGE_BYTES_MAX and passes it by at
# most one entry (at most half as much again, asserted below); Fernet to an older node adds a
# third. Anything claiming more is refused before it is buffered.
RAFT_FRAME_BYTES_MAX = 2 * RAFT_MESSAGE_BYTES_MAX
# From accept to authenticated: a peer needs a round trip and a tick or two of each node.
RAFT_HANDSHAKE_S_MAX = 3.0
# Unauthenticated incoming connections held at once (a cluster has a handful of peers); the
# next one drops the oldest, first among those that never sent a valid message.
RAFT_UNAUTHENTICATED_CONNECTIONS_MAX = 64
RAFT_ACCEPTS_PER_EVENT_MAX = 8  # per poll round: a burst drains fast, ticks still run between
RAFT_LISTEN_BACKLOG = 128  # pysyncobj's 5 overflowed under a burst; the kernel caps at somaxconn
# A tick thread that stood still this long (a long apply) first reads what peers sent meanwhile
# before it drops a handshake as overdue.
RAFT_TICK_STALL_S = 1.0
RAFT_REFUSALS_LOG_INTERVAL_S = 10.0  # one warning line per attack, not one per connection
# An entry holds at most one publish batch in the text format (base64 in JSON: 4/3, and names).
assert 3 * PUBLISH_BATCH_BYTES_MAX // 2 <= RAFT_MESSAGE_BYTES_MAX // 2
assert RAFT_HANDSHAKE_FRAME_BYTES_MAX < RAFT_FRAME_BYTES_MAX
assert RAFT_UNAUTHENTICATED_CONNECTIONS_MAX > 2 * RAFT_ACCEPTS_PER_EVENT_MAX

# Waits on behalf of a client's call (deadlines.py): a proposal's wait ends this long before
# the call's deadline, so the client gets our answer (a result, or ABORTED) rather than
# DEADLINE_EXCEEDED...
CALL_ANSWER_MARGIN_S = 0.05
# ...but lasts at least this, so a proposal made close to the deadline can still commit.
CALL_WAIT_S_MIN = 0.05

# Long-polls and streams (long_poll.py). A waiting consume holds a gRPC worker thread; these
# bound how long it goes without looking at its call, at leadership and at the clock.
STREAM_RECHECK_S = 1.0  # an idle stream re-checks leadership and its client this often
# A long-poll waits for a change in slices of at most this, so a cancelled call frees its
# thread within a second.
LONG_POLL_WAIT_SLICE_S = 1.0
# A long-poll answers (empty) this long before the call's deadline, so the client gets an
# answer rather than DEADLINE_EXCEEDED.
LONG_POLL_ANSWER_MARGIN_S = 0.2
# The shortest wait for a lease or delay to end: a time already passed (by cluster time) still
# waits this long, so the wait cannot turn into a busy loop.
LONG_POLL_READY_WAIT_S_MIN = 0.01

# The node's wiring (server.py).
ADMIN_CHECK_S = 0.25  # how often a node looks whether it just became leader (admin key upkeep)
HEALTH_CHECK_S = 0.5  # how often health is re-evaluated; balancers see a change this late at most
# Committed-but-unapplied entries a SERVING node may trail by: a moment's backlog under load,
# while a node further behind is still catching up and should not be sent clients yet.
HEALTH_APPLY_LAG_MAX = 100
SERVER_STOP_GRACE_S = 2.0  # at shutdown, calls in flight get this long to finish, then cancelled

# The Raft log on disk (journal.py).
# A new segment starts past this size; old segments are deleted whole, once all they hold is
# in a snapshot.
JOURNAL_SEGMENT_BYTES_MAX = 64 * 1024 * 1024
JOURNAL_RECORD_BYTES_MAX = 64 * 1024 * 1024  # a larger length field can only be corruption
JOURNAL_CACHE_ENTRIES_MAX = 1024  # newest entries kept in RAM, the ones Raft reads most...
JOURNAL_CACHE_BYTES_MAX = 32 * 1024 * 1024  # ...within this many bytes (big batches' entries: MBs)

# LMDB state and snapshots (storage.py).
STORAGE_MAP_SIZE_BYTES_DEFAULT = 64 * 1024**3  # address space only; the file grows with the data
STORAGE_READERS_MAX = 512  # concurrent read transactions: one per gRPC worker thread, and spare
# How often, at most, the map's resident pages are dropped (after applies): keeps the node's
# resident memory small without a madvise call per entry.
STORAGE_MAP_RELEASE_INTERVAL_S = 1.0
SNAPSHOT_COPY_CHUNK_BYTES = 1024 * 1024  # a snapshot is copied and hashed through this buffer

# One /metrics scrape (metrics.py): it must stay cheap whatever the state holds. These bound only
# what a scrape reads, never what the broker accepts.
METRICS_QUEUE_SERIES_MAX = 1_000  # queues exported with their own series; beyond, depths skipped
METRICS_QUEUE_SCAN_ROWS_MAX = 200_000  # store rows a scrape may read to list queues, then gives up
METRICS_STOP_WAIT_S = 5.0  # closing waits this long for the HTTP thread, then leaves it (a daemon)

# The command line (cli.py) and its dev cluster (tls.py).
DEV_STOP_WAIT_S = 10.0  # `dev` stops its nodes with SIGTERM, then SIGKILL after this long
DEV_WATCH_INTERVAL_S = 0.5  # `dev` looks this often whether a node exited, to stop the rest
DEV_CERT_DAYS = 30  # long enough for a dev session, short enough to be useless if leaked
STATUS_TIMEOUT_S_DEFAULT = 2.0  # `status`, per node: an unreachable node is reported, not awaited
# `members add/remove`: the whole command, redirects included; above MEMBERSHIP_CHANGE_TIMEOUT_S
# so the node's own wait for the change ends first and its answer arrives.
MEMBERS_TIMEOUT_S_DEFAULT = 15.0
MEMBERS_CALL_ATTEMPTS_MAX = 10  # endpoints tried (following leader hints) per membership change
MEMBERS_RETRY_PAUSE_S = 0.3  # between attempts when no node names a leader
