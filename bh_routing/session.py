"""A notebook session: the parameters cell resolved (model, budget, device, dtype, memory plan,
results folder, seed), the environment report, figures shown and registered for the report, and
the calibration shared by the three notebooks (loaded when notebook 01 saved it, else made)."""
from __future__ import annotations

import os
import platform
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from . import experiments as ex
from . import plots, runtime
from .runtime import in_colab

# =========================================================================== sessions

NOTEBOOKS = {"01": "01_baseline", "02": "02_bh_deep_dive", "03": "03_full_experiments"}
BUDGET_NAMES = tuple(ex.BUDGETS)
# Notebook 01: tokens of native routing recorded per text source; all notebooks: calibration tokens
# (held-out WikiText-2 articles). Matched compute: calibration tokens the knob search routes.
SAMPLE_TOKENS = {"smoke": 256, "demo": 4096, "colab": 16384, "full": 65536}
CALIBRATION_TOKENS = {"smoke": 8192, "demo": 16384, "colab": 16384, "full": 32768}
MATCHED_SEARCH_TOKENS = {"smoke": 512, "demo": 2048, "colab": 8192, "full": 16384}
COLAB_ROOT = "/content/bh_routing_results"


def slug(name: str) -> str:
    """A folder-safe name for a model id or path ('allenai/OLMoE-1B-7B-0924' -> 'allenai-OLMoE-1B-7B-0924')."""
    name = str(name).rstrip("/")
    if os.sep in name and Path(name).expanduser().is_dir():
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def resolve_model(model: str = "auto", cuda: bool | None = None) -> str:
    """'auto' -> OLMoE-1B-7B on a GPU, the bundled tiny OLMoE otherwise; anything else as given."""
    from .models import OLMOE_1B_7B, TINY
    if model != "auto":
        return model
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return OLMOE_1B_7B if cuda else TINY


def resolve_budget(budget: str = "auto", cuda: bool | None = None) -> str:
    """'auto' -> 'colab' on a GPU (fits a free Colab session), 'demo' on CPU; else one of BUDGETS."""
    if budget == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return "colab" if cuda else "demo"
    if budget not in ex.BUDGETS:
        raise ValueError(f"budget must be 'auto' or one of {BUDGET_NAMES}, got {budget!r}")
    return budget


