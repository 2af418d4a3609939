"""Inspection report: plots of a sensitivity analysis and a precision plan, one self-contained HTML file,
and a copy of the model whose nodes carry their precision, sensitivity and scales as ONNX metadata.

Plots (matplotlib, Agg backend; each function returns its ``Figure``, embedded as an inline PNG):

- activation range per layer: ``max |x|`` and std of the residual stream entering each block, and
  ``max |x|`` of each MatMul input kind (attention input, ``o_proj`` input, MLP input, ``down_proj``
  input), log scale;
- outlier channels: ``log10 max |x[..., c]|`` of the residual stream, layers x hidden channels (the
  structured outliers of seed 001 show up as bright columns);
- sensitivity per node: the mean KL of each node quantized alone (int4 and the other analysed
  precisions; estimated values hollow), graph order;
- chosen precision per node: layers x projections, coloured by precision;
- the Pareto front of size versus predicted damage (:func:`graphq.planner.pareto_front`), with the
  uniform plans, the chosen plan and, when given, measured perplexity ratios of real models;
- the perturbation lens: damage of the quantizer next to matched Gaussian and uniform noise.

Node metadata (``NodeProto.metadata_props``, shown by Netron in the node's properties):
``graphq.precision``, ``graphq.bits_per_weight``, ``graphq.kl.<precision>``, ``graphq.nll_delta.<precision>``,
``graphq.scales`` (|scale| summary of the node's quantizer), ``graphq.lens``
(:func:`graphq.mixed.node_metadata`). A mixed-precision output already carries them; ``inspect``
writes them into a copy of the inspected model (``report/model.onnx``).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from graphq.errors import GraphqError, OutputPathError

logger = logging.getLogger(__name__)

PRECISION_COLOURS = {"int4": "#4C72B0", "int4-g32-asym": "#55A868", "int4-g32-fzp": "#8172B3", "int8": "#DD8452", "float": "#C44E52"}
INPUT_KINDS = (("q_proj", "attention input (q/k/v)"), ("o_proj", "o_proj input"), ("gate_proj", "MLP input (gate/up)"),
               ("down_proj", "down_proj input"))


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    budget_bits: float = 4.5
    dpi: int = 110
    top_nodes: int = 20

    def __post_init__(self) -> None:
        if self.dpi < 20 or self.top_nodes < 1:
            raise GraphqError("report dpi must be >= 20 and top_nodes >= 1")


@dataclasses.dataclass(frozen=True)
class ReportResult:
    html: Path
    model: Path | None
    figures: tuple[str, ...]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _layers(analysis) -> int:
    blocks = [n.block for n in analysis.nodes if n.block is not None]
    return max(blocks) + 1 if blocks else 0


def plot_activation_ranges(analysis):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    residual = [r for r in analysis.residual if r.block is not None]
    if residual:
        ax.plot([r.block for r in residual], [r.abs_max for r in residual], "k-o", ms=3, label="residual stream max |x|")
        ax.plot([r.block for r in residual], [r.std for r in residual], "k--", lw=1, label="residual stream std")
    for role, label in INPUT_KINDS:
        points = sorted((t.block, t.abs_max) for t in analysis.activations
                        if t.block is not None and any(n.split("/")[-2] == role for n in t.nodes))
        if points:
            ax.plot(*zip(*points), "-", marker=".", label=f"{label} max |x|")
    ax.set_yscale("log")
    ax.set_title("Activation range per layer")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |x| and std (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_outlier_heatmap(analysis):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    rows = [r for r in analysis.residual]
    if rows:
        matrix = np.log10(np.maximum(np.array([r.channel_abs_max for r in rows]), 1e-6))
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma")
        fig.colorbar(image, ax=ax, label="log10 max |x| per channel")
        labels = [str(r.block) if r.block is not None else "final norm" for r in rows]
        step = max(1, len(rows) // 10)
        ax.set_yticks(range(0, len(rows), step), labels[::step])
        outliers = sorted({c for r in rows for c in r.outlier_channels})
        if outliers and len(outliers) <= 12:
            ax.set_xticks(outliers, [str(c) for c in outliers], rotation=90, fontsize=7)
    ax.set_title("Outlier channels of the residual stream")
    ax.set_xlabel("hidden channel (labels: outlier channels)")
    ax.set_ylabel("residual stream entering layer")
    fig.tight_layout()
    return fig


def plot_sensitivity(analysis):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    roles = list(dict.fromkeys(n.role for n in analysis.nodes))
    colours = plt.get_cmap("tab10")
    for p_index, precision in enumerate(analysis.config.precisions):
        for r_index, role in enumerate(roles):
            points = [(i, n.damage[precision]) for i, n in enumerate(analysis.nodes) if n.role == role and precision in n.damage]
            if not points:
                continue
            x = [i for i, _ in points]
            y = [max(d.kl, 1e-9) for _, d in points]
            filled = [d.measured for _, d in points]
            marker = "o" if p_index == 0 else "^"
            colour = colours(r_index % 10)
            ax.scatter([a for a, f in zip(x, filled) if f], [b for b, f in zip(y, filled) if f], s=14, marker=marker,
                       color=colour, label=f"{role} {precision}")
            if not all(filled):
                ax.scatter([a for a, f in zip(x, filled) if not f], [b for b, f in zip(y, filled) if not f], s=10,
                           marker=marker, facecolors="none", edgecolors=colour, linewidths=0.6)
    ax.set_yscale("log")
    ax.set_title("Sensitivity per node (each quantized alone; hollow: estimated)")
    ax.set_xlabel("node (graph order: layer 0 ... last layer, LM head)")
    ax.set_ylabel("mean KL vs float (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    return fig


def plot_plan(analysis, assignments: Mapping[str, str]):
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    roles = list(dict.fromkeys(n.role for n in analysis.nodes if n.block is not None))
    others = [n for n in analysis.nodes if n.block is None]
    layers = _layers(analysis)
    order = list(PRECISION_COLOURS)
    grid = np.full((layers + (1 if others else 0), max(len(roles), 1)), np.nan)
    for node in analysis.nodes:
        precision = assignments.get(node.name)
        if precision is None:
            continue
        if node.block is not None:
            grid[node.block, roles.index(node.role)] = order.index(precision)
        else:
            grid[layers, :] = order.index(precision)
    fig, ax = plt.subplots(figsize=(6, 7))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(list(PRECISION_COLOURS.values())),
              vmin=-0.5, vmax=len(order) - 0.5)
    ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right")
    labels = [str(i) for i in range(layers)] + (["LM head"] if others else [])
    step = max(1, len(labels) // 16)
    ticks = list(range(0, layers, step)) + ([layers] if others else [])
    ax.set_yticks(ticks, [labels[t] for t in ticks])
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=p) for p, c in PRECISION_COLOURS.items()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Chosen precision per node")
    ax.set_xlabel("projection")
    ax.set_ylabel("decoder layer")
    fig.tight_layout()
    return fig


def plot_pareto(front: Sequence[tuple[float, float]], marked: Mapping[str, tuple[float, float]],
                measured: Sequence[Mapping] = ()):
    """``front``: (bits, predicted KL); ``marked``: label -> (bits, predicted KL); ``measured``: dicts with
    ``label``, ``average_bits``, ``perplexity``, ``float_perplexity``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if front:
        ax.plot([b for b, _ in front], [max(k, 1e-9) for _, k in front], "-", color="#555", lw=1.2,
                label="Pareto front (planner, predicted)")
    for label, (bits, kl) in marked.items():
        ax.scatter([bits], [max(kl, 1e-9)], s=40, zorder=3, label=f"{label} (predicted)")
    ax.set_yscale("log")
    ax.set_title("Size versus damage of candidate plans")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("predicted KL (sum over nodes, log scale)")
    ax.grid(alpha=0.3, which="both")
    if measured:
        twin = ax.twinx()
        for point in measured:
            ratio = point["perplexity"] / point["float_perplexity"]
            twin.scatter([point["average_bits"]], [ratio], marker="*", s=90, zorder=4)
            twin.annotate(f"{point['label']} {ratio:.3f}x", (point["average_bits"], ratio), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
        twin.set_ylabel("measured perplexity / float (stars)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_lens(analysis):
    plt = _pyplot()
    lensed = [n for n in analysis.nodes if n.lens]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = np.arange(len(lensed))
    for offset, (key, label) in zip((-0.27, 0, 0.27), (("real", "quantizer (int4 RTN)"), ("gaussian", "Gaussian, same variance"),
                                                       ("uniform", "uniform, same variance"))):
        ax.bar(x + offset, [max(n.lens[key], 1e-9) for n in lensed], width=0.27, label=label)
    ax.set_xticks(x, [n.name.replace("/model/", "").replace("/MatMul", "") for n in lensed], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_title("Perturbation lens: quantizer error versus matched noise")
    ax.set_xlabel("node")
    ax.set_ylabel("mean KL vs float (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _png(fig, dpi: int) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def build_figures(analysis, assignments: Mapping[str, str], front, marked, measured=()) -> dict[str, object]:
    """Every report figure by title (matplotlib Figures; the caller closes them)."""
    figures = {}
    for make in (lambda: plot_activation_ranges(analysis), lambda: plot_outlier_heatmap(analysis),
                 lambda: plot_sensitivity(analysis), lambda: plot_plan(analysis, assignments),
                 lambda: plot_pareto(front, marked, measured)):
        fig = make()
        figures[fig.axes[0].get_title()] = fig
    if any(n.lens for n in analysis.nodes):
        fig = plot_lens(analysis)
        figures[fig.axes[0].get_title()] = fig
    return figures


def render_html(analysis, plan, figures: Mapping[str, object], *, dpi: int, top_nodes: int, measured=()) -> str:
    ranked = sorted(analysis.nodes, key=lambda n: -n.damage["int4"].kl)
    others = [p for p in analysis.config.precisions if p != "int4"]
    top = _table(["node", "int4 KL", *(f"{p} KL" for p in others), "int4 NLL delta", "int4 local error", "plan"],
                 [[n.name, n.damage["int4"].kl, *(n.damage[p].kl for p in others), n.damage["int4"].nll_delta,
                   n.damage["int4"].local_error, plan.assignments.get(n.name, "")] for n in ranked[:top_nodes]])
    counts = ", ".join(f"{count} {p}" for p, count in sorted(plan.counts().items()))
    summary = _table(["quantity", "value"], [
        ["model", analysis.model_path], ["model sha256", analysis.model_sha256[:16] + "..."],
        ["calibration", f"{analysis.config.windows} windows x {analysis.config.window_tokens} tokens of wiki.valid.tokens"],
        ["analysis time", f"{analysis.timing['seconds']} s wall, {analysis.timing['cpu_seconds']} s CPU, "
                          f"{analysis.timing['replays']} replays"],
        ["plan", f"{counts}; {plan.average_bits:.4f} bits per weight" + (f" (budget {plan.budget_bits})" if plan.budget_bits else "")],
        ["predicted KL / ppl ratio", f"{plan.predicted_kl:.4g} / {math.exp(plan.predicted_kl):.4f}x"
                                     if plan.predicted_kl == plan.predicted_kl else "n/a"],
    ])
    lens_rows = [[n.name, n.lens["error_rms"], n.lens["real"], n.lens["gaussian"], n.lens["uniform"]]
                 for n in analysis.nodes if n.lens]
    lens = _table(["node", "int4 error rms", "KL quantizer", "KL Gaussian", "KL uniform"], lens_rows) if lens_rows else ""
    outliers = _table(["residual entering", "max |x|", "std", "max/std", "kurtosis", "outlier channels"],
                      [[r.block if r.block is not None else "final norm", r.abs_max, r.std, r.range_ratio, r.kurtosis,
                        " ".join(map(str, r.outlier_channels[:8]))] for r in analysis.residual])
    measured_table = _table(["model", "bits per weight", "perplexity", "ratio to float"],
                            [[m["label"], m["average_bits"], m["perplexity"], m["perplexity"] / m["float_perplexity"]]
                             for m in measured]) if measured else ""
    sections = []
    for title, fig in figures.items():
        sections.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig, dpi)}">'
                        f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
             "font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-weight:bold}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>graphq report: {html.escape(analysis.model_path)}"
            f"</title><style>{style}</style></head><body><h1>graphq inspection report</h1>{summary}"
            f"{'<h2>Measured</h2>' + measured_table if measured_table else ''}"
            f"<h2>Plots</h2>{''.join(sections)}<h2>Most sensitive nodes</h2>{top}"
            f"{'<h2>Perturbation lens</h2>' + lens if lens else ''}<h2>Residual stream</h2>{outliers}</body></html>\n")


def annotate(model, analysis, assignments: Mapping[str, str]) -> int:
    """Write each planned node's metadata into ``model`` (an onnx_ir Model; MatMul or its emitted
    ``<name>_Q<bits>`` MatMulNBits). Returns how many nodes were annotated."""
    from graphq.mixed import node_metadata

    analysed = {n.name: n for n in analysis.nodes} if analysis is not None else {}
    by_name = {node.name: node for node in model.graph}
    count = 0
    for name, precision in assignments.items():
        node = by_name.get(name) or next((by_name[f"{name}_Q{b}"] for b in (4, 8, 2) if f"{name}_Q{b}" in by_name), None)
        if node is None:
            continue
        node.metadata_props.update({k: v for k, v in node_metadata(precision, analysed.get(name)).items()
                                    if k not in node.metadata_props or k.startswith("graphq.kl")})
        applied = node.op_type != "MatMul" or precision == "float"
        node.metadata_props["graphq.applied"] = "yes" if applied else "no: the plan's precision; this node is float here"
        count += 1
    return count


def _plan_of_output(model) -> dict[str, str] | None:
    """The plan a graphq mixed-precision output records in its node metadata (None for other models)."""
    if "graphq.plan" not in model.metadata_props:
        return None
    plan = {}
    for node in model.graph:
        precision = node.metadata_props.get("graphq.precision")
        if precision is not None:
            name = node.name
            for suffix in ("_Q4", "_Q8", "_Q2"):
                if node.op_type == "MatMulNBits" and name.endswith(suffix):
                    name = name[: -len(suffix)]
            plan[name] = precision
    return plan


def write_report(model: str | os.PathLike, output: str | os.PathLike, config: ReportConfig = ReportConfig(), *,
                 analysis=None, plan=None, measured=None, annotate_model: bool = True, overwrite: bool = False,
                 progress: bool = True) -> ReportResult:
    """``output/index.html`` (self-contained) and, unless ``annotate_model`` is False, ``output/model.onnx``."""
    from graphq.modelio import check_output_path, load_model, resolve_model_file, save_model
    from graphq.planner import (check_plan, evaluate_plan, items_from_analysis, load_plan, pareto_front, plan_precisions,
                                uniform_plan)
    from graphq.sensitivity import analyze_model, load_analysis, model_digest

    source = resolve_model_file(model)
    output = Path(output)
    check_output_path(output, [source, source.parent])
    if output.exists() and not overwrite:
        raise OutputPathError(f"report folder {output} already exists; pass --overwrite to replace it")
    graph = load_model(source)
    recorded = _plan_of_output(graph)
    if isinstance(analysis, (str, os.PathLike)):
        analysis = load_analysis(analysis)
    if analysis is None:
        if recorded is not None:
            raise GraphqError(f"{source} is a graphq mixed-precision output; pass --analysis with the analysis of its float source")
        analysis = analyze_model(source, progress=progress)
    elif recorded is None and analysis.model_sha256 != model_digest(source):
        raise GraphqError(f"the analysis is of another model ({analysis.model_path}), not of {source}")
    precisions = tuple(dict.fromkeys([*analysis.config.precisions, "float"]))
    items = items_from_analysis(analysis, precisions)
    names = [n.name for n in analysis.nodes]
    if plan is not None:
        plan = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
        chosen = evaluate_plan(items, check_plan(plan.assignments, names), budget_bits=plan.budget_bits)
    elif recorded is not None:
        chosen = evaluate_plan(items, check_plan(recorded, names, source=f"the plan recorded in {source}"))
    else:
        chosen = plan_precisions(items, budget_bits=config.budget_bits, model_sha256=analysis.model_sha256,
                                 hot_rows={n.name: n.hot_rows for n in analysis.nodes if n.hot_rows})
    measured_points = []
    if measured is not None:
        try:
            measured_points = json.loads(Path(measured).read_text(encoding="utf-8"))
            assert isinstance(measured_points, list)
            for point in measured_points:
                float(point["average_bits"]), float(point["perplexity"]), float(point["float_perplexity"]), str(point["label"])
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
            raise GraphqError(f"{measured}: expected a JSON list of {{label, average_bits, perplexity, float_perplexity}} "
                              f"({error})") from error
    top = max(8.5, config.budget_bits + 0.5)
    front = pareto_front(items, max_bits=top)
    marked = {}
    for precision in analysis.config.precisions:
        uniform = uniform_plan(items, precision)
        marked[f"uniform {precision}"] = (uniform.average_bits, uniform.predicted_kl)
    marked["chosen plan"] = (chosen.average_bits, chosen.predicted_kl)
    figures = build_figures(analysis, chosen.assignments, front, marked, measured_points)
    page = render_html(analysis, chosen, figures, dpi=config.dpi, top_nodes=config.top_nodes, measured=measured_points)
    from graphq.modelio import staging_dir

    with staging_dir(output) as staging:
        folder = staging / "report"
        folder.mkdir()
        (folder / "index.html").write_text(page, encoding="utf-8")
        (folder / "plan.json").write_text(json.dumps(chosen.to_json(), indent=2) + "\n", encoding="utf-8")
        written_model = None
        if annotate_model:
            count = annotate(graph, analysis, chosen.assignments)
            graph.metadata_props["graphq.report"] = json.dumps({"analysis_sha256": analysis.model_sha256,
                                                                "annotated_nodes": count})
            save_model(graph, folder / "model.onnx")
            written_model = output / "model.onnx"
        if output.exists():
            shutil.rmtree(output)
        os.replace(folder, output)
    return ReportResult(output / "index.html", written_model, tuple(figures))
