"""What the three notebooks need beyond the core modules — tested here, so the notebooks stay thin.

The notebooks (``notebooks/01_OLMoE_Baseline.ipynb``, ``02_OLMoE_BenjaminiHochberg_Routing.ipynb``,
``03_OLMoE_Full_Routing_Experiments.ipynb``) hold configuration, calls, figures and computed
readings; every number they show is computed here or in the core modules:

* **sessions** — the parameters cell (model, budget, output folder, seed) resolved to a model id,
  a budget, device, dtype and memory plan, output folders (local, Colab, Google Drive), seeds and an
  environment report (:func:`start_session`);
* **the native router** (notebook 01) — router logits recorded on text of several kinds
  (:func:`record_native_routing`), per-layer statistics (:func:`routing_statistics`), weight
  concentration, expert usage, co-activation, domain specialisation, a token-level view;
* **BH explained** (notebook 02) — the step-up procedure on one token (:func:`bh_explain`), why naive
  p-values fail (:func:`pvalue_diagnostics`), the α map of every p-value model (:func:`alpha_curve`),
  prompt-level scoring under a routing (:func:`score_prompts`), patch vs analyze
  (:func:`patch_vs_analyze`), live re-routing (:func:`reroute`);
* **sweeps** (notebook 03) — tokens a sweep scores, counted exactly, and the time estimate derived
  from them (:func:`estimate_sweep`), the comparison and matched-compute tables;
* **results** — Markdown tables, figures saved and shown, a zip of the results folder and a Colab
  download that is skipped elsewhere.

Figures follow :mod:`bh_routing.plots`: ``matplotlib.figure.Figure`` built without pyplot, every
axis labelled, ``subtitle`` as the title's second line.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import __version__
from . import experiments as ex
from .evaluation import TASKS as EVAL_TASKS
from . import plots

# =========================================================================== sessions

NOTEBOOKS = {"01": "01_baseline", "02": "02_bh_deep_dive", "03": "03_full_experiments"}
BUDGET_NAMES = tuple(ex.BUDGETS)
# Notebook 01: tokens of native routing recorded per text source; all notebooks: calibration tokens
# (held-out WikiText-2 articles). Matched compute: calibration tokens the knob search routes.
SAMPLE_TOKENS = {"smoke": 256, "demo": 4096, "colab": 16384, "full": 65536}
CALIBRATION_TOKENS = {"smoke": 8192, "demo": 16384, "colab": 16384, "full": 32768}
MATCHED_SEARCH_TOKENS = {"smoke": 512, "demo": 2048, "colab": 8192, "full": 16384}
COLAB_ROOT = "/content/bh_routing_results"
DRIVE_ROOT = "/content/drive/MyDrive/bh_routing_results"


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


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


def default_root(drive: bool = False) -> Path:
    """Where results go when OUT = 'auto': Google Drive (Colab, drive=True), /content (Colab), the
    checkout's results/notebooks (an editable install), else ./bh_routing_results."""
    if in_colab():
        return Path(DRIVE_ROOT if drive else COLAB_ROOT)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "results").is_dir():
        return checkout / "results" / "notebooks"
    return Path("bh_routing_results").resolve()


def mount_drive() -> bool:
    """Mount Google Drive at /content/drive on Colab; False (and nothing done) elsewhere."""
    if not in_colab():
        return False
    from google.colab import drive  # type: ignore[import-not-found]
    drive.mount("/content/drive")
    return True


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
        free, total = torch.cuda.mem_get_info()
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


