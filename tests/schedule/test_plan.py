"""Topologies (who teaches whom) and plans (Algorithm 1 as a list of phases)."""

import pytest

from copd.schedule.plan import Phase, build_plan, copd_plan, experts_plan
from copd.schedule.topology import Edge, build_edges, full_mesh, hub_and_spoke, oneway, pair


def labels(edges):
    return sorted(e.label for e in edges)


# ---- topologies ------------------------------------------------------------------------


def test_edge_label_is_student_from_teacher():
    assert Edge("vision", "text").label == "vision<-text"


def test_pair_has_both_directions():
    assert labels(pair(["a", "b"])) == ["a<-b", "b<-a"]
    assert labels(build_edges("pair", ["a", "b"])) == ["a<-b", "b<-a"]


def test_oneway_first_branch_learns_from_second():
    assert oneway(["a", "b"]) == [Edge("a", "b")]


@pytest.mark.parametrize("builder", [pair, oneway])
@pytest.mark.parametrize("names", [["a"], ["a", "b", "c"]])
def test_two_branch_topologies_reject_other_k(builder, names):
    with pytest.raises(ValueError, match="exactly 2 branches"):
        builder(names)


def test_hub_and_spoke_links_hub_with_every_spoke_both_ways_and_spokes_never():
    names = ["s1", "hub", "s2", "s3"]
    edges = hub_and_spoke(names, "hub")
    assert len(edges) == 2 * 3 and len(set(edges)) == len(edges)
    for s in ("s1", "s2", "s3"):
        assert Edge(s, "hub") in edges and Edge("hub", s) in edges
    assert all("hub" in (e.student, e.teacher) for e in edges)
    assert not any(e.student == e.teacher for e in edges)


@pytest.mark.parametrize("hub", [None, "nope"])
def test_hub_and_spoke_needs_a_hub_among_branches(hub):
    with pytest.raises(ValueError, match="hub"):
        build_edges("hub", ["a", "b", "c"], hub)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_full_mesh_has_every_ordered_pair(k):
    names = [f"b{i}" for i in range(k)]
    edges = full_mesh(names)
    assert len(edges) == k * (k - 1) == len(set(edges))
    assert {(e.student, e.teacher) for e in edges} == {(s, t) for s in names for t in names if s != t}


def test_unknown_topology_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown topology 'ring'.*mesh"):
        build_edges("ring", ["a", "b"])


# ---- plans -----------------------------------------------------------------------------

NAMES = ["a", "b"]
EDGES = pair(NAMES)


def test_copd_plan_alternates_explore_and_consolidate():
    plan = copd_plan(NAMES, EDGES, cycles=2, rl_steps=3, opd_steps=2)
    assert [(p.name, p.cycle, p.steps) for p in plan] == [
        ("explore", 1, 3),
        ("consolidate", 1, 2),
        ("explore", 2, 3),
        ("consolidate", 2, 2),
    ]
    for p in plan:
        assert p.rl_branches == ("a", "b")  # Phase II keeps the RL part (Algorithm 1)
        assert p.edges == (() if p.name == "explore" else tuple(EDGES))
    assert plan[1].label == "cycle 1 consolidate"
    assert sum(p.steps for p in plan) == 2 * (3 + 2)


def test_experts_plan_same_total_steps_and_no_edges():
    copd = copd_plan(NAMES, EDGES, 2, 3, 2)
    experts = experts_plan(NAMES, EDGES, 2, 3, 2)
    assert sum(p.steps for p in experts) == sum(p.steps for p in copd)
    assert all(p.edges == () and p.name == "explore" and p.rl_branches == ("a", "b") for p in experts)
    assert [p.cycle for p in experts] == [1, 2]


def test_zero_opd_steps_gives_no_consolidate_phase():
    plan = copd_plan(NAMES, EDGES, cycles=3, rl_steps=4, opd_steps=0)
    assert [p.name for p in plan] == ["explore"] * 3
    assert all(p.edges == () for p in plan)


def test_zero_rl_steps_gives_only_consolidate_phases():
    plan = copd_plan(NAMES, EDGES, cycles=2, rl_steps=0, opd_steps=2)
    assert [(p.name, p.cycle) for p in plan] == [("consolidate", 1), ("consolidate", 2)]


def test_build_plan_dispatches_and_rejects_unknown():
    assert build_plan("copd", NAMES, EDGES, 1, 1, 1) == copd_plan(NAMES, EDGES, 1, 1, 1)
    assert build_plan("experts", NAMES, EDGES, 1, 1, 1) == experts_plan(NAMES, EDGES, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown plan 'mixed'"):
        build_plan("mixed", NAMES, EDGES, 1, 1, 1)


def test_phases_are_plain_frozen_data():
    phase = Phase("explore", 1, 2, ("a",))
    with pytest.raises(AttributeError):
        phase.steps = 3  # type: ignore[misc]
