"""Where a notebook runs: the repository's address, Colab and Google Drive, and the front end.

Standard library only and importable before torch or transformers: :func:`use_drive` has to set
``HF_HOME`` before the Hugging Face libraries read it at import.

* :data:`REPO_URL` is the one place the repository's address is written; the Colab badges
  (:func:`colab_url`, README.md, the notebooks' introductions) and the notebooks' install cell
  (``REPO_URL`` in their parameters cell) derive from it, and a test keeps them equal.
* :func:`use_drive` keeps results *and* the Hugging Face cache on Google Drive, so a reconnect
  neither loses finished runs nor downloads the model again.
* :func:`live_frontend` decides ``INTERACTIVE = "auto"``: widgets only where a person is looking
  (Colab, or a front end that sends the cell's id with each execution, as JupyterLab and Notebook 7
  do), never under papermill or nbclient, whose execute requests carry no cell id and where an
  ``interact`` call can wait forever for a front end that does not exist.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_URL = "https://github.com/bh-routing/bh_routing"
BRANCH = "main"
NOTEBOOK_NAMES = ("01_OLMoE_Baseline", "02_OLMoE_BenjaminiHochberg_Routing", "03_OLMoE_Full_Routing_Experiments")
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
DRIVE_MOUNT = Path("/content/drive")
DRIVE_DIR = DRIVE_MOUNT / "MyDrive" / "bh_routing"   # results/ and hf_cache/ live under it


def colab_url(notebook: str, repo_url: str = REPO_URL, branch: str = BRANCH) -> str:
    """The "Open in Colab" address of ``notebooks/<notebook>.ipynb`` in the repository."""
    github_path = repo_url.removeprefix("https://github.com/").strip("/")
    return f"https://colab.research.google.com/github/{github_path}/blob/{branch}/notebooks/{notebook}.ipynb"


def colab_badge(notebook: str) -> str:
    """Markdown for the badge that opens ``notebook`` in Colab."""
    return f"[![Open In Colab]({COLAB_BADGE})]({colab_url(notebook)})"


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def use_drive(drive: bool) -> Path | None:
    """With ``drive`` on Colab: mount Google Drive and point ``HF_HOME`` at ``<Drive>/bh_routing/hf_cache``
    (unless the user set HF_HOME); returns ``<Drive>/bh_routing/results``. None (and nothing done)
    when ``drive`` is off or outside Colab, saying so in the latter case. Call it before anything
    imports transformers or huggingface_hub: they read HF_HOME once, at import."""
    if not drive:
        return None
    if not in_colab():
        print("DRIVE = True is for Colab; results and the model cache stay on the local disk.")
        return None
    if not (DRIVE_MOUNT / "MyDrive").is_dir():
        from google.colab import drive as colab_drive  # type: ignore[import-not-found]
        colab_drive.mount(str(DRIVE_MOUNT))
    already = [name for name in ("huggingface_hub", "transformers") if name in sys.modules]
    if already and "HF_HOME" not in os.environ:
        print(f"{', '.join(already)} already imported: the model cache stays where it is until the runtime "
              "restarts (Runtime -> Restart session, then Run all).")
    os.environ.setdefault("HF_HOME", str(DRIVE_DIR / "hf_cache"))
    results = DRIVE_DIR / "results"
    results.mkdir(parents=True, exist_ok=True)
    return results


def live_frontend() -> bool:
    """True when a person's front end is attached: Colab, or a cell executed from a notebook front
    end that names the cell (``cellId`` in the execute request's metadata: JupyterLab, Notebook 7).
    False in a plain Python process, a terminal IPython, and under papermill/nbclient (headless
    execution), whatever is installed. Front ends that send no cell id need INTERACTIVE = True."""
    if in_colab():
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:  # not a Jupyter kernel (a script, a terminal)
        return False
    try:
        request = shell.kernel.get_parent()  # the execute request of the running cell
    except Exception:  # an ipykernel without get_parent: not knowable, so no widgets
        return False
    return bool((request or {}).get("metadata", {}).get("cellId"))


def interactive(setting: bool | str = "auto") -> bool:
    """The notebooks' INTERACTIVE parameter: True/False as given; "auto" -> :func:`live_frontend`
    and ipywidgets importable."""
    if setting not in (True, False, "auto"):
        raise ValueError(f'INTERACTIVE must be True, False or "auto", got {setting!r}')
    if setting != "auto":
        return bool(setting)
    import importlib.util
    return live_frontend() and importlib.util.find_spec("ipywidgets") is not None
