"""Inspection report: every figure has a title and labelled axes, the HTML embeds them, node metadata is
readable from the annotated model, and (where chromium is installed) the page renders, not blank."""

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from graphq.cli import main
from graphq.errors import GraphqError
from graphq.planner import items_from_analysis, pareto_front, plan_precisions
from graphq.report import build_figures, write_report
from graphq.sensitivity import AnalysisConfig, analyze_model

SMALL = AnalysisConfig(windows=3, window_tokens=32, batch=3, threads=1, measured_others=4, lens_nodes=2)


@pytest.fixture(scope="module")
def analysis(tiny_llama_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "analysis.json"
    return analyze_model(tiny_llama_onnx, SMALL, output=path, progress=False), path


def test_every_figure_has_a_title_and_labelled_axes(analysis):
    result, _ = analysis
    items = items_from_analysis(result, ("int4", "int8", "float"))
    plan = plan_precisions(items, budget_bits=5)
    figures = build_figures(result, plan.assignments, pareto_front(items, max_bits=9),
                            {"chosen plan": (plan.average_bits, plan.predicted_kl)},
                            [{"label": "w4", "average_bits": 4.3, "perplexity": 11.0, "float_perplexity": 10.0}])
    assert set(figures) == {"Activation range per layer", "Outlier channels of the residual stream",
                            "Sensitivity per node (each quantized alone; hollow: estimated)", "Chosen precision per node",
                            "Size versus damage of candidate plans", "Perturbation lens: quantizer error versus matched noise"}
    for title, fig in figures.items():
        ax = fig.axes[0]
        assert ax.get_title() == title and ax.get_xlabel() and ax.get_ylabel()
        assert ax.has_data() or ax.images
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)


def test_report_html_and_annotated_model(analysis, tiny_llama_onnx, tmp_path):
    result, path = analysis
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps([{"label": "w4-rtn", "average_bits": 4.3, "perplexity": 11, "float_perplexity": 10}]))
    out = tmp_path / "report"
    report = write_report(tiny_llama_onnx, out, analysis=path, measured=measured, progress=False)
    page = report.html.read_text()
    assert page.count("<img ") == 6 and page.count('src="data:image/png;base64,') == 6
    for title in report.figures:
        assert f"<figcaption>{title}</figcaption>" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    plan = json.loads((out / "plan.json").read_text())
    assert plan["average_bits"] <= 4.5
    model = onnx.load(str(report.model))
    annotated = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node if n.metadata_props}
    assert set(annotated) == {n.name for n in result.nodes}
    for node in result.nodes:
        meta = annotated[node.name]
        assert meta["graphq.precision"] == plan["plan"][node.name]
        assert float(meta["graphq.kl.int4"]) == pytest.approx(node.damage["int4"].kl, rel=1e-3, abs=1e-12)
        assert meta["graphq.applied"].startswith("no") == (plan["plan"][node.name] != "float")
        precision = plan["plan"][node.name]
        assert float(meta["graphq.bits_per_weight"]) == pytest.approx(32 if precision == "float" else node.damage[precision].bits, rel=1e-3)
        assert precision == "float" or meta["graphq.scales"].startswith("|s| min")
    with pytest.raises(GraphqError, match="already exists"):
        write_report(tiny_llama_onnx, out, analysis=path, progress=False)


def test_report_of_a_mixed_output_shows_its_plan(analysis, tiny_llama_onnx, tmp_path, capsys):
    _, path = analysis
    quantized = tmp_path / "q" / "model.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(quantized), "--recipe", "mixed", "--analysis", str(path),
                 "--budget-bits", "5", "--calib-windows", "2"]) == 0
    assert main(["inspect", str(quantized), "-o", str(tmp_path / "r")]) == 1
    assert "pass --analysis" in capsys.readouterr().err
    assert main(["inspect", str(quantized), "-o", str(tmp_path / "r"), "--analysis", str(path)]) == 0
    applied = json.loads((tmp_path / "q" / "model.graphq.json").read_text())["plan"]["plan"]
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["plan"] == applied


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(analysis, tiny_llama_onnx, tmp_path):
    from PIL import Image

    _, path = analysis
    report = write_report(tiny_llama_onnx, tmp_path / "page", analysis=path, annotate_model=False, progress=False)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", report.html.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20  # text and plots, not a blank page
    assert (pixels < 128).mean() > 0.01
