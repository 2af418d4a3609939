"""Precision planning: int4 / int8 / float per MatMul under a size budget, from measured damage.

Each analysed node ``n`` has ``w_n`` weights and, per allowed precision ``c``, nominal bits per weight
``b_n(c)`` (:func:`~graphq.numerics.sensitivity.bits_per_weight`: for ``K = 576``, 4.076 for int4 g128
and 4.528 for int4-g32-fzp (q8-pow2 scales), 8.125 for int8 g128, 32 for float; a tied head's group
follows its embedding) and a damage ``d_n(c)``, the mean KL
of :mod:`graphq.sensitivity` (``d_n(float) = 0``). A plan picks one ``c_n`` per node:

    size  S = sum_n w_n b_n(c_n)            average bits  S / W,  W = sum_n w_n
    damage D = sum_n d_n(c_n)

(every weight counted once: a head tied to the embedding is one matrix). Summing per-node damages
assumes the nodes' errors act independently (to second order the KL of a sum of small independent
perturbations is the sum of their KLs); the report compares the prediction with measurements.

**Budget** (``budget_bits``): minimise ``D`` subject to ``S <= budget_bits W``, a multiple-choice
knapsack. Dynamic programming over the spare bits ``S - S_min`` (``S_min``: every node at its
cheapest precision) in ``resolution`` equal units, each option's extra cost rounded *up* to whole
units (so the plan never exceeds the budget), gives the optimum up to that rounding.
**Target** (``target_ratio``): the smallest plan whose predicted perplexity ratio ``exp(D)`` is at most
the target (``KL`` as the estimate of the log-perplexity increase), from the same table over the
whole range ``S_min .. S_max``. The table's last row is the Pareto front of size versus predicted
damage (:func:`pareto_front`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from graphq.errors import GraphqError
from graphq.numerics.sensitivity import FLOAT_BITS, PRECISIONS

PLAN_FORMAT_VERSION = 1
PLAN_KIND = "graphq-precision-plan"
DEFAULT_PRECISIONS = ("int4", "int4-g32-asym", "int4-g32-fzp", "int8", "float")
DEFAULT_RESOLUTION = 20000


@dataclasses.dataclass(frozen=True)
class PlanItem:
    """One node as the planner sees it: weights, and per precision (bits per weight, damage)."""

    name: str
    weights: int
    options: Mapping[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    assignments: Mapping[str, str]  # node name -> precision
    weights: int
    total_bits: float
    predicted_kl: float
    budget_bits: float | None = None
    target_ratio: float | None = None
    model_sha256: str | None = None
    # A tied head quantized in two row tiers: node name -> its hot rows (graphq.numerics.head_rows), from the
    # analysis the plan came from; applied when the head's precision is below theirs.
    hot_rows: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def average_bits(self) -> float:
        return self.total_bits / self.weights if self.weights else 0.0

    @property
    def predicted_ratio(self) -> float:
        return math.exp(self.predicted_kl)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for precision in self.assignments.values():
            found[precision] = found.get(precision, 0) + 1
        return found

    def to_json(self) -> dict:
        return {"kind": PLAN_KIND, "format_version": PLAN_FORMAT_VERSION, "model_sha256": self.model_sha256,
                "budget_bits": self.budget_bits, "target_ratio": self.target_ratio,
                "average_bits": self.average_bits, "weights": self.weights, "total_bits": self.total_bits,
                "predicted_kl": self.predicted_kl if math.isfinite(self.predicted_kl) else None,  # None: no analysis
                "counts": self.counts(), "plan": dict(self.assignments),
                **({"hot_rows": {name: list(rows) for name, rows in self.hot_rows.items()}} if self.hot_rows else {})}


def items_from_analysis(analysis, precisions: Sequence[str] = DEFAULT_PRECISIONS) -> list[PlanItem]:
    """Planner items from a :class:`~graphq.sensitivity.Analysis` (float costs 32 bits, no damage)."""
    _check_precisions(precisions)
    items = []
    for node in analysis.nodes:
        options = {}
        for precision in precisions:
            if precision == "float":
                options[precision] = (FLOAT_BITS, 0.0)
            elif precision in node.damage:
                damage = node.damage[precision]
                options[precision] = (damage.bits, max(damage.kl, 0.0))
            else:
                raise GraphqError(f"the analysis has no {precision} damage for {node.name} "
                                  f"(analysed precisions: {', '.join(node.damage)}); analyse with that precision")
        items.append(PlanItem(node.name, node.weights, options))
    return items


def _check_precisions(precisions: Sequence[str]) -> None:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise GraphqError(f"unknown precision(s) {unknown} (known: {', '.join(PRECISIONS)})")


def _bounds(items: Sequence[PlanItem]) -> tuple[int, float, float]:
    weights = sum(item.weights for item in items)
    low = sum(item.weights * min(b for b, _ in item.options.values()) for item in items)
    high = sum(item.weights * max(b for b, _ in item.options.values()) for item in items)
    return weights, low, high


def _units(extra_bits: float, spare_bits: float, resolution: int) -> int:
    """Extra bits in whole units of ``spare_bits / resolution``, rounded up (none spare: only 0 fits)."""
    if extra_bits <= 0:
        return 0
    if spare_bits <= 0:
        return resolution + 1
    return math.ceil(extra_bits * resolution / spare_bits - 1e-9)


def _knapsack(items: Sequence[PlanItem], spare_bits: float, resolution: int) -> tuple[np.ndarray, list[np.ndarray], list[list[str]]]:
    """``best[u]``: least damage with extra cost <= u units; per item the chosen option per capacity."""
    best = np.zeros(resolution + 1)
    choices, names = [], []
    for item in items:
        cheapest = min(b for b, _ in item.options.values())
        options = list(item.options.items())
        costs = [_units(item.weights * (bits - cheapest), spare_bits, resolution) for _, (bits, _) in options]
        candidates = np.full((len(options), resolution + 1), np.inf)
        for j, (cost, (_, (_, damage))) in enumerate(zip(costs, options)):
            if cost <= resolution:
                candidates[j, cost:] = best[: resolution + 1 - cost] + damage
        choice = np.argmin(candidates, axis=0)
        best = candidates[choice, np.arange(resolution + 1)]
        choices.append(choice.astype(np.int8))
        names.append([name for name, _ in options])
    return best, choices, names


def _backtrack(items: Sequence[PlanItem], choices: list[np.ndarray], names: list[list[str]], spare_bits: float,
               resolution: int, capacity: int) -> dict[str, str]:
    plan = {}
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        precision = names[index][int(choices[index][capacity])]
        plan[item.name] = precision
        cheapest = min(b for b, _ in item.options.values())
        capacity -= _units(item.weights * (item.options[precision][0] - cheapest), spare_bits, resolution)
    return {item.name: plan[item.name] for item in items}


def evaluate_plan(items: Sequence[PlanItem], assignments: Mapping[str, str], **fields) -> PrecisionPlan:
    """Size and predicted damage of ``assignments`` (every item must be assigned an allowed precision)."""
    total = damage = 0.0
    for item in items:
        precision = assignments[item.name]
        if precision not in item.options:
            raise GraphqError(f"precision '{precision}' for {item.name} is not among {', '.join(item.options)}")
        bits, kl = item.options[precision]
        total += item.weights * bits
        damage += kl
    return PrecisionPlan(dict(assignments), sum(i.weights for i in items), total, damage, **fields)


def plan_precisions(items: Sequence[PlanItem], *, budget_bits: float | None = None, target_ratio: float | None = None,
                    resolution: int = DEFAULT_RESOLUTION, model_sha256: str | None = None,
                    hot_rows: Mapping[str, tuple[int, ...]] | None = None) -> PrecisionPlan:
    """The least-damage plan within ``budget_bits`` per weight, or the smallest plan whose predicted
    perplexity ratio is at most ``target_ratio`` (module docstring)."""
    if (budget_bits is None) == (target_ratio is None):
        raise GraphqError("give exactly one of a bits budget (--budget-bits) or a target perplexity ratio (--target-ratio)")
    if not items:
        raise GraphqError("nothing to plan: no quantizable nodes")
    weights, low, high = _bounds(items)
    fields = {"budget_bits": budget_bits, "target_ratio": target_ratio, "model_sha256": model_sha256,
              "hot_rows": dict(hot_rows or {})}
    if budget_bits is not None:
        if not math.isfinite(budget_bits) or budget_bits * weights < low - 1e-6 * weights:
            cheapest = "; ".join(sorted({min(i.options, key=lambda p: i.options[p][0]) for i in items}))
            raise GraphqError(f"budget {budget_bits} bits per weight is below the smallest plan for this model "
                              f"({low / weights:.5f} bits per weight, every node at {cheapest})")
        if budget_bits * weights >= high:  # everything fits: each node's least damage (the cheaper on ties)
            return evaluate_plan(items, {i.name: min(i.options, key=lambda p: (i.options[p][1], i.options[p][0]))
                                         for i in items}, **fields)
        spare = budget_bits * weights - low
        best, choices, names = _knapsack(items, spare, resolution)
        return evaluate_plan(items, _backtrack(items, choices, names, spare, resolution, resolution), **fields)
    if not target_ratio >= 1.0:
        raise GraphqError(f"the target perplexity ratio must be at least 1, got {target_ratio}")
    spare = high - low
    best, choices, names = _knapsack(items, spare, resolution)
    capacity = int(np.argmax(best <= math.log(target_ratio) + 1e-12))
    return evaluate_plan(items, _backtrack(items, choices, names, spare, resolution, capacity), **fields)


def pareto_front(items: Sequence[PlanItem], *, max_bits: float | None = None, resolution: int = 2000
                 ) -> list[tuple[float, float]]:
    """(average bits per weight, least predicted KL) for budgets from the smallest plan up to
    ``max_bits`` (default: the largest), keeping only points that lower the damage."""
    weights, low, high = _bounds(items)
    top = high if max_bits is None else min(max(max_bits * weights, low), high)
    spare = top - low
    best, _, _ = _knapsack(items, spare, resolution)
    unit = spare / resolution if spare > 0 else 0.0
    front = []
    for capacity, damage in enumerate(best):
        if not front or damage < front[-1][1] - 1e-15:
            front.append(((low + capacity * unit) / weights, float(damage)))
    return front


def uniform_plan(items: Sequence[PlanItem], precision: str, **fields) -> PrecisionPlan:
    return evaluate_plan(items, {item.name: precision for item in items}, **fields)


def check_plan(assignments: Mapping[str, str], node_names: Sequence[str], *, source: str = "the plan") -> dict[str, str]:
    """A complete plan over ``node_names`` from a user plan: unknown nodes or precisions are errors;
    nodes it leaves out stay float (as in a W8A8 plan)."""
    known = set(node_names)
    unknown = [name for name in assignments if name not in known]
    if unknown:
        shown = ", ".join(f"'{n}'" for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise GraphqError(f"{source} names {len(unknown)} node(s) that are not quantizable MatMuls of the model: {shown}")
    bad = sorted({p for p in assignments.values() if p not in PRECISIONS})
    if bad:
        raise GraphqError(f"{source} uses unknown precision(s) {bad} (known: {', '.join(PRECISIONS)})")
    return {name: assignments.get(name, "float") for name in node_names}


def load_plan(path: str | os.PathLike) -> PrecisionPlan:
    """A plan file: ``{"plan": {node: precision}, ...}`` as written by ``graphq plan`` / ``to_json``, or a
    bare ``{node: precision}`` mapping."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise GraphqError(f"{path}: no such plan file") from error
    except (OSError, ValueError) as error:
        raise GraphqError(f"{path}: cannot read the plan ({str(error).splitlines()[0]})") from error
    if not isinstance(data, dict):
        raise GraphqError(f"{path}: a plan file must hold a mapping")
    if data.get("kind") == PLAN_KIND:
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise GraphqError(f"{path}: plan format_version {data.get('format_version')} is not supported")
        assignments = data.get("plan")
        sha = data.get("model_sha256")
        hot = data.get("hot_rows", {})
    else:
        assignments, sha, hot = data, None, {}
    if not isinstance(assignments, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in assignments.items()):
        raise GraphqError(f"{path}: the plan must map node names to precisions (strings)")
    if not isinstance(hot, dict) or not all(isinstance(rows, list) and all(isinstance(r, int) and r >= 0 for r in rows)
                                            for rows in hot.values()):
        raise GraphqError(f"{path}: hot_rows must map node names to lists of row ids")
    return PrecisionPlan(assignments, 0, 0.0, 0.0, model_sha256=sha, hot_rows={k: tuple(v) for k, v in hot.items()})
