"""The three notebooks: jupytext sources, committed notebooks generated from them, and real runs.

* Static (well under a second): each committed ``notebooks/<name>.ipynb`` is exactly what
  ``jupytext --update --to ipynb notebooks/<name>.py`` makes of it (so it cannot drift from its
  source), has no outputs, opens with its introduction and a Colab badge derived from
  :data:`bh_routing.runtime.REPO_URL`, and its first code cell is the only one tagged "parameters".
* The install cell (seconds): run as a fresh Colab would run it, in a process where bh_routing is not
  importable, offline — from a wheel in the working folder, from a zip of the repository, from a
  local git repository given as REPO_URL, and with nothing to install from (a message saying what to
  do). pip is pointed at a scratch ``--target`` with no dependencies and no index, so nothing is
  downloaded and the test environment is untouched.
* Execution (minutes, ``-m slow``): each notebook runs headless through papermill (its own parameter
  injection) on the bundled tiny OLMoE at the ``smoke`` budget, with ipywidgets installed, with a
  timeout per cell, and leaves its expected files.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

from bh_routing import runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = runtime.NOTEBOOK_NAMES
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
        "analysis_summary.json", "pareto_domains.png", "experts_by_domain.png"]),
}


def load_notebook(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def code_cells(name: str) -> list[str]:
    """The code cells of a notebook's jupytext source, in order."""
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    return [cell.source for cell in source.cells if cell.cell_type == "code"]


