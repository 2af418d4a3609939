"""Precision planner: budgets respected, sensitive nodes upgraded first, exact knapsack on small cases,
target ratios, Pareto front, clear errors for impossible budgets and bad plans."""

import itertools
import json
import math

import numpy as np
import pytest

from graphq.errors import GraphqError
from graphq.planner import (
    PlanItem,
    check_plan,
    evaluate_plan,
    load_plan,
    pareto_front,
    plan_precisions,
    uniform_plan,
)


def _items(damages4, sizes=None, damage8_ratio=0.004):
    sizes = sizes or [1000] * len(damages4)
    return [PlanItem(f"n{i}", size, {"int4": (4.25, d), "int8": (8.25, d * damage8_ratio), "float": (32.0, 0.0)})
            for i, (d, size) in enumerate(zip(damages4, sizes))]


def test_budget_is_respected_and_the_most_sensitive_nodes_get_more_bits():
    rng = np.random.default_rng(0)
    damages = rng.lognormal(-6, 2, size=40)
    items = _items(list(damages), sizes=list(rng.integers(500, 5000, size=40)))
    for budget in (4.25, 4.5, 5.0, 6.0, 9.0):
        plan = plan_precisions(items, budget_bits=budget)
        assert plan.average_bits <= budget + 1e-9
        assert set(plan.assignments) == {i.name for i in items}
    plan = plan_precisions(items, budget_bits=4.6)
    upgraded = [n for n, p in plan.assignments.items() if p != "int4"]
    assert upgraded
    damage_of = {i.name: i.options["int4"][1] for i in items}
    # Every upgraded node is more sensitive per bit than the median node.
    per_bit = {i.name: damage_of[i.name] / i.weights for i in items}
    assert min(per_bit[n] for n in upgraded) > np.median(list(per_bit.values()))
    assert plan.predicted_kl < uniform_plan(items, "int4").predicted_kl


def test_the_smallest_budget_gives_uniform_int4_and_a_large_one_gives_float():
    items = _items([0.1, 0.01, 0.001])
    assert set(plan_precisions(items, budget_bits=4.25).assignments.values()) == {"int4"}
    assert set(plan_precisions(items, budget_bits=32).assignments.values()) == {"float"}


def test_prefers_int8_over_float_when_int8_is_almost_as_good():
    items = [PlanItem("big", 1000, {"int4": (4.25, 1.0), "int8": (8.25, 0.001), "float": (32.0, 0.0)}),
             PlanItem("small", 1000, {"int4": (4.25, 0.0001), "int8": (8.25, 0.0), "float": (32.0, 0.0)})]
    plan = plan_precisions(items, budget_bits=20)  # float for "big" would fit, but int8 + ... is enough
    assert plan.assignments["big"] in ("int8", "float")
    plan = plan_precisions(items, budget_bits=6.25)
    assert plan.assignments == {"big": "int8", "small": "int4"}


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    items = _items(list(rng.lognormal(-5, 1.5, size=6)), sizes=list(rng.integers(100, 3000, size=6)),
                   damage8_ratio=float(rng.uniform(0.001, 0.3)))
    budget = float(rng.uniform(4.3, 12))
    plan = plan_precisions(items, budget_bits=budget, resolution=20000)
    best = math.inf
    total = sum(i.weights for i in items)
    for choice in itertools.product(("int4", "int8", "float"), repeat=len(items)):
        bits = sum(i.weights * i.options[c][0] for i, c in zip(items, choice))
        if bits <= budget * total:
            best = min(best, sum(i.options[c][1] for i, c in zip(items, choice)))
    assert plan.predicted_kl <= best * (1 + 1e-6) + 2e-3 * best  # optimal up to the rounding of costs
    assert plan.average_bits <= budget + 1e-12


def test_target_ratio_gives_the_smallest_plan_under_the_target():
    items = _items([0.02, 0.01, 0.005, 0.001])
    plan = plan_precisions(items, target_ratio=math.exp(0.02))
    assert plan.predicted_kl <= 0.02 + 1e-12
    assert plan.average_bits < 8.25
    assert plan_precisions(items, target_ratio=1.0).predicted_kl == 0.0
    with pytest.raises(GraphqError, match="at least 1"):
        plan_precisions(items, target_ratio=0.9)


def test_budget_below_the_smallest_precision_is_a_clear_error():
    with pytest.raises(GraphqError, match=r"below the smallest plan for this model \(4.25000 bits per weight, every node at int4\)"):
        plan_precisions(_items([0.1, 0.2]), budget_bits=4.0)
    with pytest.raises(GraphqError, match="exactly one"):
        plan_precisions(_items([0.1]))
    with pytest.raises(GraphqError, match="exactly one"):
        plan_precisions(_items([0.1]), budget_bits=5, target_ratio=1.1)


def test_pareto_front_is_monotone_from_int4_to_float():
    items = _items(list(np.random.default_rng(1).lognormal(-6, 2, size=20)))
    front = pareto_front(items)
    bits = [b for b, _ in front]
    damage = [d for _, d in front]
    assert bits == sorted(bits) and damage == sorted(damage, reverse=True)
    assert bits[0] == pytest.approx(4.25) and damage[0] == pytest.approx(uniform_plan(items, "int4").predicted_kl)
    assert damage[-1] == 0.0


def test_plans_naming_unknown_nodes_or_precisions_are_refused(tmp_path):
    names = ["a", "b", "c"]
    assert check_plan({"a": "int4", "b": "int8"}, names) == {"a": "int4", "b": "int8", "c": "float"}
    with pytest.raises(GraphqError, match=r"names 2 node\(s\) that are not quantizable MatMuls of the model: 'x', 'y'"):
        check_plan({"a": "int4", "x": "int8", "y": "float"}, names)
    with pytest.raises(GraphqError, match="unknown precision"):
        check_plan({"a": "int3"}, names)
    with pytest.raises(GraphqError, match="not among"):
        evaluate_plan([PlanItem("a", 1, {"int4": (4.25, 0.1)})], {"a": "int8"})


def test_plan_files_round_trip(tmp_path):
    items = _items([0.1, 0.01])
    plan = plan_precisions(items, budget_bits=6.25, model_sha256="ab" * 32)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    loaded = load_plan(path)
    assert loaded.assignments == plan.assignments and loaded.model_sha256 == plan.model_sha256
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"n0": "int8"}))
    assert load_plan(bare).assignments == {"n0": "int8"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n0": 8}))
    with pytest.raises(GraphqError, match="map node names to precisions"):
        load_plan(bad)
    with pytest.raises(GraphqError, match="no such plan file"):
        load_plan(tmp_path / "missing.json")