def start_session(notebook: str, model: str = "auto", budget: str = "auto", out: str | os.PathLike = "auto",
                  seed: int = 0, drive: bool = False) -> Session:
    """Resolve the parameters cell: model ('auto' = OLMoE-1B-7B on a GPU, else the tiny model),
    budget ('auto' = colab on a GPU, else demo), output root ('auto' = see :func:`default_root`;
    ``drive=True`` on Colab mounts Google Drive first), seeds, device, dtype and memory plan."""
    from .models import ModelUnavailableError, plan_for, resolve_device, resolve_dtype
    notebook = NOTEBOOKS.get(notebook, notebook)
    if drive:
        if mount_drive():
            if str(out) == "auto":
                out = DRIVE_ROOT
        else:
            print("DRIVE=True is for Colab; keeping results on the local disk.")
    root = default_root(drive) if str(out) == "auto" else Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    model_id, budget_name = resolve_model(model), resolve_budget(budget)
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
    re-collected on the same held-out windows when the calibration was loaded."""
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
                batches = [w.to(device) for w in _progress(windows, progress, "calibration logits", "window")]
                logits = collect_router_logits(model, batches, max_tokens=int(meta["tokens"]))
            return calibration, logits, f"loaded from {path} ({meta['tokens']:,} tokens, {meta['data']})"
    started = time.time()
    calibration, logits = ex.calibrate(model, tokenizer, max_tokens=session.calibration_tokens,
                                       model_id=session.model_id)
    calibration.save(path)
    how = (f"calibrated now on {calibration.metadata['tokens']:,} tokens of {calibration.metadata['data']} "
           f"in {time.time() - started:.0f} s, saved to {path}")
    return calibration, (logits if need_logits else None), how


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


# =========================================================================== native routing (notebook 01)


@dataclass
class RoutingSample:
    """Native router logits recorded on text, with where each token came from.

    ``logits[layer]`` is [T, N] float32 on the CPU (padding removed); ``token_ids``, ``source``,
    ``text``, ``position`` are [T] — the token, its source label, the index of its text (window)
    among all recorded texts, and its position in that text.
    """
    logits: list[torch.Tensor]
    token_ids: np.ndarray
    source: np.ndarray
    text: np.ndarray
    position: np.ndarray
    top_k: int

    @property
    def num_layers(self) -> int:
        return len(self.logits)

    @property
    def num_experts(self) -> int:
        return int(self.logits[0].shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.logits[0].shape[0])

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(self.source.tolist()))

    def select(self, keep) -> "RoutingSample":
        keep = np.asarray(keep)
        index = torch.as_tensor(np.flatnonzero(keep) if keep.dtype == bool else keep)
        return RoutingSample([layer[index] for layer in self.logits], self.token_ids[index], self.source[index],
                             self.text[index], self.position[index], self.top_k)

    def native_indices(self) -> np.ndarray:
        """[L, T, k] the native top-k experts (softmax then top-k, as the model routes)."""
        return np.stack([torch.topk(torch.softmax(layer, dim=-1), self.top_k, dim=-1).indices.numpy()
                         for layer in self.logits])


def domain_sample() -> dict[str, list[str]]:
    """The held-out validation documents shipped with the bundled tiny model (four domains:
    encyclopedia, biomedical, math, code; never trained on) as {domain: [text, ...]}; empty when the
    tiny model is not installed. Plain text, usable with any model."""
    import gzip
    from .models import TINY_MODEL_DIR
    path = Path(TINY_MODEL_DIR) / "validation_sample.jsonl.gz"
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["domain"], []).append(row["text"])
    return out


def text_sources(tokens_per_source: int, source: str = "auto", domains: bool = True) -> dict[str, list[str]]:
    """Text of different kinds, each enough for ``tokens_per_source`` tokens where available: from
    the evaluation data (bundled copies offline, the hub online) WikiText-2 articles that calibration
    never sees (encyclopedic), HellaSwag contexts with their correct ending (everyday activities),
    LAMBADA passages (fiction); with ``domains``, the held-out documents of four domains shipped with
    the tiny model (:func:`domain_sample`); and the prompt sets' prompts, grouped by category
    (the domain prompts one by one)."""
    from . import data
    docs = data.wikitext_split("evaluation", source).records
    n_docs = max(1, min(len(docs), math.ceil(tokens_per_source / 2000)))
    hellaswag = data.load_hellaswag(source, n=max(4, math.ceil(tokens_per_source / 30)))
    lambada = data.load_lambada(source, n=max(4, math.ceil(tokens_per_source / 60)))
    prompts = data.prompt_set("categories")
    texts = {
        "WikiText (encyclopedia)": [data.wikitext_detokenize(d["page"]).strip() for d in docs[:n_docs]],
        "HellaSwag (everyday)": [f"{r['ctx']} {r['endings'][r['label']]}" for r in hellaswag],
        "LAMBADA (fiction)": [r["text"] for r in lambada],
    }
    if domains:
        texts.update({f"held-out {name}": items for name, items in domain_sample().items()})
    for p in prompts:
        if p["category"] == "domain":
            texts[f"prompt: {p['id'].split('-', 1)[1]}"] = [p["prompt"]]
        else:
            texts.setdefault(f"prompt: {p['category']}", []).append(p["prompt"])
    return texts


def _progress(iterable, enabled: bool, desc: str, unit: str = "it", total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit=unit, total=total)


@torch.no_grad()
def record_native_routing(model, tokenizer, texts: Mapping[str, Sequence[str]], max_length: int = 512,
                          max_tokens_per_source: int | None = None, batch_size: int = 8,
                          progress: bool = True) -> RoutingSample:
    """Router logits of the model's *native* routing on ``texts`` ({source: [text, ...]}).

    Each text is tokenised, cut into windows of ``max_length`` tokens, and at most
    ``max_tokens_per_source`` tokens per source are kept (whole windows first). Windows are run in
    batches of ``batch_size`` with right padding; padding never reaches the sample.
    """
    from .patching import collect_router_logits, find_moe_blocks
    top_k = find_moe_blocks(model)[0].top_k
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows: list[tuple[str, list[int]]] = []
    for name, items in texts.items():
        budget = max_tokens_per_source
        for text in items:
            ids = tokenizer(text, verbose=False)["input_ids"]   # windowed below
            for start in range(0, len(ids), max_length):
                piece = ids[start:start + max_length]
                if budget is not None:
                    piece = piece[:budget]
                    budget -= len(piece)
                if len(piece) >= 2:
                    windows.append((name, piece))
                if budget is not None and budget <= 0:
                    break
            if budget is not None and budget <= 0:
                break
    if not windows:
        raise ValueError("no text to record: every source was empty")
    chunks: list[list[torch.Tensor]] = []
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in _progress(batches, progress, "recording native routing", "batch"):
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        chunks.append(collect_router_logits(model, [{"input_ids": input_ids.to(device),
                                                     "attention_mask": mask.to(device)}]))
    logits = [torch.cat([chunk[layer] for chunk in chunks]) for layer in range(len(chunks[0]))]
    token_ids = np.concatenate([ids for _, ids in windows]).astype(np.int64)
    source = np.concatenate([[name] * len(ids) for name, ids in windows]).astype(object)
    text = np.concatenate([[i] * len(ids) for i, (_, ids) in enumerate(windows)]).astype(np.int64)
    position = np.concatenate([np.arange(len(ids)) for _, ids in windows]).astype(np.int64)
    if logits[0].shape[0] != token_ids.size:
        raise RuntimeError(f"recorded {logits[0].shape[0]} tokens for {token_ids.size} real tokens")
    return RoutingSample(logits, token_ids, source, text, position, top_k)


def _entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    logp = torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(dim=-1)


def routing_statistics(sample: RoutingSample) -> pd.DataFrame:
    """One row per layer of the native router:

    ``tokens``; ``max_weight_mean``/``max_weight_median`` (the top-1 softmax probability — the largest
    mixing weight, OLMoE does not renormalise); ``entropy_nats`` (mean per-token routing entropy) and
    ``entropy_norm`` (÷ log N: 1 = uniform); ``topk_mass`` (mean probability mass of the native top-k)
    and ``mass_left_out`` = 1 − topk_mass; ``top_expert`` (the expert most often in the top-k) and
    ``top_expert_usage`` (share of tokens routed to it; uniform = k/N); ``top1_expert`` (most frequent
    top-1) and ``top1_share``; ``load_cv`` (std/mean of the top-k load over experts), ``load_gini``,
    ``dead_experts`` (never in any token's top-k); ``logit_mean``/``logit_std`` (all router logits).
    """
    from . import analysis
    rows = []
    indices = sample.native_indices()
    load = analysis.load_counts(indices, sample.num_experts)
    balance = analysis.load_metrics(load)
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits.double(), dim=-1)
        top = torch.topk(probs, sample.top_k, dim=-1).values
        entropy = _entropy_nats(probs)
        top1 = indices[layer][:, 0]
        top1_counts = np.bincount(top1, minlength=sample.num_experts)
        rows.append({
            "layer": layer, "tokens": logits.shape[0],
            "max_weight_mean": float(top[:, 0].mean()), "max_weight_median": float(np.median(top[:, 0].numpy())),
            "entropy_nats": float(entropy.mean()), "entropy_norm": float(entropy.mean() / math.log(sample.num_experts)),
            "topk_mass": float(top.sum(dim=1).mean()), "mass_left_out": float(1 - top.sum(dim=1).mean()),
            "top_expert": int(load[layer].argmax()), "top_expert_usage": float(load[layer].max() / logits.shape[0]),
            "top1_expert": int(top1_counts.argmax()), "top1_share": float(top1_counts.max() / logits.shape[0]),
            "load_cv": float(balance["cv"][layer]), "load_gini": float(balance["gini"][layer]),
            "dead_experts": int(balance["dead_experts"][layer]),
            "logit_mean": float(logits.double().mean()), "logit_std": float(logits.double().std()),
        })
    return pd.DataFrame(rows)


def concentration(sample: RoutingSample, ks: Sequence[int] = (1, 2, 4, 8)) -> pd.DataFrame:
    """Weight concentration: per layer and k, the mean share of the router's probability mass in the
    k most probable experts (``mass``; uniform routing would give k/N) — long format."""
    rows = []
    for layer, logits in enumerate(sample.logits):
        cumulative = torch.sort(torch.softmax(logits.double(), dim=-1), dim=-1, descending=True).values.cumsum(dim=-1)
        for k in ks:
            rows.append({"layer": layer, "k": k, "mass": float(cumulative[:, k - 1].mean()),
                         "mass_median": float(np.median(cumulative[:, k - 1].numpy())), "uniform": k / sample.num_experts})
    return pd.DataFrame(rows)


def expert_usage(sample: RoutingSample) -> np.ndarray:
    """[L, N] how many tokens each expert was routed (native top-k)."""
    from . import analysis
    return analysis.load_counts(sample.native_indices(), sample.num_experts)


def coactivation_pairs(sample: RoutingSample, layer: int, n: int = 10, min_tokens: int | None = None) -> pd.DataFrame:
    """The expert pairs of one layer chosen together most beyond chance: ``together`` (tokens with both
    in the top-k), ``jaccard`` (together / tokens with either) and ``lift`` = P(i and j) / (P(i) P(j))
    (1 = independent). Pairs with fewer than ``min_tokens`` (default max(5, 0.5 % of tokens)) are left
    out; sorted by lift."""
    from . import analysis
    indices = sample.native_indices()[layer]
    tokens = indices.shape[0]
    together = analysis.coactivation(indices, sample.num_experts)[0]
    load = np.diagonal(together).copy()
    i, j = np.triu_indices(sample.num_experts, k=1)
    frame = pd.DataFrame({"layer": layer, "expert_i": i, "expert_j": j, "together": together[i, j].astype(int),
                          "load_i": load[i].astype(int), "load_j": load[j].astype(int)})
    frame["jaccard"] = frame["together"] / (frame["load_i"] + frame["load_j"] - frame["together"]).clip(lower=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["lift"] = frame["together"] * tokens / (frame["load_i"] * frame["load_j"])
    floor = max(5, math.ceil(0.005 * tokens)) if min_tokens is None else min_tokens
    frame = frame[frame["together"] >= floor]
    return frame.sort_values(["lift", "together"], ascending=False).head(n).reset_index(drop=True)


def domain_usage(sample: RoutingSample, layer: int, indices: np.ndarray | None = None,
                 min_tokens: int = 0) -> pd.DataFrame:
    """source × expert: share of the source's top-k assignments that go to each expert in ``layer``
    (rows sum to 1); the last row ``all`` pools every source. Sources with fewer than ``min_tokens``
    tokens (a 25-token prompt) are left out: their usage is noise, not specialisation.
    ``indices``: ``sample.native_indices()`` if already computed."""
    indices = (sample.native_indices() if indices is None else indices)[layer]  # [T, k]
    rows = {}
    kept = [name for name in sample.sources if (sample.source == name).sum() >= min_tokens]
    for name in kept + ["all"]:
        mine = indices if name == "all" else indices[sample.source == name]
        counts = np.bincount(mine.ravel(), minlength=sample.num_experts).astype(np.float64)
        rows[name] = counts / max(counts.sum(), 1)
    return pd.DataFrame.from_dict(rows, orient="index", columns=range(sample.num_experts))


def _mutual_information_bits(labels: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
    """I(label; expert) in bits from paired samples (plug-in estimate)."""
    codes, names = pd.factorize(labels)
    joint = np.zeros((len(names), num_experts))
    np.add.at(joint, (codes, experts), 1.0)
    joint /= joint.sum()
    p_label, p_expert = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log2(joint[nonzero] / (p_label @ p_expert)[nonzero])).sum())


def domain_specialisation(sample: RoutingSample, min_tokens: int = 32, seed: int = 0) -> pd.DataFrame:
    """Per layer, how much the chosen experts say about the text's source: the mutual information
    I(source; expert) in bits over all top-k assignments of sources with at least ``min_tokens``
    tokens, the same with the source labels shuffled across tokens (``mi_shuffled``: what finite
    samples give by chance), and ``mi_norm`` = MI / H(source) (0 = none, 1 = the expert identifies
    the source)."""
    counts = pd.Series(sample.source).value_counts()
    keep = np.isin(sample.source, counts[counts >= min_tokens].index)
    if keep.sum() == 0 or counts[counts >= min_tokens].size < 2:
        raise ValueError(f"domain specialisation needs at least two sources with >= {min_tokens} tokens")
    sub = sample.select(keep)
    indices = sub.native_indices()  # [L, T, k]
    labels = np.repeat(sub.source, sub.top_k)
    shuffled = np.repeat(np.random.default_rng(seed).permutation(sub.source), sub.top_k)
    shares = pd.Series(sub.source).value_counts(normalize=True).to_numpy()
    h_source = float(-(shares * np.log2(shares)).sum())
    rows = []
    for layer in range(sub.num_layers):
        experts = indices[layer].ravel()
        mi = _mutual_information_bits(labels, experts, sub.num_experts)
        rows.append({"layer": layer, "sources": int(len(shares)), "tokens": int(sub.num_tokens), "mi_bits": mi,
                     "mi_shuffled_bits": _mutual_information_bits(shuffled, experts, sub.num_experts),
                     "mi_norm": mi / h_source if h_source > 0 else np.nan})
    return pd.DataFrame(rows)


def specialised_experts(sample: RoutingSample, n: int = 10, min_tokens: int = 32, min_share: float = 0.02) -> pd.DataFrame:
    """The (layer, expert, source) triples with the largest lift = P(expert | source) / P(expert),
    among sources with >= ``min_tokens`` tokens and experts taking >= ``min_share`` of the source's
    assignments (so a lift is not one token's accident)."""
    counts = pd.Series(sample.source).value_counts()
    names = [s for s in sample.sources if counts[s] >= min_tokens]
    rows = []
    sub = sample.select(np.isin(sample.source, names))
    indices = sub.native_indices() if names else None
    for layer in range(sample.num_layers if names else 0):
        usage = domain_usage(sub, layer, indices)
        overall = usage.loc["all"]
        for name in names:
            share = usage.loc[name]
            for expert in np.flatnonzero(share.to_numpy() >= min_share):
                rows.append({"layer": layer, "expert": int(expert), "source": name, "share_in_source": float(share[expert]),
                             "share_overall": float(overall[expert]),
                             "lift": float(share[expert] / overall[expert]) if overall[expert] > 0 else np.inf})
    frame = pd.DataFrame(rows, columns=["layer", "expert", "source", "share_in_source", "share_overall", "lift"])
    return frame.sort_values("lift", ascending=False).head(n).reset_index(drop=True)


def token_view(sample: RoutingSample, tokenizer, text: int) -> pd.DataFrame:
    """One recorded text, token by token and layer by layer (long format): ``position``, ``token``
    (decoded piece), ``layer``, ``top1_expert``, ``top1_prob``, ``entropy_norm``, ``topk_mass``,
    ``experts`` (the native top-k, most probable first)."""
    keep = np.flatnonzero(sample.text == text)
    if keep.size == 0:
        raise ValueError(f"text {text} was not recorded")
    pieces = [tokenizer.decode([int(t)]) for t in sample.token_ids[keep]]
    rows = []
    for layer, logits in enumerate(sample.logits):
        probs = torch.softmax(logits[torch.as_tensor(keep)].double(), dim=-1)
        top = torch.topk(probs, sample.top_k, dim=-1)
        entropy = _entropy_nats(probs) / math.log(sample.num_experts)
        for i, position in enumerate(sample.position[keep]):
            rows.append({"position": int(position), "token": pieces[i], "layer": layer,
                         "top1_expert": int(top.indices[i, 0]), "top1_prob": float(top.values[i, 0]),
                         "entropy_norm": float(entropy[i]), "topk_mass": float(top.values[i].sum()),
                         "experts": top.indices[i].tolist()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- readings (computed text)


def describe_baseline(stats: pd.DataFrame, conc: pd.DataFrame, spec: pd.DataFrame | None, num_experts: int,
                      top_k: int, model_id: str | None = None) -> list[str]:
    """Key observations of notebook 01 as sentences, every number from the tables given; the first
    names the model they are about (the bundled one as what it is)."""
    uniform_top1, uniform_mass = 1 / num_experts, top_k / num_experts
    first, last = stats.iloc[0], stats.iloc[-1]
    peak = stats.loc[stats["max_weight_mean"].idxmax()]
    flat = stats.loc[stats["entropy_norm"].idxmax()]
    lines = [
        f"The largest mixing weight averages {stats['max_weight_mean'].mean():.3f} over layers (range "
        f"{stats['max_weight_mean'].min():.3f}–{stats['max_weight_mean'].max():.3f}), "
        f"{stats['max_weight_mean'].mean() / uniform_top1:.1f}× the {uniform_top1:.3f} of uniform routing.",
        f"The native top-{top_k} carry {stats['topk_mass'].mean():.1%} of the probability mass on average "
        f"(uniform: {uniform_mass:.1%}), so {stats['mass_left_out'].mean():.1%} is left out; the most is left out "
        f"in layer {int(stats.loc[stats['mass_left_out'].idxmax(), 'layer'])} "
        f"({stats['mass_left_out'].max():.1%}).",
        f"Routing entropy is {stats['entropy_norm'].mean():.2f} of its maximum log {num_experts} on average; "
        f"the flattest layer is {int(flat['layer'])} ({flat['entropy_norm']:.2f}), the most peaked "
        f"{int(peak['layer'])} (top-1 weight {peak['max_weight_mean']:.3f}); from the first to the last layer "
        f"entropy goes {first['entropy_norm']:.2f} → {last['entropy_norm']:.2f}.",
    ]
    if model_id is not None:
        from .models import describe_model
        lines.insert(0, f"Model: {describe_model(model_id)}; every observation below is about this model.")
    top1 = conc[conc["k"] == 1]["mass"].mean()
    half = conc[conc["k"] == max(1, top_k // 2)]["mass"].mean()
    lines.append(f"Concentration: the top-1 expert holds {top1:.1%} of the mass, the top-{max(1, top_k // 2)} "
                 f"{half:.1%}, the top-{top_k} {stats['topk_mass'].mean():.1%} (layer means).")
    busiest = stats.loc[stats["top_expert_usage"].idxmax()]
    lines.append(f"Expert load: the busiest expert of a layer serves up to {busiest['top_expert_usage']:.1%} of "
                 f"tokens (layer {int(busiest['layer'])}, expert {int(busiest['top_expert'])}; balanced load would be "
                 f"{uniform_mass:.1%}); load CV ranges {stats['load_cv'].min():.2f}–{stats['load_cv'].max():.2f}, and "
                 f"{int(stats['dead_experts'].sum())} (layer, expert) pairs were never chosen on this sample.")
    if spec is not None and len(spec):
        best = spec.loc[spec["mi_bits"].idxmax()]
        lines.append(f"Specialisation by text source: the chosen experts carry {spec['mi_bits'].mean():.3f} bits "
                     f"about the source on average (chance level with shuffled labels "
                     f"{spec['mi_shuffled_bits'].mean():.3f}); strongest in layer {int(best['layer'])} "
                     f"({best['mi_bits']:.3f} bits, {best['mi_norm']:.1%} of the source entropy).")
    return lines


# =========================================================================== BH explained (notebook 02)


@dataclass
class BhExplanation:
    table: pd.DataFrame  # one row per expert, by increasing p-value (ties: larger logit first)
    alpha: float
    procedure: str
    pvalues: str
    layer: int
    k_star: int  # largest k with p_(k) <= c_k (0 if none): what the test alone selects
    k_selected: int  # after the [min_k, max_k] clamp: what the router uses
    min_k: int
    max_k: int
    router_agrees: bool  # the router's own selection is the table's "selected" set

    def markdown(self) -> str:
        floor = (f"; the test alone selects {self.k_star}, so the min_k floor adds "
                 f"{self.k_selected - self.k_star} expert(s) by router logit" if self.k_selected > self.k_star else "")
        ceiling = (f"; the test selects {self.k_star}, clamped to max_k = {self.max_k}" if self.k_star > self.max_k else "")
        native = int(self.table["native"].sum())
        overlap = int((self.table["native"] & self.table["selected"]).sum())
        return (f"Layer {self.layer}, `{self.pvalues}` p-values, {self.procedure.upper()} at α = {self.alpha}: "
                f"k* = **{self.k_star}**, selected **{self.k_selected}** expert(s){floor}{ceiling}; "
                f"{overlap} of them are among the native top-{native}. "
                f"Smallest p-value {self.table['pvalue'].iloc[0]:.3g} vs the first critical value "
                f"{self.table['critical'].iloc[0]:.3g}.")


def bh_explain(router_logits: torch.Tensor, layer: int, alpha: float = 0.05, pvalues: str = "empirical",
               calibration=None, temperature: float = 1.0, procedure: str = "bh", min_k: int = 1, max_k: int = 8,
               top_k: int = 8) -> BhExplanation:
    """The step-up procedure on one token's router logits [N], as a table: rank, expert, logit,
    probability, p-value, critical value c_k ((k/N)·α for BH; ÷ Σ1/i for BY), whether p_(k) <= c_k,
    ``bh`` (rank <= k*), ``selected`` (what the router actually uses, after the min_k/max_k clamp and
    its floor rule) and ``native`` (in the native top-k)."""
    from .pvalues import compute_pvalues
    from .selection import route, smallest_k_order, stepup_critical_values
    logits = router_logits.detach().float().reshape(1, -1).cpu()
    n = logits.shape[1]
    p = compute_pvalues(logits, pvalues, layer, calibration, temperature)  # [1, N] float32
    order = smallest_k_order(p, n, logits)[0]
    critical = stepup_critical_values(n, alpha, procedure).numpy()
    sorted_p = p[0, order].double().numpy()
    below = sorted_p <= critical
    k_star = int(np.flatnonzero(below).max() + 1) if below.any() else 0
    config = {"strategy": procedure, "alpha": alpha, "pvalues": pvalues, "min_k": min_k, "max_k": max_k}
    if temperature != 1.0:
        config["temperature"] = temperature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolution warnings: the table shows the p-values anyway
        routing = route(logits, config, layer=layer, calibration=calibration)
    chosen = set(routing.indices[0, :int(routing.counts[0])].tolist())
    probs = torch.softmax(logits[0].double(), dim=-1)
    native = set(torch.topk(probs, top_k).indices.tolist())
    experts = order.tolist()
    table = pd.DataFrame({"rank": np.arange(1, n + 1), "expert": experts, "logit": logits[0, order].numpy(),
                          "prob": probs[order].numpy(), "pvalue": sorted_p, "critical": critical,
                          "below_line": below, "bh": np.arange(1, n + 1) <= k_star,
                          "selected": [e in chosen for e in experts], "native": [e in native for e in experts]})
    k_selected = int(routing.counts[0])
    # The router's rule: p-values above the largest critical value carry no evidence (count as 1),
    # so the min_k floor fills by router logit after the p-values under it.
    truncated = torch.where(p.double() <= float(critical[-1]), p, torch.ones_like(p))
    fill = smallest_k_order(truncated, n, logits)[0].tolist()
    agrees = chosen == set(fill[:min(max(k_star, min_k), max_k)]) and k_selected == len(chosen)
    return BhExplanation(table, alpha, procedure, pvalues, layer, k_star, k_selected, min_k, max_k, bool(agrees))


def pvalue_diagnostics(router_logits: Sequence[torch.Tensor], calibration=None, alpha: float = 0.05,
                       models: Sequence[str] = ("softmax", "pooled", "empirical", "zscore"), max_k: int = 8,
                       ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Why naive p-values fail, on the model's own logits. Per p-value model and layer:
    ``min_p_median`` (median over tokens of the smallest of the N p-values), ``reach_rate`` (share of
    tokens whose smallest p-value is <= α/N, i.e. BH can select at least one expert on its own),
    ``bh_k_raw`` (mean experts BH selects with no floor and no cap), ``mean_experts``/``floor_rate``
    (the ``bh`` strategy with min_k = 1, max_k = ``max_k``). Also {model: [L·T] smallest p per token}."""
    from .pvalues import CALIBRATED, compute_pvalues
    from .selection import bh_select, route
    rows, smallest = [], {}
    for model in models:
        if model in CALIBRATED and calibration is None:
            continue
        mins = []
        for layer, logits in enumerate(router_logits):
            p = compute_pvalues(logits, model, layer, calibration)
            n = p.shape[1]
            low = p.min(dim=1).values
            raw = bh_select(p, alpha, min_k=0, max_k=n).counts.float()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counts = route(logits, {"strategy": "bh", "pvalues": model, "alpha": alpha, "max_k": max_k},
                               layer=layer, calibration=calibration).counts
            rows.append({"pvalues": model, "layer": layer, "min_p_median": float(np.median(low.numpy())),
                         "reach_rate": float((low.double() <= alpha / n).float().mean()),
                         "bh_k_raw": float(raw.mean()), "mean_experts": float(counts.float().mean()),
                         "floor_rate": float((counts == 1).float().mean())})
            mins.append(low.numpy())
        smallest[model] = np.concatenate(mins)
    return pd.DataFrame(rows), smallest


def alpha_curve(router_logits: Sequence[torch.Tensor], calibration=None, alphas: Sequence[float] = (
        0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50), models: Sequence[str] = ("softmax", "pooled", "empirical", "zscore"),
        max_k: int = 8, min_k: int = 1, procedure: str = "bh") -> pd.DataFrame:
    """What BH *would* select on recorded native logits (analyze mode: later layers see native
    hidden states), per p-value model, α and layer: ``mean_experts``, ``floor_rate``, ``ceiling_rate``."""
    from .pvalues import CALIBRATED
    from .selection import build_router
    rows = []
    for model in models:
        if model in CALIBRATED and calibration is None:
            continue
        for alpha in alphas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    router = build_router({"strategy": procedure, "pvalues": model, "alpha": alpha, "min_k": min_k,
                                           "max_k": max_k}, calibration)
                except ValueError:  # alpha below the calibration's resolution: only the floor
                    router = None
                for layer, logits in enumerate(router_logits):
                    counts = (router(logits, layer).counts if router is not None
                              else torch.full((logits.shape[0],), min_k))
                    rows.append({"pvalues": model, "alpha": alpha, "layer": layer,
                                 "mean_experts": float(counts.float().mean()),
                                 "floor_rate": float((counts == min_k).float().mean()),
                                 "ceiling_rate": float((counts == max_k).float().mean())})
    return pd.DataFrame(rows)


def subsample(router_logits: Sequence[torch.Tensor], max_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """The same evenly spread, seeded random subset of tokens from every layer's [T, N] logits."""
    total = router_logits[0].shape[0]
    if total <= max_tokens:
        return list(router_logits)
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
    return [logits[keep.to(logits.device)] for logits in router_logits]


# --------------------------------------------------------------------------- prompts under a routing


@dataclass
class PromptScores:
    """Per prompt (``table``) and per token (``tokens[id]`` = decoded pieces, ``counts[id]`` = [L, T]
    experts per layer and token, ``experts[id]`` = [L, T, K] chosen experts, -1 padded) of one routing."""
    label: str
    config: dict
    table: pd.DataFrame
    tokens: dict[str, list[str]]
    counts: dict[str, np.ndarray]
    experts: dict[str, np.ndarray]
    min_k: int
    max_k: int

    def load(self, num_experts: int) -> np.ndarray:
        """[L, N] assignments per expert over all prompts."""
        from . import analysis
        return sum(analysis.load_counts(e, num_experts) for e in self.experts.values())


@torch.no_grad()
def score_prompts(model, tokenizer, prompts: Sequence[Mapping[str, str]], config: Mapping, calibration=None,
                  label: str | None = None, new_tokens: int = 0, progress: bool = True) -> PromptScores:
    """Each prompt teacher-forced under ``config`` (patch mode): ``nll`` (mean negative log-likelihood
    per predicted token, nats), ``mean_experts``, ``floor_rate``, ``ceiling_rate`` per prompt, and
    with ``new_tokens`` > 0 the greedy continuation generated under the same routing."""
    from .patching import RoutingPatch
    from .selection import build_router
    router = build_router(dict(config), calibration)
    device = next(model.parameters()).device
    rows, tokens, counts, experts = [], {}, {}, {}
    for prompt in _progress(prompts, progress, label or config.get("strategy", "routing"), "prompt"):
        ids = tokenizer(prompt["prompt"], return_tensors="pt")["input_ids"].to(device)
        with RoutingPatch(model, dict(config), calibration=calibration, verbose=False) as patch:
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            arrays = patch.recorder.arrays()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
        count = arrays["count"].astype(np.int64)  # [L, T]
        row = {"id": prompt["id"], "category": prompt.get("category", ""), "n_tokens": int(ids.shape[1]),
               "nll": float(-logp.mean()) if logp.numel() else np.nan, "mean_experts": float(count.mean()),
               "floor_rate": float((count == router.min_k).mean()), "ceiling_rate": float((count == router.max_k).mean())}
        if new_tokens:
            with RoutingPatch(model, dict(config), calibration=calibration, record=False, verbose=False):
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            row["continuation"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append(row)
        tokens[prompt["id"]] = [tokenizer.decode([int(t)]) for t in ids[0]]
        counts[prompt["id"]] = count
        experts[prompt["id"]] = arrays["experts"].astype(np.int64)
    return PromptScores(label or str(config), dict(config), pd.DataFrame(rows), tokens, counts, experts,
                        router.min_k, router.max_k)


def compare_prompts(baseline: PromptScores, candidate: PromptScores,
                    metrics: Sequence[str] = ("mean_experts", "nll")) -> pd.DataFrame:
    """Paired comparison (unit = prompt) of ``candidate`` vs ``baseline`` for each metric:
    :func:`bh_routing.analysis.paired_comparison` (paired t, Wilcoxon, Cohen's d_z, 95 % CI)."""
    from .analysis import paired_comparison
    merged = baseline.table.merge(candidate.table, on="id", suffixes=("_baseline", "_candidate"))
    rows = []
    for metric in metrics:
        test = paired_comparison(merged[f"{metric}_baseline"], merged[f"{metric}_candidate"], unit="prompt")
        rows.append({"metric": metric, "baseline": baseline.label, "candidate": candidate.label,
                     **{k: v for k, v in test.items() if k not in ("notes", "difference")},
                     "notes": "; ".join(test["notes"])})
    return pd.DataFrame(rows)


@torch.no_grad()
def patch_vs_analyze(model, tokenizer, text: str, config: Mapping, calibration=None) -> dict:
    """The same forward pass natively, under ``mode="analyze"`` and under ``mode="patch"``, and once
    more after both patches are gone: max |Δ logits| of each against native (analyze and restore must
    be exactly 0), and the experts per token each mode records."""
    from .patching import RoutingPatch
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)

    def forward():
        return model(input_ids=ids, use_cache=False).logits.float()
    native = forward()
    with RoutingPatch(model, dict(config), mode="analyze", calibration=calibration, verbose=False) as patch:
        analyzed = forward()
        k_analyze = patch.recorder.counts().astype(np.float64)
    with RoutingPatch(model, dict(config), mode="patch", calibration=calibration, verbose=False) as patch:
        patched = forward()
        k_patch = patch.recorder.counts().astype(np.float64)
    restored = forward()
    return {"tokens": int(ids.shape[1]),
            "max_abs_diff_analyze": float((analyzed - native).abs().max()),
            "max_abs_diff_patch": float((patched - native).abs().max()),
            "max_abs_diff_restored": float((restored - native).abs().max()),
            "mean_experts_analyze": float(k_analyze.mean()), "mean_experts_patch": float(k_patch.mean()),
            "same_next_token_patch": bool((patched[0, -1].argmax() == native[0, -1].argmax()).item())}


LIVE_SLIDERS = {"alpha": (1e-3, 1.0), "weights_temperature": (0.25, 5.0)}  # notebook 02's interactive ranges


@torch.no_grad()
def reroute(model, tokenizer, prompt: str, calibration=None, alpha: float = 0.05, weights_temperature: float = 1.0,
            pvalues: str = "empirical", max_k: int = 8, subtitle: str | None = None):
    """Route ``prompt`` with BH (patch mode) at α, mixing with weights softmax(logits / T_w) (the
    selection does not depend on T_w): (figure of experts per token, summary with mean experts and the
    next-token top-5 next to native top-8's). For the interactive sliders."""
    from .patching import RoutingPatch
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    config = {"strategy": "bh", "alpha": alpha, "pvalues": pvalues, "max_k": max_k}
    if weights_temperature != 1.0:
        config["weights_temperature"] = weights_temperature
    native = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with RoutingPatch(model, config, calibration=calibration, verbose=False) as patch:
            routed = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
            counts = patch.recorder.counts()
    pieces = [tokenizer.decode([int(t)]) for t in ids[0]]
    fig = plots.plot_token_experts(pieces, counts, min_k=1, max_k=max_k,
                                   subtitle=subtitle or f"BH {pvalues} α={alpha} weights T={weights_temperature}")

    def top5(p):
        values, index = torch.topk(p, 5)
        return [f"{tokenizer.decode([int(i)])!r} {float(v):.3g}" for v, i in zip(values, index)]
    summary = {"alpha": alpha, "weights_temperature": weights_temperature, "mean_experts": float(counts.mean()),
               "floor_rate": float((counts == 1).mean()), "next_native": top5(native), "next_bh": top5(routed),
               "total_variation": float(0.5 * (native - routed).abs().sum())}
    return fig, summary


# =========================================================================== sweeps and cost (notebook 03)

T4_FREE_BYTES = int(14.6 * 2**30)  # free on a fresh Colab T4 runtime (15 GB card less the CUDA context)
# Assumed OLMoE-1B-7B scoring throughput on a T4 in float16 (input tokens per second). Not measured
# (no T4 here): ~2.7 GFLOP per token (1.28 B active parameters, attention, the 50k-vocabulary head at
# scored positions) against the T4's 65 TFLOPS fp16 tensor-core peak, of which small per-expert
# GEMMs (~128 tokens per expert per ~1.2k-token batch) reach perhaps 15–25 TFLOPS; plus 12.9 GB of
# weights read per forward pass at ~300 GB/s (~45 ms) and the routing/dispatch overhead. The
# compute bound is ~7k tokens/s; 2k tokens/s allows ~3.5x for what the arithmetic leaves out.
# Notebook 03 replaces it with the rate it measures on its first run.
T4_TOKENS_PER_S = 2000.0
T4_LOAD_SECONDS = 420.0  # download (~14 GB) and load of OLMoE-1B-7B on a fresh Colab runtime (assumed)


def t4_memory_plan(model_id: str | None = None):
    """The memory plan of OLMoE-1B-7B (float16) on a free Colab T4."""
    from .models import memory_plan, olmoe_1b_7b_config
    return memory_plan(olmoe_1b_7b_config(), T4_FREE_BYTES, torch.float16)


_TOKEN_CACHE: dict = {}


def run_tokens(run: "ex.Run", tokenizer, default_max_length: int = 4096) -> int:
    """Input tokens (non-padding) the evaluator feeds the model for ``run`` — counted exactly by
    building the run's requests (cached per task, items and length)."""
    from . import data
    from .evaluation import TASKS, load_docs
    if run.task == "prompts":
        return sum(len(tokenizer(p["prompt"])["input_ids"]) for p in data.prompt_set("categories")) * max(1, run.new_tokens)
    max_length = run.max_length or default_max_length
    key = (id(tokenizer), run.task, run.n, run.seed, max_length)
    if key not in _TOKEN_CACHE:
        docs, _ = load_docs(run.task, n=run.n, seed=run.seed)
        requests = TASKS[run.task].build_requests(docs, tokenizer, max_length, None)
        _TOKEN_CACHE[key] = sum(r.input_length for r in requests)
    return _TOKEN_CACHE[key]


def estimate_sweep(runs: Sequence["ex.Run"], tokenizer, tokens_per_s: float = T4_TOKENS_PER_S,
                   default_max_length: int = 4096) -> pd.DataFrame:
    """Per task: runs, input tokens per run, total tokens and estimated seconds at ``tokens_per_s``
    (empty table for no runs)."""
    columns = ["task", "runs", "tokens_per_run", "tokens", "seconds"]
    if not runs:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame([{"task": run.task, "label": run.label, "tokens": run_tokens(run, tokenizer, default_max_length)}
                          for run in runs])
    table = frame.groupby("task", sort=False).agg(runs=("label", "size"), tokens_per_run=("tokens", "mean"),
                                                  tokens=("tokens", "sum")).reset_index()
    table["seconds"] = table["tokens"] / tokens_per_s
    return table[columns]


MATCHED_STRATEGIES = 5  # experiments.matched_compute: 5 adaptive strategies per target (its top-k runs are in the preset)


def matched_runs_for_estimate(budget: "ex.Budget", targets: Sequence[int] = (2, 4, 6, 8),
                              tasks: Sequence[str] = ("wikitext",)) -> list["ex.Run"]:
    """Stand-ins for the runs :func:`bh_routing.experiments.matched_compute` adds (same tasks, items
    and lengths), to estimate its cost before its knob search runs."""
    return [ex.Run(f"matched k={k} #{i}", {"strategy": "topk", "k": k}, task, budget.n_for(task),
                   max_length=budget.max_length, group=f"matched k={k}")
            for k in targets for i in range(MATCHED_STRATEGIES) for task in tasks]


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV as a DataFrame; empty (not an error) when the file is missing or has no columns."""
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def representative_runs(runs: Sequence["ex.Run"], limit: int = 8) -> list["ex.Run"]:
    """A mix to time before estimating the rest: runs of every task and as many strategies as
    ``limit`` allows, taken round-robin over tasks (the cheapest run alone under-estimates)."""
    per_task: dict[str, list] = {}
    for run in runs:
        strategies = {r.routing.get("strategy") for r in per_task.get(run.task, [])}
        if run.task != "prompts" and run.routing.get("strategy") not in strategies:
            per_task.setdefault(run.task, []).append(run)
    mix = [run for i in range(max(map(len, per_task.values()), default=0))
           for queue in per_task.values() if i < len(queue) for run in [queue[i]]]
    return mix[:limit]


def measured_rate(records: Sequence[Mapping], estimate: pd.DataFrame) -> float | None:
    """Tokens per second of a timed mix: the mix's estimated tokens (``estimate_sweep`` of its runs)
    over the seconds its records took (None if none finished)."""
    seconds = sum(r["seconds"] for r in records if r.get("status") == "ok" and r.get("seconds"))
    return float(estimate["tokens"].sum() / seconds) if seconds else None


QUALITY_COLUMNS = {(task, metric.name): f"{task}_{metric.name}"   # (task, metric) -> comparison-table column
                   for task, spec in EVAL_TASKS.items() for metric in spec.metrics}
HEADLINE_COLUMNS = tuple(f"{task}_{spec.headline.name}" for task, spec in EVAL_TASKS.items())  # one per task


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (label): group, strategy, mean experts (mean over the tasks it ran
    on, and per task), WikiText word perplexity, HellaSwag acc/acc_norm, LAMBADA acc and perplexity,
    floor/ceiling rates — from :func:`bh_routing.report.runs_table`."""
    ok = runs[runs["status"] == "ok"]
    rows = {}
    for _, run in ok.iterrows():
        row = rows.setdefault(run["label"], {"label": run["label"], "group": run["group"], "strategy": run["strategy"]})
        row[f"experts_{run['task']}"] = run["mean_experts"]
        for (task, metric), column in QUALITY_COLUMNS.items():
            if run["task"] == task and metric in run and pd.notna(run[metric]):
                row[column] = run[metric]
        row.setdefault("_floor", []).append(run["floor_rate"])
        row.setdefault("_ceiling", []).append(run["ceiling_rate"])
    table = pd.DataFrame(list(rows.values()))
    if table.empty:
        return table
    expert_columns = [c for c in table if c.startswith("experts_")]
    table.insert(3, "mean_experts", table[expert_columns].mean(axis=1))
    table["floor_rate"] = table.pop("_floor").map(lambda v: float(np.nanmean(np.asarray(v, dtype=float))))
    table["ceiling_rate"] = table.pop("_ceiling").map(lambda v: float(np.nanmean(np.asarray(v, dtype=float))))
    ordered = ["label", "group", "strategy", "mean_experts", *[c for c in QUALITY_COLUMNS.values() if c in table],
               "floor_rate", "ceiling_rate", *expert_columns]
    return table[ordered].sort_values(["group", "mean_experts"], kind="stable").reset_index(drop=True)


def _family(row) -> str:
    """A run's strategy family from its routing knobs: 'top-k', 'BH empirical', 'top_p', ..."""
    if row["strategy"] in ("bh", "by"):
        return f"{'BH' if row['strategy'] == 'bh' else 'BY'} {row.get('pvalues') or 'empirical'}"
    return "top-k" if row["strategy"] == "topk" else str(row["strategy"])


def new_runs(existing: Sequence["ex.Run"], extra: Sequence["ex.Run"]) -> list["ex.Run"]:
    """The runs of ``extra`` that do not repeat a run of ``existing`` (same routing, task, items,
    length): matched compute's top-k references are already in the full preset."""
    def key(run):
        return (json.dumps(run.routing, sort_keys=True, default=str), run.task, run.n, run.seed, run.max_length,
                run.new_tokens)
    seen = {key(run) for run in existing}
    return [run for run in extra if key(run) not in seen]


def matched_table(runs: pd.DataFrame, metric: str = "word_perplexity", task: str = "wikitext") -> pd.DataFrame:
    """Matched compute on ``task``: per target k̄ the adaptive strategies calibrated to it (their
    ``target_k``) and top-k at k = k̄: ``target_k``, ``family``, ``label``, achieved ``mean_experts``
    and ``metric`` (descriptive; the report's findings say which differences are supported)."""
    ok = runs[(runs["status"] == "ok") & (runs["task"] == task)]
    matched = ok[ok["target_k"].notna()]
    if matched.empty:
        return pd.DataFrame(columns=["target_k", "family", "label", "mean_experts", metric])
    frames = [matched]
    topk = ok[(ok["strategy"] == "topk")]
    for target in sorted(matched["target_k"].unique()):
        if not (matched["target_k"].eq(target) & matched["strategy"].eq("topk")).any():
            reference = topk[topk["k"].astype(float) == target].head(1)
            frames.append(reference.assign(target_k=target))
    frame = pd.concat(frames, ignore_index=True)
    frame["family"] = frame.apply(_family, axis=1)
    return (frame[["target_k", "family", "label", "mean_experts", metric]]
            .sort_values(["target_k", "family"]).reset_index(drop=True))


_FAMILY_STYLE = {"top-k": ("topk", "--"), "BH empirical": ("bh", "-"), "BH zscore": ("by", "-"), "top_p": ("top_p", "-"),
                 "threshold": ("threshold", "-"), "ratio": ("ratio", "-")}


def plot_matched_compute(matched: pd.DataFrame, metric: str = "word_perplexity", subtitle: str | None = None):
    """Quality against the achieved mean experts for each strategy family at the matched targets
    (one line per family through k̄ = 2, 4, 6, 8), top-k dashed: below the dashed line is better at
    the same compute."""
    with _style():
        fig, axes = _figure(width=6.4, height=4.6)
        ax = axes[0, 0]
        for family, rows in matched.groupby("family", sort=False):
            strategy, line = _FAMILY_STYLE.get(family, (family, "-"))
            color, marker = plots.strategy_style(strategy)
            rows = rows.sort_values("mean_experts")
            ax.plot(rows["mean_experts"], rows[metric], ls=line, marker=marker, color=color, label=family,
                    lw=1.8 if family == "top-k" else 1.2, ms=7 if family == "top-k" else 5, zorder=3 if family == "top-k" else 2)
        ax.set_xlabel("mean active experts per token per layer (achieved)")
        ax.set_ylabel(plots.label_for(metric))
        ax.legend()
        return _title(fig, f"Matched compute: {metric.replace('_', ' ')} at k̄ = "
                           + ", ".join(f"{k:g}" for k in sorted(matched["target_k"].unique())), subtitle)


# =========================================================================== figures


_RC = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
       "font.size": 8.5, "axes.titlesize": 10, "figure.titlesize": 11, "legend.fontsize": 7,
       "figure.dpi": plots.DPI, "savefig.dpi": plots.DPI}


@contextlib.contextmanager
def _style():
    import matplotlib
    with matplotlib.rc_context(_RC):
        yield


def _sns():
    import seaborn
    return seaborn


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _title(fig, title: str, subtitle: str | None):
    fig.suptitle(title if not subtitle else f"{title}\n{subtitle}")
    return fig


def plot_logit_distributions(sample: RoutingSample, subtitle: str | None = None, max_points: int = 20000, seed: int = 0):
    """Per layer: box plots of all router logits and of each token's top-1 logit (left); the
    distribution of the top-1 probability with the uniform 1/N marked (right)."""
    rng = np.random.default_rng(seed)
    with _style():
        fig, axes = _figure(2, width=5.6)
        ax = axes[0, 0]
        layers = np.arange(sample.num_layers)
        every = [l.flatten().numpy() for l in sample.logits]
        every = [v if v.size <= max_points else rng.choice(v, max_points, replace=False) for v in every]
        top1 = [l.max(dim=1).values.numpy() for l in sample.logits]
        ax.boxplot(every, positions=layers - 0.18, widths=0.3, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#c6dbef"), medianprops=dict(color="#08519c"))
        ax.boxplot(top1, positions=layers + 0.18, widths=0.3, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#fcbba1"), medianprops=dict(color="#a50f15"))
        ax.set_xticks(layers, [str(l) for l in layers])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("router logit")
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(facecolor="#c6dbef", label="all experts"), Patch(facecolor="#fcbba1", label="top-1 expert")])
        ax = axes[0, 1]
        colors = _sns().color_palette("viridis", sample.num_layers)
        tops = [torch.softmax(logits, dim=-1).max(dim=1).values.numpy() for logits in sample.logits]
        high = float(max(np.quantile(t, 0.995) for t in tops))
        bins = np.linspace(0, min(1.0, max(high * 1.05, 2.0 / sample.num_experts)), 41)
        for layer, top in enumerate(tops):
            ax.hist(np.clip(top, 0, bins[-1]), bins=bins, histtype="step", density=True, color=colors[layer],
                    label=f"layer {layer}")
        ax.axvline(1 / sample.num_experts, ls="--", color="0.3", lw=1, label=f"uniform 1/{sample.num_experts}")
        ax.set_xlabel("top-1 routing probability (largest mixing weight)")
        ax.set_ylabel("density")
        ax.legend(ncol=2 if sample.num_layers > 6 else 1)
        return _title(fig, "Router logits and top-1 probability per layer", subtitle)


def plot_entropy_across_layers(sample: RoutingSample, subtitle: str | None = None):
    """Normalised routing entropy per layer (median, inter-quartile and 5–95 % bands) and the mean
    top-1 probability, against the uniform router."""
    entropy = [(_entropy_nats(torch.softmax(l.double(), -1)) / math.log(sample.num_experts)).numpy() for l in sample.logits]
    layers = np.arange(sample.num_layers)
    q = np.array([np.quantile(e, [0.05, 0.25, 0.5, 0.75, 0.95]) for e in entropy])
    with _style():
        fig, axes = _figure(2, width=5.0)
        ax = axes[0, 0]
        ax.fill_between(layers, q[:, 0], q[:, 4], color="#9ecae1", alpha=0.4, label="5–95 %")
        ax.fill_between(layers, q[:, 1], q[:, 3], color="#4292c6", alpha=0.5, label="25–75 %")
        ax.plot(layers, q[:, 2], marker="o", color="#08306b", label="median")
        ax.axhline(1.0, ls="--", color="0.3", lw=1, label="uniform router")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("routing entropy / log N")
        ax.legend()
        ax = axes[0, 1]
        top1 = [torch.softmax(l, -1).max(dim=1).values.double().mean().item() for l in sample.logits]
        ax.plot(layers, top1, marker="s", color="#a50f15", label="mean top-1 probability")
        ax.axhline(1 / sample.num_experts, ls="--", color="0.3", lw=1, label="uniform 1/N")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("top-1 routing probability")
        ax.legend()
        return _title(fig, "Routing entropy across layers", subtitle)


def plot_concentration(conc: pd.DataFrame, subtitle: str | None = None):
    """Share of the routing mass in the top-1/2/4/8 experts per layer (solid) vs uniform (dashed)."""
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        colors = _sns().color_palette("rocket", conc["k"].nunique())
        for color, (k, rows) in zip(colors, conc.groupby("k")):
            ax.plot(rows["layer"], rows["mass"], marker="o", color=color, label=f"top-{k}")
            ax.axhline(rows["uniform"].iloc[0], ls=":", color=color, lw=1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("share of routing probability mass")
        ax.legend(title="dotted: uniform router")
        return _title(fig, "Weight concentration: mass in the top-k experts", subtitle)


def plot_mass_left_out(sample: RoutingSample, subtitle: str | None = None):
    """Per layer, the distribution over tokens of the probability mass outside the native top-k."""
    left = [(1 - torch.topk(torch.softmax(l.double(), -1), sample.top_k, dim=-1).values.sum(dim=1)).numpy()
            for l in sample.logits]
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        layers = np.arange(sample.num_layers)
        ax.boxplot(left, positions=layers, widths=0.5, showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#fdd0a2"), medianprops=dict(color="#7f2704"))
        ax.plot(layers, [v.mean() for v in left], marker="D", color="#7f2704", lw=1, label="mean")
        ax.axhline(1 - sample.top_k / sample.num_experts, ls="--", color="0.3", lw=1,
                   label=f"uniform router ({1 - sample.top_k / sample.num_experts:.0%})")
        ax.set_xticks(layers, [str(l) for l in layers])
        ax.set_ylim(0, 1)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(f"probability mass outside the top-{sample.top_k}")
        ax.legend()
        return _title(fig, f"Routing mass the native top-{sample.top_k} leaves out", subtitle)


def plot_domain_usage(usage: pd.DataFrame, layer: int, subtitle: str | None = None):
    """Heatmap source × expert of log2(P(expert | source) / P(expert)) in one layer: red = the source
    uses the expert more than average, blue = less."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.log2(usage.drop(index="all") / usage.loc["all"])
    lift = lift.replace([np.inf, -np.inf], np.nan).clip(-3, 3)
    with _style():
        fig, axes = _figure(width=min(16.0, 3 + 0.2 * usage.shape[1]), height=max(3.0, 1.5 + 0.35 * len(lift)))
        _sns().heatmap(lift, ax=axes[0, 0], cmap="RdBu_r", center=0, vmin=-3, vmax=3,
                          cbar_kws={"label": "log2 lift vs all text (clipped at ±3)"},
                          xticklabels=max(1, usage.shape[1] // 16))
        axes[0, 0].set_xlabel("expert")
        axes[0, 0].set_ylabel("text source")
        return _title(fig, f"Per-source expert usage, layer {layer}", subtitle)


def plot_specialisation(spec: pd.DataFrame, subtitle: str | None = None):
    """Mutual information between text source and chosen expert per layer, with the chance level."""
    with _style():
        fig, axes = _figure(width=6.0)
        ax = axes[0, 0]
        ax.plot(spec["layer"], spec["mi_bits"], marker="o", color="#6a51a3", label="I(source; expert)")
        ax.plot(spec["layer"], spec["mi_shuffled_bits"], marker="x", ls="--", color="0.4",
                label="shuffled sources (chance)")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("mutual information (bits)")
        ax.legend()
        return _title(fig, "Expert specialisation by text source", subtitle)


def plot_token_view(view: pd.DataFrame, value: str = "top1_prob", subtitle: str | None = None, max_tokens: int = 48):
    """Heatmap token × layer of ``value`` (default the top-1 probability), each cell annotated with
    the top-1 expert's id."""
    view = view[view["position"] < view["position"].min() + max_tokens]
    grid = view.pivot(index="layer", columns="position", values=value)
    experts = view.pivot(index="layer", columns="position", values="top1_expert")
    labels = view.drop_duplicates("position").sort_values("position")["token"].map(lambda t: repr(t)[1:-1])
    with _style():
        fig, axes = _figure(width=max(6.0, 0.38 * grid.shape[1] + 2), height=max(3.0, 0.4 * grid.shape[0] + 1.6))
        ax = axes[0, 0]
        _sns().heatmap(grid, ax=ax, cmap="magma", annot=experts.to_numpy(), fmt="d", annot_kws={"fontsize": 6},
                          cbar_kws={"label": value.replace("_", " ")}, xticklabels=list(labels))
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer")
        return _title(fig, f"Token-level routing: {value.replace('_', ' ')} (numbers: top-1 expert)", subtitle)


def plot_bh_explained(explanation: BhExplanation, subtitle: str | None = None, zoom: int = 16):
    """Sorted p-values against the BH line c_k = (k/N)·α: all N ranks on a log scale (left) and the
    first ``zoom`` ranks (right). Filled: selected by the router; black ring: native top-k; the
    dotted line marks k*."""
    t = explanation.table
    with _style():
        fig, axes = _figure(2, width=5.4)
        for ax, part, logy in ((axes[0, 0], t, True), (axes[0, 1], t.head(zoom), False)):
            ax.plot(part["rank"], part["critical"], color="#d62728", lw=1.5,
                    label=f"critical value c_k ({explanation.procedure.upper()}, α = {explanation.alpha})")
            ax.scatter(part["rank"], part["pvalue"], s=22, facecolor=np.where(part["selected"], "#d62728", "white"),
                       edgecolor="#444444", linewidth=0.7, zorder=3, label="sorted p-values (filled: selected)")
            native = part[part["native"]]
            ax.scatter(native["rank"], native["pvalue"], s=80, facecolor="none", edgecolor="black", linewidth=1.2,
                       zorder=4, label="native top-k expert")
            if explanation.k_star:
                ax.axvline(explanation.k_star + 0.5, ls=":", color="0.3", lw=1, label=f"k* = {explanation.k_star}")
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel("rank k (experts by increasing p-value)")
            ax.set_ylabel("p-value")
        axes[0, 0].legend(loc="lower right")
        axes[0, 1].set_title(f"first {zoom} ranks")
        return _title(fig, f"BH on one token, layer {explanation.layer} ({explanation.pvalues} p-values): "
                           f"k* = {explanation.k_star}, selected {explanation.k_selected}", subtitle)


def plot_smallest_pvalues(smallest: Mapping[str, np.ndarray], alpha: float, num_experts: int, subtitle: str | None = None):
    """Per p-value model, the distribution over tokens (all layers) of the smallest of the N p-values,
    with α/N (BH's first critical value) and α marked: left of α/N BH can select on its own."""
    with _style():
        fig, axes = _figure(len(smallest), width=3.6, height=3.4)
        for ax, (model, values) in zip(axes[0], smallest.items()):
            logs = np.log10(np.clip(values, 1e-12, 1))
            low = min(float(logs.min()), math.log10(alpha / num_experts)) - 0.2
            high = max(float(logs.max()), math.log10(alpha)) + 0.1
            ax.hist(logs, bins=np.linspace(low, high, 41), color="#6baed6", edgecolor="white")
            ax.axvline(math.log10(alpha / num_experts), color="#d62728", lw=1.5, label=f"α/N = {alpha / num_experts:.2g}")
            ax.axvline(math.log10(alpha), color="#ff7f0e", lw=1, ls="--", label=f"α = {alpha}")
            share = float((values <= alpha / num_experts).mean())
            ax.set_title(f"{model}: {share:.0%} of tokens ≤ α/N")
            ax.set_xlabel("log10 smallest p-value of the token")
            ax.set_ylabel("tokens × layers")
            ax.legend()
        return _title(fig, "Why naive p-values fail: the smallest p-value per token", subtitle)


def plot_count_heatmap(tokens: Sequence[str], counts: np.ndarray, subtitle: str | None = None, max_k: int | None = None):
    """Heatmap layer × token of the experts each token used, annotated."""
    counts = np.asarray(counts)
    with _style():
        fig, axes = _figure(width=max(6.0, 0.38 * counts.shape[1] + 2), height=max(3.0, 0.4 * counts.shape[0] + 1.6))
        ax = axes[0, 0]
        _sns().heatmap(counts, ax=ax, cmap="viridis", annot=True, fmt="d", annot_kws={"fontsize": 6}, vmin=0,
                          vmax=max_k, cbar_kws={"label": "experts"}, xticklabels=[repr(t)[1:-1] for t in tokens])
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer")
        return _title(fig, "Experts per token and layer", subtitle)


def plot_maxk_lines(grid: pd.DataFrame, metric: str, topk: pd.DataFrame | None = None, ylabel: str | None = None,
                    subtitle: str | None = None, title: str | None = None):
    """``metric`` against max_k (log2 axis), one line per α; top-k at k = max_k dashed when given."""
    with _style():
        fig, axes = _figure(width=5.8)
        ax = axes[0, 0]
        colors = _sns().color_palette("colorblind", grid["alpha"].nunique())
        for color, (alpha, rows) in zip(colors, grid.groupby("alpha")):
            rows = rows.sort_values("max_k")
            ax.plot(rows["max_k"], rows[metric], marker="o", color=color, label=f"BH α = {alpha:g}")
        if topk is not None and len(topk) and metric in topk:
            rows = topk.sort_values("k")
            ax.plot(rows["k"], rows[metric], marker="s", ls="--", color="#222222", label="top-k (k = max_k)")
        ax.set_xscale("log", base=2)
        ks = sorted(set(grid["max_k"].astype(int)))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("max_k")
        ax.set_ylabel(ylabel or plots.label_for(metric))
        ax.legend()
        return _title(fig, title or f"{plots.label_for(metric)} vs max_k", subtitle)


# =========================================================================== results


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 4,
                   max_rows: int | None = None) -> str:
    """A GitHub Markdown table; floats to ``digits`` significant digits, NaN/None as '–'."""
    if columns is not None:
        frame = frame[[c for c in columns if c in frame]]
    if max_rows is not None:
        frame = frame.head(max_rows)
    if frame.empty:
        return "_(no rows)_\n"

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (int, np.integer)):
            return f"{value:,}" if abs(value) >= 10000 else str(value)
        if isinstance(value, (float, np.floating)):
            if math.isinf(value):
                return "∞" if value > 0 else "−∞"
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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


def write_report(path: str | os.PathLike, title: str, session: Session | None, blocks: Sequence[str],
                 figures: Sequence[tuple[str, str]] = ()) -> Path:
    """A Markdown report: title, the session's settings, ``blocks`` (Markdown, in order), then the
    ``figures`` as (file name relative to the report, caption)."""
    path = Path(path)
    lines = [f"# {title}", ""]
    if session is not None:
        lines += [session.markdown(), "", f"_Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by bh_routing "
                  f"{__version__}; every number below was computed by this run._", ""]
    lines += [block.rstrip() + "\n" for block in blocks]
    if figures:
        lines += ["## Figures", ""] + [f"![{caption}]({name})\n\n*{caption}*\n" for name, caption in figures]
    from .store import write_atomic
    write_atomic(path, "\n".join(lines))
    return path


def first_alpha_reaching(curve: pd.DataFrame, target: float, value: str = "mean_experts") -> pd.DataFrame:
    """Per p-value model: the smallest α of the grid whose layer-mean ``value`` reaches ``target``
    (NaN when no α does), and the value there."""
    means = curve.groupby(["pvalues", "alpha"], sort=True)[value].mean().reset_index()
    rows = []
    for model, frame in means.groupby("pvalues", sort=False):
        hit = frame[frame[value] >= target]
        rows.append({"pvalues": model, "target": target, "alpha": float(hit["alpha"].iloc[0]) if len(hit) else np.nan,
                     value: float(hit[value].iloc[0]) if len(hit) else float(frame[value].max())})
    return pd.DataFrame(rows)


def display_markdown(text: str | Sequence[str]) -> None:
    """Render Markdown in a notebook (printed elsewhere). A list becomes bullet points."""
    if not isinstance(text, str):
        text = "\n".join(f"- {line}" for line in text)
    try:
        from IPython.display import Markdown, display
        display(Markdown(text))
    except ImportError:
        print(text)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    from .store import write_json as write
    write(path, value)
    return Path(path)


def zip_folder(folder: str | os.PathLike, exclude_dirs: Sequence[str] = ("runs",),
               suffixes: Sequence[str] = (".json", ".jsonl", ".csv", ".png", ".md", ".safetensors", ".txt")) -> Path:
    """Zip ``folder`` (files with ``suffixes``, skipping sub-folders named in ``exclude_dirs`` — the
    per-run token arrays of a sweep stay on disk for resuming) to ``<folder>.zip``."""
    folder = Path(folder)
    target = folder.with_suffix(".zip")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if not path.is_file() or any(part in exclude_dirs for part in relative.parts[:-1]):
                continue
            if path.suffix in suffixes:
                archive.write(path, Path(folder.name) / relative)
    return target


def offer_download(path: str | os.PathLike) -> str:
    """On Colab, download ``path`` to the user's machine; elsewhere say where it is."""
    path = Path(path)
    if in_colab():
        from google.colab import files  # type: ignore[import-not-found]
        files.download(str(path))
        return f"downloading {path.name} ({path.stat().st_size / 1e6:.1f} MB)"
    return f"not on Colab: the results are at {path} ({path.stat().st_size / 1e6:.1f} MB)"
