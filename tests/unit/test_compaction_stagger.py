"""Each node snapshots at its own log length, so the nodes of a cluster do not all stop for a
snapshot at the same index (see `staggered_compaction_entries`)."""

from __future__ import annotations

from chasqui_node.replication import staggered_compaction_entries


def test_three_nodes_snapshot_at_three_lengths_from_the_configured_one() -> None:
    members = ["n2", "n3", "n1"]
    lengths = [staggered_compaction_entries(5000, node, members) for node in ("n1", "n2", "n3")]
    assert lengths == [5000, 5833, 6666]


def test_the_stagger_depends_on_the_members_not_their_order() -> None:
    for node in ("a", "b", "c", "d", "e"):
        assert staggered_compaction_entries(100, node, ["a", "b", "c", "d", "e"]) == (
            staggered_compaction_entries(100, node, ["e", "d", "c", "b", "a"])
        )


def test_every_length_stays_within_half_again_of_the_configured_one() -> None:
    members = [f"node-{i}" for i in range(7)]
    lengths = {staggered_compaction_entries(10, node, members) for node in members}
    assert min(lengths) == 10
    assert max(lengths) < 15


def test_a_single_node_uses_the_configured_length() -> None:
    assert staggered_compaction_entries(5000, "solo", ["solo"]) == 5000
    assert staggered_compaction_entries(5000, "solo", []) == 5000