# --------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_what_jupytext_makes_of_its_source(name, tmp_path):
    committed = NOTEBOOKS / f"{name}.ipynb"
    regenerated = tmp_path / committed.name
    shutil.copy(committed, regenerated)  # --update keeps the committed cell ids, so the bytes are stable
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--update", "--to", "ipynb",
                    str(NOTEBOOKS / f"{name}.py"), "-o", str(regenerated)], check=True)
    assert regenerated.read_bytes() == committed.read_bytes(), (
        f"notebooks/{name}.ipynb disagrees with notebooks/{name}.py: edit the .py and run "
        f"`jupytext --update --to ipynb notebooks/{name}.py`")


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped_and_parameterised(name):
    nb = load_notebook(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    assert nb.cells[0].cell_type == "markdown", f"{name}: the notebook must open with its introduction"
    assert runtime.colab_badge(name) in nb.cells[0].source, f"{name}: its Colab badge is not derived from REPO_URL"
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{name}: the first code cell must be tagged 'parameters'"
    for parameter in ("MODEL", "BUDGET", "OUT", "DRIVE", "SEED"):
        assert f"\n{parameter} = " in "\n" + first_code.source, f"{name}: parameters cell lacks {parameter}"
    assert f'\nREPO_URL = "{runtime.REPO_URL}"' in "\n" + first_code.source, f"{name}: REPO_URL differs from the package's"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


MAX_CODE_LINES, MAX_CELL_LINES, MAX_LINE_CHARS = 85, 12, 100


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_thin(name):
    """Configuration, calls and narrative: logic lives in the package. Code lines are non-blank,
    non-comment lines; the parameters and install cells are exempt from the per-cell limit (the
    install cell runs before the package exists, so it cannot call it)."""
    cells = code_cells(name)
    code = [[line for line in cell.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            for cell in cells]
    assert sum(map(len, code)) <= MAX_CODE_LINES, f"{name}: {sum(map(len, code))} code lines"
    long_cells = [lines[0] for cell, lines in zip(cells[1:], code[1:])
                  if len(lines) > MAX_CELL_LINES and not cell.startswith("# Install")]
    assert not long_cells, f"{name}: cells over {MAX_CELL_LINES} lines start with {long_cells}"
    long_lines = [line for cell in cells for line in cell.splitlines() if len(line) > MAX_LINE_CHARS]
    assert not long_lines, f"{name}: lines over {MAX_LINE_CHARS} characters: {long_lines}"


def test_readme_badges_derive_from_the_repository_url():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert runtime.colab_badge(name) in readme, f"README.md: the {name} badge is not runtime.colab_badge({name!r})"


def test_the_install_cell_is_the_same_in_every_notebook():
    cells = [next(c for c in code_cells(name) if c.startswith("# Install")) for name in NAMES]
    assert cells[0] == cells[1] == cells[2]


def test_colab_url_points_at_the_notebook_in_the_repository():
    assert (runtime.colab_url("01_OLMoE_Baseline", "https://github.com/someone/fork", "dev")
            == "https://colab.research.google.com/github/someone/fork/blob/dev/notebooks/01_OLMoE_Baseline.ipynb")


# --------------------------------------------------------------------------- the install cell, offline


@pytest.fixture(scope="module")
def local_repository(tmp_path_factory):
    """A git repository holding this checkout's committed tree (what `git+REPO_URL` fetches)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path_factory.mktemp("repository") / "bh_routing"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    return clone


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """A Python as a fresh runtime has it: bh_routing not importable, pip and setuptools are. A new venv
    without pip whose one extra path is this environment's site-packages, added as a plain path: its
    .pth files — an editable install of bh_routing among them (what the README's setup makes) — are
    not processed, its packages are importable."""
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "outer-site-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def run_install_cell(python: Path, cwd: Path, repo_url: str, target: Path) -> subprocess.CompletedProcess:
    """The install cell as a fresh runtime runs it (after the parameters cell), with pip confined to
    ``target``: no dependencies, no index, no build isolation — offline, and the venv is untouched."""
    cell = next(c for c in code_cells(NAMES[0]) if c.startswith("# Install"))
    program = f"REPO_URL = {repo_url!r}\nDRIVE = False\n" + cell
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"PIP_TARGET": str(target), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1",
            "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of --no-build-isolation
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([str(python), "-c", program], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def installed_location(target: Path) -> Path:
    """Where a process that sees ``target`` imports bh_routing from."""
    out = subprocess.run([sys.executable, "-c", "import bh_routing, sys; print(bh_routing.__file__)"],
                         env={**os.environ, "PYTHONPATH": str(target)}, cwd=target, capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip())


def test_install_cell_needs_bh_routing_unimportable_outside_a_checkout(fresh_python, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([str(fresh_python), "-c", "import importlib.util as u; print(u.find_spec('bh_routing'), "
                          "u.find_spec('pip') is not None)"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["None", "True"], f"the fresh runtime sees bh_routing or lacks pip: {out.stdout}"


def test_install_cell_installs_a_wheel_found_in_the_working_folder(fresh_python, local_repository, tmp_path):
    uploads, target = tmp_path / "content", tmp_path / "site"
    uploads.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(uploads), str(local_repository)], check=True)
    [wheel] = uploads.glob("bh_routing-*.whl")
    result = run_install_cell(fresh_python, uploads, "https://invalid.example/no-such-repository", target)
    assert result.returncode == 0, result.stderr
    assert f"pip install ./{wheel.name}: done" in result.stdout
    assert installed_location(target) == target / "bh_routing" / "__init__.py"
    assert (target / "bh_routing" / "assets" / "tiny-olmoe" / "config.json").exists()  # package data came along


def test_install_cell_installs_a_zip_of_the_repository(fresh_python, local_repository, tmp_path):
    uploads, target = tmp_path / "content", tmp_path / "site"
    uploads.mkdir()
    archive = uploads / "bh_routing-main.zip"  # the name GitHub's "Download ZIP" gives
    subprocess.run(["git", "-C", str(local_repository), "archive", "--format=zip", "--prefix=bh_routing-main/",
                    "-o", str(archive), "HEAD"], check=True)
    result = run_install_cell(fresh_python, uploads, "https://invalid.example/no-such-repository", target)
    assert result.returncode == 0, result.stderr
    assert installed_location(target) == target / "bh_routing" / "__init__.py"


def test_install_cell_installs_from_the_repository_url(fresh_python, local_repository, tmp_path):
    uploads, target = tmp_path / "content", tmp_path / "site"
    uploads.mkdir()
    result = run_install_cell(fresh_python, uploads, local_repository.as_uri(), target)
    assert result.returncode == 0, result.stderr
    assert f"pip install git+{local_repository.as_uri()}: done" in result.stdout
    assert installed_location(target) == target / "bh_routing" / "__init__.py"


def test_install_cell_stops_with_what_to_do_when_nothing_installs(fresh_python, tmp_path):
    uploads, target = tmp_path / "content", tmp_path / "site"
    uploads.mkdir()
    result = run_install_cell(fresh_python, uploads, (tmp_path / "missing").as_uri(), target)
    assert result.returncode != 0
    message = result.stderr.splitlines()[-1]
    assert message.startswith("RuntimeError: bh_routing is not installed and could not be installed from")
    for advice in ("set REPO_URL", "bh_routing-<version>.whl", "pip wheel --no-deps .", "bh_routing*.zip",
                   "DRIVE = True", "run this cell again"):
        assert advice in message
    assert not (target / "bh_routing").exists()


# --------------------------------------------------------------------------- execution


needs_tiny = pytest.mark.skipif(not TINY_WEIGHTS.exists(),
                                reason="the bundled tiny OLMoE (bh_routing/assets/tiny-olmoe/model.safetensors) is not "
                                       "in this checkout: train it with scripts/train_tiny_olmoe.py")


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    """One results root for the three notebooks, as users share it (02 and 03 reuse 01's calibration)."""
    return tmp_path_factory.mktemp("notebook_results")


@pytest.mark.slow   # minutes: `python -m pytest -q -m slow`
@needs_tiny
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless_with_widgets_installed(name, results_root, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    assert importlib.util.find_spec("ipywidgets") is not None, (
        "ipywidgets must be installed here (pip install -e '.[test]'): these runs check that no cell waits "
        "for a front end")
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
                       # one intra-op thread unless the caller says otherwise: on a shared 2-core machine,
                       # 2 OpenMP threads stall at every barrier while the other core is busy
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    started = time.time()
    executed = papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"), kernel_name="python3",
        parameters={"MODEL": "tiny", "BUDGET": "smoke", "OUT": str(results_root), "DRIVE": False, "SEED": 0},
        cwd=str(tmp_path), progress_bar=False, execution_timeout=CELL_TIMEOUT_S)
    seconds = time.time() - started
    tags = [cell.metadata.get("tags", []) for cell in executed.cells]
    assert "injected-parameters" in tags[[i for i, t in enumerate(tags) if "parameters" in t][0] + 1]
    folder_name, files = EXPECTED[name]
    folder = results_root / folder_name / "tiny_smoke"
    missing = [f for f in files if not (folder / f).exists()]
    assert not missing, f"{name} did not write {missing} in {folder}"
    archive = folder.with_suffix(".zip")
    assert archive.exists() and archive.stat().st_size > 0
    assert (results_root / "calibration" / "tiny.safetensors").exists()
    outputs = "".join(o.get("text", "") for cell in executed.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    if name.startswith("02"):
        assert "sliders skipped (INTERACTIVE = 'auto'" in outputs  # headless: no widgets, so no wait
    print(f"{name}: {seconds:.0f} s", file=sys.stderr)