def default_root() -> Path:
    """Where results go when OUT = 'auto' and Drive is off: /content/bh_routing_results (Colab), the
    checkout's results/notebooks (an editable install), else ./bh_routing_results."""
    if in_colab():
        return Path(COLAB_ROOT)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "results").is_dir():
        return checkout / "results" / "notebooks"
    return Path("bh_routing_results").resolve()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def environment() -> dict[str, Any]:
    """Versions and hardware, for the setup cell and every results file."""
    import transformers
    env = {"python": platform.python_version(), "platform": platform.platform(terse=True),
           "torch": torch.__version__, "transformers": transformers.__version__, "bh_routing": __version__,
           "numpy": np.__version__, "pandas": pd.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "colab": in_colab(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        from .models import cuda_free_memory
        free, total = cuda_free_memory()   # free within a per-process memory cap, if one is set
        env |= {"gpu": props.name, "gpu_memory_gib": round(total / 2**30, 2), "gpu_free_gib": round(free / 2**30, 2),
                "compute_capability": f"{props.major}.{props.minor}", "cuda_version": torch.version.cuda}
    return env


@dataclass
class Session:
    """One notebook run: what the parameters cell resolved to, and where results go."""
    notebook: str
    model_id: str
    budget_name: str
    device: torch.device
    dtype: torch.dtype
    root: Path
    seed: int
    environment: dict
    plan: Any = None  # models.MemoryPlan, or None when the config could not be read
    plan_error: str | None = None
    started: float = field(default_factory=time.time)
    figures: list = field(default_factory=list)  # (png name, caption), for the report
    blocks: list = field(default_factory=list)  # Markdown shown by say/table, for the report, in order
    lead_blocks: list = field(default_factory=list)  # ... said with lead=True: the report's top
    kept: dict = field(default_factory=dict)  # values for the summary JSON (keep)

    @property
    def budget(self) -> "ex.Budget":
        return ex.BUDGETS[self.budget_name]

    @property
    def folder(self) -> Path:
        """This notebook's results: <root>/<notebook>/<model>_<budget>."""
        path = self.root / self.notebook / f"{slug(self.model_id)}_{self.budget_name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def calibration_path(self) -> Path:
        """Shared by the three notebooks: <root>/calibration/<model>.safetensors."""
        path = self.root / "calibration" / f"{slug(self.model_id)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def sample_tokens(self) -> int:
        return SAMPLE_TOKENS[self.budget_name]

    @property
    def calibration_tokens(self) -> int:
        return CALIBRATION_TOKENS[self.budget_name]

    @property
    def subtitle(self) -> str:
        from .models import describe_model
        return f"{describe_model(self.model_id)} · {str(self.dtype).replace('torch.', '')} · budget {self.budget_name}"

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def batch_size(self, length: int, cap: int = 64) -> int:
        """Sequences of ``length`` tokens per forward pass (full logits kept), from the memory plan."""
        if self.plan is None:
            return 1 if self.device.type == "cuda" else 8
        if self.device.type != "cuda":
            return max(1, min(8, self.plan.max_batch(length)))
        return max(1, min(cap, self.plan.max_batch(length)))

    def describe(self) -> dict[str, Any]:
        budget = self.budget
        return {"notebook": self.notebook, "model": self.model_id, "budget": self.budget_name,
                "budget_items": {"wikitext_docs": budget.wikitext_docs, "hellaswag": budget.hellaswag,
                                 "lambada": budget.lambada, "max_length": budget.max_length},
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "seed": self.seed,
                "results": str(self.folder), "environment": self.environment}

    def markdown(self) -> str:
        env = self.environment
        hardware = (f"GPU **{env['gpu']}** ({env['gpu_memory_gib']} GiB, {env['gpu_free_gib']} GiB free, "
                    f"compute capability {env['compute_capability']})" if env.get("cuda")
                    else f"CPU only ({env['cpu_count']} cores, {env['torch_threads']} torch threads)")
        budget = self.budget
        lines = [f"**Model** `{self.model_id}` on `{self.device}` in `{str(self.dtype).replace('torch.', '')}` · "
                 f"**budget** `{self.budget_name}` (WikiText {budget.wikitext_docs or 'all'} articles, HellaSwag "
                 f"{budget.hellaswag or 'all'}, LAMBADA {budget.lambada or 'all'}, max_length "
                 f"{budget.max_length or 'model'}) · **seed** {self.seed}",
                 f"**Hardware** {hardware}; {'Colab' if env['colab'] else 'local'} runtime.",
                 f"**Versions** Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
                 f"bh_routing {env['bh_routing']}.",
                 f"**Results** `{self.folder}`"]
        if self.plan is not None:
            plan = "<br>".join(self.plan.summary().splitlines())
            lines.append(f"**Memory plan** (from the config, before loading): {plan}")
        elif self.plan_error:
            lines.append(f"**Memory plan** unavailable: {self.plan_error}")
        return "\n\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def figure(self, fig, name: str, caption: str) -> Path:
        """Save ``fig`` as ``<folder>/<name>.png``, show it, and register it with its caption for the
        notebook's report (:func:`bh_routing.notebook_support.write_report`); returns the path."""
        path = show(fig, self.folder / f"{name}.png")
        self.figures = [f for f in self.figures if f[0] != path.name] + [(path.name, caption)]
        return path

    def load_model(self):
        """(model, tokenizer) of this session, loaded with its dtype (the memory plan is printed), and
        a line saying what the model is: every number of the notebook is about it."""
        from .models import describe_model, load_model
        model, tokenizer = load_model(self.model_id, dtype=self.dtype)
        config = model.config
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{type(model).__name__}: {config.num_hidden_layers} layers, {config.num_experts} experts, "
              f"top-{config.num_experts_per_tok}, {parameters:,.1f} M parameters")
        _markdown(f"**Model:** {describe_model(self.model_id)}. Every number below is about this model.")
        return model, tokenizer

    def say(self, text: str | list[str], heading: str | None = None, lead: bool = False) -> None:
        """Show Markdown (a list: bullet points) and keep it, under ``heading``, for the report (at its
        top with ``lead``, e.g. a summary computed last)."""
        from .markdown import as_markdown
        from .notebook_support import display_markdown
        text = as_markdown(text)
        display_markdown(text)
        (self.lead_blocks if lead else self.blocks).append(f"## {heading}\n\n{text}" if heading else text)

    def table(self, frame: pd.DataFrame, heading: str | None = None, columns=None, digits: int = 4,
              csv: str | None = None) -> pd.DataFrame:
        """Show ``frame`` as a Markdown table (``columns`` of it, floats to ``digits`` significant
        digits), keep it for the report under ``heading``, and save all of it as ``<csv>.csv`` in
        the results folder when ``csv`` is given; returns ``frame``."""
        from .markdown import markdown_table
        if csv:
            frame.to_csv(self.folder / f"{csv}.csv", index=False)
        self.say(markdown_table(frame, columns, digits=digits), heading)
        return frame

    def keep(self, **values) -> None:
        """Values for the summary JSON that :meth:`finish` writes (tables as lists of records)."""
        self.kept.update({key: value.to_dict("records") if isinstance(value, pd.DataFrame) else value
                          for key, value in values.items()})

    def finish(self, summary_name: str | None = None, title: str | None = None,
               report_name: str = "RESULTS.md") -> Path:
        """Write what was kept (with the session and its seconds) as JSON ``summary_name``, a Markdown
        report ``report_name`` of what was said, shown as tables and registered as figures (when
        ``title`` is given), zip the folder and, on Colab, download the zip; returns the zip."""
        from .notebook_support import offer_download, write_json, write_report, zip_folder
        if summary_name:
            write_json(self.folder / summary_name,
                       {"session": self.describe(), **self.kept, "seconds": round(self.elapsed, 1)})
        if title:
            write_report(self.folder / report_name, title, self, self.lead_blocks + self.blocks)
        archive = zip_folder(self.folder)
        print(f"{len(self.figures)} figures -> {archive}; notebook {self.notebook} took {self.elapsed:.0f} s")
        print(offer_download(archive))  # a browser download on Colab; elsewhere where the zip is
        return archive


def _markdown(text: str) -> None:
    from .notebook_support import display_markdown
    display_markdown(text)


def start_session(notebook: str, model: str = "auto", budget: str = "auto", out: str | os.PathLike = "auto",
                  seed: int = 0, drive: bool = False) -> Session:
    """Resolve the parameters cell: model ('auto' = OLMoE-1B-7B on a GPU, else the tiny model),
    budget ('auto' = colab on a GPU, else demo), output root ('auto' = see :func:`default_root`;
    ``drive=True`` on Colab mounts Google Drive first), seeds, device, dtype and memory plan."""
    from .models import ModelUnavailableError, plan_for, resolve_device, resolve_dtype
    notebook = NOTEBOOKS.get(notebook, notebook)
    drive_root = runtime.use_drive(drive)  # results and the Hugging Face cache on Drive (Colab)
    if str(out) != "auto":
        root = Path(out).expanduser()
    else:
        root = drive_root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    model_id, budget_name = resolve_model(model), resolve_budget(budget)
    if model == "auto" and not torch.cuda.is_available():
        print(f"No GPU in this runtime: MODEL = 'auto' runs the bundled tiny OLMoE ({model_id}), not "
              "OLMoE-1B-7B. For OLMoE-1B-7B on Colab: Runtime -> Change runtime type -> T4 GPU, then Run all.")
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    plan, error = None, None
    try:
        plan = plan_for(model_id, device, dtype)
    except (ModelUnavailableError, OSError, ValueError) as err:  # loading will say it again, with advice
        error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return Session(notebook, model_id, budget_name, device, dtype, root.resolve(), seed, environment(), plan, error)


# =========================================================================== calibration


def load_or_calibrate(session: Session, model, tokenizer, need_logits: bool = False, progress: bool = True):
    """(calibration, router_logits or None, how): the calibration notebook 01 saved for this model
    (``session.calibration_path``) when it matches the model and has at least the budget's
    calibration tokens, else a fresh calibration pass (:func:`bh_routing.experiments.calibrate`),
    saved there. ``need_logits``: also return the
    calibration pass's per-layer router logits (matched compute searches its knobs on them) —
    re-collected on the same held-out windows when the calibration was loaded. ``how`` is shown
    and kept, with the calibration's metadata, for the notebook's report and summary JSON."""
    from .patching import collect_router_logits
    from .pvalues import Calibration, CalibrationMismatchError
    path = session.calibration_path
    if path.exists():
        calibration = Calibration.load(path)
        meta = calibration.metadata
        try:
            calibration.check_model(model)  # MoE shape and weights: a stale file is recalibrated, not used
            same_model = meta.get("model") == session.model_id
        except CalibrationMismatchError:
            same_model = False
        if same_model and int(meta.get("tokens", 0)) >= session.calibration_tokens:
            logits = None
            if need_logits:
                device = next(model.parameters()).device
                windows = ex.calibration_windows(tokenizer, 512, int(meta["tokens"]))
                batches = [w.to(device) for w in progress_bar(windows, progress, "calibration logits", "window")]
                logits = collect_router_logits(model, batches, max_tokens=int(meta["tokens"]))
            return _kept(session, calibration, logits,
                         f"loaded from {path} ({meta['tokens']:,} tokens, {meta['data']})")
    started = time.time()
    calibration, logits = ex.calibrate(model, tokenizer, max_tokens=session.calibration_tokens,
                                       model_id=session.model_id)
    calibration.save(path)
    how = (f"calibrated now on {calibration.metadata['tokens']:,} tokens of {calibration.metadata['data']} "
           f"in {time.time() - started:.0f} s, saved to {path}")
    return _kept(session, calibration, logits if need_logits else None, how)


def _kept(session: Session, calibration, logits, how: str):
    session.say(f"**Calibration** {how}.")
    session.keep(calibration={"file": str(session.calibration_path), "how": how, **calibration.metadata})
    return calibration, logits, how


def calibration_summary(calibration) -> pd.DataFrame:
    """Per layer: null sample sizes of the ``empirical`` model and the smallest p-value it can give
    (1/(n+1)) against α/N for the usual α — the resolution BH needs to select on its own."""
    counts = calibration.empirical_counts.numpy()
    n = calibration.num_experts
    frame = pd.DataFrame({"layer": np.arange(calibration.num_layers),
                          "null_min": counts.min(axis=1), "null_median": np.median(counts, axis=1),
                          "null_max": counts.max(axis=1)})
    frame["smallest_p"] = 1.0 / (frame["null_min"] + 1)
    for alpha in (0.01, 0.05, 0.10):
        frame[f"reaches α/N at α={alpha}"] = frame["smallest_p"] <= alpha / n
    return frame


def describe_calibration(calibration, table: pd.DataFrame) -> str:
    """The calibration's resolution in words: null sizes, the smallest empirical p-value, and the
    α for which it is below α/N in every layer (``table``: :func:`calibration_summary`)."""
    reach = [a for a in (0.01, 0.05, 0.10) if table[f"reaches α/N at α={a}"].all()]
    n = calibration.num_experts
    return (f"Calibrated on {calibration.metadata['tokens']:,} tokens; each expert's null holds "
            f"{int(table['null_min'].min()):,}–{int(table['null_max'].max()):,} logits, so the smallest "
            f"empirical p-value is {table['smallest_p'].max():.2e} or less. "
            + (f"That is below α/{n} for α ∈ {{{', '.join(map(str, reach))}}} in every layer." if reach
               else f"That is above α/{n} at α = 0.10 in some layer: calibrate on more tokens (a larger "
                    "budget) for small α."))


def progress_bar(iterable, enabled: bool, desc: str, unit: str = "it", total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit=unit, total=total)


def show(fig, path: str | os.PathLike | None = None, dpi: int = plots.DPI):
    """Save ``fig`` as PNG (when ``path`` is given) and display that PNG (works in Jupyter, Colab and
    headless runs alike, whatever the matplotlib backend); returns the path."""
    import io
    saved = plots.save(fig, path, dpi=dpi) if path is not None else None
    try:
        from IPython.display import Image, display
    except ImportError:
        return saved
    if saved is not None and saved.suffix == ".png":
        display(Image(filename=str(saved)))
    else:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        display(Image(data=buffer.getvalue()))
    return saved
