"""The three notebooks: committed stripped and regenerable, and they run end to end.

* Static (milliseconds): every committed notebook has no outputs and no execution counts, its first
  code cell after the intro is tagged "parameters", and it is exactly what
  ``scripts/make_notebooks.py`` generates.
* Execution (a few minutes in all on 2 CPU cores): each notebook runs headless through nbclient on
  the bundled tiny OLMoE at the ``smoke`` budget, with the parameters overridden papermill-style (a
  cell tagged "injected-parameters" right after the "parameters" cell), fails on any cell error, and
  leaves its expected files. Skipped, with the reason, when the tiny model is not in the checkout.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_OLMoE_Baseline", "02_OLMoE_BenjaminiHochberg_Routing", "03_OLMoE_Full_Routing_Experiments")
TINY_WEIGHTS = REPO / "bh_routing" / "assets" / "tiny-olmoe" / "model.safetensors"
CELL_TIMEOUT_S = 600

# what each notebook must leave in <OUT>/<notebook folder>/tiny_smoke/
EXPECTED = {
    "01_OLMoE_Baseline": ("01_baseline", [
        "baseline_routing_stats.csv", "baseline_summary.json", "BASELINE_REPORT.md", "expert_usage.csv",
        "weight_concentration.csv", "router_logits.png", "expert_usage_heatmap.png", "entropy_across_layers.png",
        "weight_concentration.png", "mass_left_out.png", "coactivation.png", "specialisation.png", "domain_usage.png"]),
    "02_OLMoE_BenjaminiHochberg_Routing": ("02_bh_deep_dive", [
        "bh_routing_results.json", "comparative_results.csv", "RESULTS.md", "bh_explained.png", "naive_pvalues.png",
        "alpha_sensitivity.png", "temperature_sensitivity.png", "token_expert_counts.png", "comparison_nll.png",
        "utilisation_bh.png", "maxk_alpha_experts.png", "maxk_alpha_perplexity.png", "maxk_saturation.png",
        "maxk_vs_topk.png", "sweep/results.jsonl", "sweep/REPORT.md"]),
    "03_OLMoE_Full_Routing_Experiments": ("03_full_experiments", [
        "full_routing_results.csv", "comparison.csv", "runs.csv", "REPORT.md", "results.jsonl", "domains.csv",
        "analysis_summary.json", "notebook_summary.json", "pareto_domains.png", "experts_by_domain.png"]),
}


def load_notebook(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def inject_parameters(nb, **params):
    """Papermill's convention: a cell tagged "injected-parameters" right after the "parameters" cell."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "# Parameters injected by the test\n" + "\n".join(f"{key} = {value!r}" for key, value in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell["id"] = "injected-parameters"
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def execute(nb, cwd: Path, timeout: int = CELL_TIMEOUT_S):
    """Run every cell in a fresh python3 kernel (offline, 2 threads); raises on the first error."""
    from nbclient import NotebookClient
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
           # one intra-op thread unless the caller says otherwise: on a shared 2-core machine, 2 OpenMP
           # threads stall at every barrier while the other core is busy (10x slower, measured)
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            allow_errors=False)
    client.execute(env=env)  # passed on to the kernel's launch
    return nb


# --------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped_and_parameterised(name):
    nb = load_notebook(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs; strip them (regenerate with scripts/make_notebooks.py)"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    assert nb.cells[0].cell_type == "markdown", f"{name}: the notebook must open with its introduction"
    intro = nb.cells[0].source
    assert f"https://colab.research.google.com/github/bh-routing/bh_routing/blob/main/notebooks/{name}.ipynb" in intro
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{name}: the first code cell must be tagged 'parameters'"
    for parameter in ("MODEL", "BUDGET", "OUT", "DRIVE", "SEED"):
        assert f"\n{parameter} = " in "\n" + first_code.source, f"{name}: parameters cell lacks {parameter}"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def test_committed_notebooks_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    for key, name in generator.NAMES.items():
        committed = (NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8")
        assert committed == generator.render(key), (f"notebooks/{name}.ipynb differs from scripts/make_notebooks.py: "
                                                    "edit the generator and run it")


def test_injected_parameters_follow_the_parameters_cell():
    nb = inject_parameters(load_notebook(NAMES[0]), MODEL="tiny")
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    index = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[index + 1]
    assert "MODEL = 'tiny'" in nb.cells[index + 1].source


# --------------------------------------------------------------------------- execution


needs_tiny = pytest.mark.skipif(not TINY_WEIGHTS.exists(),
                                reason="the bundled tiny OLMoE (bh_routing/assets/tiny-olmoe/model.safetensors) is not "
                                       "in this checkout: train it with scripts/train_tiny_olmoe.py")
needs_kernel = pytest.mark.skipif(importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None,
                                  reason="executing notebooks needs nbclient and ipykernel (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    """One results root for the three notebooks, as users share it (02 and 03 reuse 01's calibration)."""
    return tmp_path_factory.mktemp("notebook_results")


@pytest.mark.slow   # minutes: `python -m pytest -q -m slow`
@needs_tiny
@needs_kernel
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_the_tiny_model(name, results_root, tmp_path):
    nb = inject_parameters(load_notebook(name), MODEL="tiny", BUDGET="smoke", OUT=str(results_root), DRIVE=False, SEED=0)
    started = time.time()
    execute(nb, cwd=tmp_path)
    seconds = time.time() - started
    folder_name, files = EXPECTED[name]
    folder = results_root / folder_name / "tiny_smoke"
    missing = [f for f in files if not (folder / f).exists()]
    assert not missing, f"{name} did not write {missing} in {folder}"
    archive = folder.with_suffix(".zip")
    assert archive.exists() and archive.stat().st_size > 0
    assert (results_root / "calibration" / "tiny.safetensors").exists()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    print(f"{name}: {seconds:.0f} s", file=sys.stderr)
