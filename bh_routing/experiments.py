"""Sweeps: routing configurations × tasks × a budget, checkpointed so that a killed sweep resumes.

A :class:`Run` is data (label, routing config, task, budget), checked when it is made; its ``run_id``
hashes the run *and* the sweep context (model and weights, dtype, calibration, data, version).
:func:`run_sweep` checks every run before the first one starts, refuses a folder that holds another
context (see ``folder``) or that another sweep is writing, skips runs already in ``results.jsonl``,
and records a failing run with its error and goes on. A *transient* failure (out of memory, a full
disk, any OSError) runs again on the next resume; a permanent one (NaN, a bug) only with
``retry_failed``. Presets reproduce the seed notebooks' grids.

Calibration text and WikiText evaluation text are the two parts of ``data.wikitext_split``, so no
evaluated token was seen by calibration.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .folder import check_context, claim_context, folder_lock
from .pvalues import CALIBRATED, Calibration, calibration_requirement
from .store import ResultStore, latest_by_run, write_json

TASKS = ("wikitext", "hellaswag", "lambada", "domains", "prompts")
CALIBRATION_FILE = "calibration.safetensors"  # a sweep folder keeps the calibration of its context


@dataclass(frozen=True)
class Run:
    label: str
    routing: Mapping  # a build_router config, or {"per_layer": {layer: config}}
    task: str  # one of TASKS
    n: int | None = None  # items (WikiText: articles; prompts: all of the set)
    seed: int | None = None
    max_length: int | None = None
    new_tokens: int = 0  # prompts: greedy tokens generated per prompt
    group: str = ""  # what the run belongs to in a preset (e.g. "alpha", "matched k=4")

    def __post_init__(self):
        def fail(problem):
            raise ValueError(f"Run {self.label!r}: {problem}")

        def whole(name, value, low, allow_none=True):
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                fail(f"{name} must be a whole number >= {low}{' or None' if allow_none else ''}, got {value!r}")
            return int(value)

        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError(f"Run label must be a non-empty string, got {self.label!r}")
        if not isinstance(self.routing, Mapping):
            fail(f"routing must be a dict (a build_router config or {{'per_layer': {{layer: config}}}}), "
                 f"got {self.routing!r}")
        if "per_layer" in self.routing and not (isinstance(self.routing["per_layer"], Mapping)
                                                and all(isinstance(c, Mapping) for c in self.routing["per_layer"].values())):
            fail("routing['per_layer'] must map layer indices to routing configs")
        if self.task not in TASKS:
            fail(f"unknown task {self.task!r}; choose one of {TASKS}")
        if not isinstance(self.group, str):
            fail(f"group must be a string, got {self.group!r}")
        for name, low in (("n", 1), ("max_length", 1)):  # n=0 has no metric; max_length 0 is no input
            object.__setattr__(self, name, whole(name, getattr(self, name), low))
        if self.seed is not None:
            object.__setattr__(self, "seed", whole("seed", self.seed, 0))
        minimum = 1 if self.task == "prompts" else 0
        object.__setattr__(self, "new_tokens", whole("new_tokens", self.new_tokens, minimum, allow_none=False))

    def run_id(self, context: Mapping) -> str:
        blob = json.dumps({"run": asdict(self), "context": dict(context)}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Budget:
    wikitext_docs: int | None
    hellaswag: int | None
    lambada: int | None
    max_length: int | None
    new_tokens: int

    def n_for(self, task: str) -> int | None:
        return {"wikitext": self.wikitext_docs, "hellaswag": self.hellaswag, "lambada": self.lambada}.get(task)


BUDGETS = {
    "smoke": Budget(wikitext_docs=1, hellaswag=8, lambada=8, max_length=128, new_tokens=4),  # tests, CI
    "demo": Budget(wikitext_docs=2, hellaswag=60, lambada=60, max_length=256, new_tokens=16),  # tiny model, 2 CPUs
    "colab": Budget(wikitext_docs=8, hellaswag=300, lambada=300, max_length=1024, new_tokens=50),  # OLMoE, free T4
    "full": Budget(wikitext_docs=None, hellaswag=None, lambada=None, max_length=None, new_tokens=50),
}

# --------------------------------------------------------------------------- presets


def _adaptive_settings() -> list[tuple[str, dict]]:
    return ([(f"top_p {p}", {"strategy": "top_p", "p": p}) for p in (0.1, 0.2, 0.3, 0.45)]
            + [(f"threshold {t}", {"strategy": "threshold", "tau": t}) for t in (0.1, 0.06, 0.04, 0.02)]
            + [(f"ratio {b}", {"strategy": "ratio", "beta": b}) for b in (0.8, 0.5, 0.3, 0.1)]
            + [("entropy 1-8", {"strategy": "entropy"})])


# The grids a notebook's parameters cell exposes; the presets are these defaults, so their run ids
# stay what they were.
FULL_KS = (2, 4, 6, 8)  # top-k, its normalised/uniform variants and BH's max_k side by side
FULL_STRATEGIES = ("top-k", "normalized", "uniform", "adaptive", "bh max_k", "bh alpha", "other adaptive")
FULL_MAX_KS = (16, 32, 64)  # BH α=0.05 beyond the native 8
FULL_ALPHAS = (0.01, 0.10)  # BH max_k=8 beside the α=0.05 of the matched-k group
DEEP_DIVE_PVALUES = ("softmax", "pooled", "empirical", "zscore")
DEEP_DIVE_ALPHAS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
SOFTMAX_TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)  # deep dive: T of the softmax p-values
WEIGHTS_TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0)  # deep dive: T of the mixing weights
GRID_ALPHAS = (0.01, 0.05, 0.10)  # deep dive: the α x max_k grid
GRID_MAX_KS = (8, 16, 32, 64)


def _check_grid(name: str, values: Sequence, allowed: Sequence | None = None) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list or tuple of values, got {values!r}")
    unknown = [v for v in values if allowed is not None and v not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; choose from {list(allowed)}")


def full_experiments(budget: Budget, tasks: Sequence[str] = ("wikitext", "hellaswag", "lambada"),
                     ks: Sequence[int] = FULL_KS, max_ks: Sequence[int] = FULL_MAX_KS,
                     alphas: Sequence[float] = FULL_ALPHAS,
                     strategies: Sequence[str] = FULL_STRATEGIES) -> list[Run]:
    """The strategy matrix on ``tasks``: each group of ``strategies`` (FULL_STRATEGIES) at its grid."""
    for name, values in (("tasks", tasks), ("ks", ks), ("max_ks", max_ks), ("alphas", alphas)):
        _check_grid(name, values)
    _check_grid("strategies", strategies, FULL_STRATEGIES)
    configs: list[tuple[str, str, dict]] = []
    for k in ks:
        configs += [("top-k", f"top-{k}", {"strategy": "topk", "k": k}),
                    ("normalized", f"normalized top-{k}", {"strategy": "topk_renorm", "k": k}),
                    ("uniform", f"uniform top-{k}", {"strategy": "topk_uniform", "k": k}),
                    ("adaptive", f"BH α=0.05 max_k={k}", {"strategy": "bh", "alpha": 0.05, "max_k": k})]
    configs += [("bh max_k", f"BH α=0.05 max_k={m}", {"strategy": "bh", "alpha": 0.05, "max_k": m})
                for m in max_ks]
    configs += [("bh alpha", f"BH α={a} max_k=8", {"strategy": "bh", "alpha": a, "max_k": 8}) for a in alphas]
    configs += [("other adaptive", label, cfg) for label, cfg in _adaptive_settings()]
    return [Run(label, cfg, task, budget.n_for(task), max_length=budget.max_length, group=group)
            for task in tasks for group, label, cfg in configs if group in strategies]


def bh_deep_dive(budget: Budget, task: str = "wikitext", alphas: Sequence[float] = DEEP_DIVE_ALPHAS,
                 pvalues: Sequence[str] = DEEP_DIVE_PVALUES,
                 temperatures: Sequence[float] = SOFTMAX_TEMPERATURES,
                 weights_temperatures: Sequence[float] = WEIGHTS_TEMPERATURES,
                 grid_alphas: Sequence[float] = GRID_ALPHAS, max_ks: Sequence[int] = GRID_MAX_KS,
                 topk_ks: Sequence[int] = ()) -> list[Run]:
    """Native top-8; BH per p-value model over ``alphas``; softmax p-values over ``temperatures``
    (calibrated p-values are temperature-invariant and refuse T != 1); the mixing weights over
    ``weights_temperatures`` at a fixed selection; the ``grid_alphas`` x ``max_ks`` grid; top-k at
    ``topk_ks``."""
    for name, values in (("alphas", alphas), ("temperatures", temperatures), ("grid_alphas", grid_alphas),
                         ("weights_temperatures", weights_temperatures), ("max_ks", max_ks),
                         ("topk_ks", topk_ks)):
        _check_grid(name, values)
    _check_grid("pvalues", pvalues, DEEP_DIVE_PVALUES)

    def run(label, config, group):
        return Run(label, config, task, budget.n_for(task), max_length=budget.max_length, group=group)

    runs = [run("native top-8", {"strategy": "topk", "k": 8}, "baseline")]
    runs += [run(f"BH {model} α={a}", {"strategy": "bh", "pvalues": model, "alpha": a}, f"alpha/{model}")
             for model in pvalues for a in alphas]
    runs += [run(f"BH softmax α=0.05 T={t}", {"strategy": "bh", "pvalues": "softmax", "alpha": 0.05,
                                               "temperature": t}, "temperature/softmax") for t in temperatures]
    runs += [run(f"BH empirical α=0.05 weights T={t}", {"strategy": "bh", "alpha": 0.05, "weights_temperature": t},
                 "weights temperature") for t in weights_temperatures]
    runs += [run(f"BH empirical α={a} max_k={m}", {"strategy": "bh", "alpha": a, "max_k": m}, "alpha x max_k")
             for m in max_ks for a in grid_alphas]
    runs += [run(f"top-{k}", {"strategy": "topk", "k": k}, "top-k by k") for k in topk_ks]
    return runs


SEED_PROMPT_CONFIGS = {
    "topk_8": {"strategy": "topk", "k": 8},
    "bh_strict": {"strategy": "bh", "alpha": 0.01, "max_k": 8},
    "bh_moderate": {"strategy": "bh", "alpha": 0.05, "max_k": 8},
    "bh_loose": {"strategy": "bh", "alpha": 0.10, "max_k": 8},
    # α 0.10 with room for 16 experts: the test, not the cap, decides each token's count (the seed's
    # T = 2 made the calibrated p-values invalid and left 95 % of tokens on the floor).
    "bh_adaptive": {"strategy": "bh", "pvalues": "empirical", "alpha": 0.10, "max_k": 16},
}


def prompt_suite(budget: Budget) -> list[Run]:
    return [Run(name, cfg, "prompts", new_tokens=budget.new_tokens, group="prompt suite")
            for name, cfg in SEED_PROMPT_CONFIGS.items()]


PRESETS = ("full", "deep-dive", "matched", "prompts")


# --------------------------------------------------------------------------- calibration pass


def calibration_windows(tokenizer, window: int = 512, max_tokens: int = 32768) -> list[torch.Tensor]:
    """Token windows [1, S] of the WikiText-2 calibration articles (``data.wikitext_split``)."""
    from .data import wikitext_split
    documents = wikitext_split("calibration").records
    ids = tokenizer("".join(d["page"] for d in documents), verbose=False)["input_ids"][:max_tokens]   # windowed below
    return [torch.tensor(ids[i:i + window])[None] for i in range(0, len(ids), window)]


def calibration_size(configs: Sequence[Mapping], num_experts: int, top_k: int) -> tuple[int, int]:
    """(tokens, null samples per expert) that let every calibrated bh/by config in ``configs`` (plain or
    ``{"per_layer": ...}``) select one expert on its own: its smallest critical value c_1 resolvable."""
    flat = [c for config in configs for c in (config["per_layer"].values() if "per_layer" in config else [config])]
    needs = [calibration_requirement(c.get("alpha", 0.05), c["strategy"], num_experts, top_k, c.get("pvalues", "empirical"))
             for c in flat if c.get("strategy") in ("bh", "by") and c.get("pvalues", "empirical") in CALIBRATED]
    empirical = [n for n in needs if n.model == "empirical"]
    tokens = max((n.tokens for n in needs), default=0)
    return tokens, max((n.null_samples for n in empirical), default=0)


def calibrate(model, tokenizer, max_tokens: int = 32768, window: int = 512, model_id: str | None = None,
              size_for: Sequence[Mapping] | None = None) -> tuple[Calibration, list[torch.Tensor]]:
    """One teacher-forced pass with the native router → (Calibration, per-layer logits [T, N]).

    ``size_for``: the routing configs of the sweep the calibration serves; ``max_tokens`` and the
    per-expert null size grow to what its smallest α needs (``calibration_size``), with a warning when
    the calibration articles hold fewer tokens than that. The metadata records the model (id, a sample
    of its weights) so that the calibration is refused on another model (``Calibration.load(path, model=...)``)."""
    from .patching import collect_router_logits, find_moe_blocks
    from .pvalues import model_metadata
    for name, value in (("max_tokens", max_tokens), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"calibration {name} must be a whole number of tokens >= 1, got {value!r}")
    requested_tokens = max_tokens
    block = find_moe_blocks(model)[0]
    samples_per_expert = 8192
    if size_for:
        tokens, samples = calibration_size(size_for, block.num_experts, block.top_k)
        max_tokens, samples_per_expert = max(max_tokens, tokens), max(samples_per_expert, samples)
    device = next(model.parameters()).device
    windows = calibration_windows(tokenizer, window, max_tokens)
    available = sum(w.shape[1] for w in windows)
    if size_for and available < max_tokens:
        warnings.warn(f"the sweep's smallest alpha needs ~{max_tokens:,} calibration tokens; the calibration articles "
                      f"hold {available:,}: BH/BY at that alpha cannot select an expert on its own", stacklevel=2)
    batches = [w.to(device) for w in windows]
    with torch.no_grad():
        logits = collect_router_logits(model, batches, max_tokens=max_tokens)
    meta = {"model": model_id or getattr(model.config, "_name_or_path", ""),
            "data": "wikitext-2-raw-v1 test, calibration articles (data.wikitext_split)", "tokens": int(logits[0].shape[0]),
            "max_tokens": int(requested_tokens), **model_metadata(model)}
    return Calibration.from_router_logits(logits, top_k=block.top_k, max_samples_per_expert=samples_per_expert,
                                          metadata=meta), logits


# --------------------------------------------------------------------------- execution


@dataclass
class SweepContext:
    """What every run of a sweep shares. A calibration made on another model is refused here."""
    model: Any
    tokenizer: Any
    model_id: str
    calibration: Calibration | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.calibration is not None:
            self.calibration.check_model(self.model)
        self._described = None

    def describe(self) -> dict:
        """The context a run id hashes (the folder's context adds the budget and data versions)."""
        if self._described is None:
            from . import __version__
            from .models import weights_fingerprint
            calibration = None
            if self.calibration is not None:
                calibration = {key: value for key, value in self.calibration.metadata.items() if key != "weights"}
                calibration["fingerprint"] = self.calibration.fingerprint()
            self._described = {"model_id": self.model_id, "weights_fingerprint": weights_fingerprint(self.model),
                               "dtype": str(next(self.model.parameters()).dtype), "calibration": calibration,
                               "bh_routing": __version__, **self.extra}
        return self._described


def budget_of(runs: Sequence) -> dict:
    """{task: its items/max_length/seed (prompts: new tokens)} of ``runs`` (Runs or their records);
    one setting per task, or ValueError: a folder's report compares the runs of a task item by item."""
    settings: dict[str, dict] = {}
    for run in runs:
        get = run.get if isinstance(run, Mapping) else lambda key: getattr(run, key)
        task = get("task")
        value = ({"new_tokens": get("new_tokens")} if task == "prompts"
                 else {"n": get("n"), "max_length": get("max_length"), "seed": get("seed")})
        if settings.setdefault(task, value) != value:
            raise ValueError(f"runs of task {task!r} use different budgets ({settings[task]} and {value}): a sweep "
                             "folder holds one budget per task; put the others in another folder")
    return settings


def check_runs(context: SweepContext, runs: Sequence) -> None:
    """Every run's config, built for this model and calibration, before any work: ValueError listing
    all invalid runs (nothing is run), so one bad run never stops a sweep half-way."""
    problems = []
    for index, run in enumerate(runs):
        if not isinstance(run, Run):
            problems.append(f"runs[{index}]: not a Run but {run!r}")
            continue
        try:
            _patch(context, run.routing)  # builds every router; nothing is applied to the model
        except (ValueError, TypeError, KeyError, IndexError) as error:
            problems.append(f"runs[{index}] {run.label!r} ({run.task}): {error}")
    if problems:
        raise ValueError(f"{len(problems)} of {len(runs)} runs are invalid; nothing was run:\n  "
                         + "\n  ".join(problems))
    budget_of(runs)


def _patch(context: SweepContext, routing: Mapping):
    from .prompts import routing_patch
    return routing_patch(context.model, routing, context.calibration)


def _floor_ceiling(counts: np.ndarray, patch) -> dict:
    """Share of (token, layer) counts at each layer's min_k (floor) and max_k (ceiling);
    ``counts`` is [tokens, layers] in the order of ``patch.layers``."""
    min_k = np.array([patch.routers[layer].min_k for layer in patch.layers])
    max_k = np.array([patch.routers[layer].max_k for layer in patch.layers])
    return {"floor_rate": float((counts == min_k).mean()), "ceiling_rate": float((counts == max_k).mean())}


def execute_eval(context: SweepContext, run: Run, run_dir: Path) -> dict:
    from .evaluation import evaluate
    with _patch(context, run.routing) as patch:  # WikiText: evaluation articles only (data.wikitext_split)
        result = evaluate(context.model, context.tokenizer, run.task, n=run.n, seed=run.seed, max_length=run.max_length, recorder=patch, model_id=context.model_id,
                          routing_config=dict(run.routing))
        limits = _floor_ceiling(result.token_experts, patch)
    bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)
           and not k.endswith("_stderr")}
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: the routed model produced NaN/inf")
    result.save(run_dir)
    scoring = result.config["scoring"]
    return {"metrics": result.metrics, "experts": result.routing, **limits,
            "tokens_per_s": scoring["input_tokens_per_s"], "n_items": result.config["n_items"],
            "data": result.config["data"], "max_length": result.config["max_length"],
            "stride": result.config["stride"], "versions": result.config["versions"],
            "device": result.config["device"], "dtype": result.config["dtype"]}


def execute_prompts(context: SweepContext, run: Run, run_dir: Path) -> dict:
    """The 12 category prompts under ``run.routing`` (``prompts.score_prompts``): teacher-forced NLL
    and experts per token, greedy continuations of ``new_tokens`` in one batch, and the suite's
    statistics (``prompts.prompt_statistics``). Saves ``run_dir``.json (one row per prompt) and
    ``run_dir``.npz (per-token counts [L, T] and experts [L, T, K] of every prompt, concatenated;
    ``prompt`` [T] says which prompt each token belongs to)."""
    from .prompt_sets import prompt_set
    from .patching import find_moe_blocks
    from .prompts import prompt_statistics, score_prompts
    scores = score_prompts(context.model, context.tokenizer, prompt_set("categories"), run.routing,
                           context.calibration, label=run.label, new_tokens=run.new_tokens, progress=False)
    stats = prompt_statistics(scores, find_moe_blocks(context.model)[0].num_experts)
    rows = scores.table.to_dict(orient="records")
    write_json(run_dir.with_suffix(".json"), rows)
    ids = list(scores.counts)
    width = max(scores.experts[i].shape[2] for i in ids)
    np.savez_compressed(run_dir.with_suffix(".npz"),
                        counts=np.concatenate([scores.counts[i] for i in ids], axis=1).astype(np.int16),
                        experts=np.concatenate([np.pad(scores.experts[i], ((0, 0), (0, 0), (0, width - scores.experts[i].shape[2])),
                                                       constant_values=-1) for i in ids], axis=1).astype(np.int16),
                        prompt=np.repeat(np.arange(len(ids)), [scores.counts[i].shape[1] for i in ids]))
    generation = scores.generation
    return {"prompts": rows, "experts": {"mean_experts": stats["experts_mean"],
                                         "mean_experts_per_layer": stats["mean_experts_per_layer"]},
            "floor_rate": stats["floor_rate"], "ceiling_rate": stats["ceiling_rate"], "prompt_stats": stats,
            "tokens_per_s": generation["tokens_per_s"], "generated_tokens": generation["generated_tokens"],
            "seconds_generate": generation["seconds"]}


def is_transient(error: BaseException) -> bool:
    """A failure of resources, not of the run — out of memory (host or GPU) or any OSError (a full
    disk, an I/O error) — runs again on the next resume."""
    return (isinstance(error, (OSError, MemoryError, torch.cuda.OutOfMemoryError))
            or "out of memory" in str(error).lower())


def _artifacts(folder: Path, record: Mapping) -> list[Path]:
    base = folder / "runs" / record["run_id"]
    # prompt runs from before their per-token arrays were saved keep their .json only
    arrays = record.get("task") != "prompts" or "prompt_stats" in record
    return [base.with_suffix(".json")] + ([base.with_suffix(".npz")] if arrays else [])


def _needs_running(record: Mapping | None, folder: Path, retry_failed: bool) -> bool:
    if record is None:
        return True
    if record["status"] == "failed":
        return retry_failed or bool(record.get("transient"))
    return not all(path.exists() for path in _artifacts(folder, record))


def _execute(context: SweepContext, run: Run, run_id: str, folder: Path, described: dict) -> dict:
    started = time.time()
    record = {"run_id": run_id, **asdict(run), "strategy": run.routing.get("strategy"), "context": described}
    try:
        execute = execute_prompts if run.task == "prompts" else execute_eval
        record |= {"status": "ok", **execute(context, run, folder / "runs" / run_id)}
    except Exception as error:  # an OOM, NaN or full disk fails this run, not the sweep
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        record |= {"status": "failed", "transient": is_transient(error), "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=4)}
    return record | {"seconds": round(time.time() - started, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _open_folder(context: SweepContext, runs: list[Run], out: str | Path, folder_context: dict,
                 name: str) -> ResultStore:
    """Set damaged lines aside, claim the folder's context, keep the calibration, describe the sweep."""
    store = ResultStore(out)
    legacy = list({json.dumps(r.get("context"), sort_keys=True, default=str): r.get("context") or {}
                   for r in store.records()}.values())
    claim_context(store.folder, folder_context, legacy)
    if context.calibration is not None and not (store.folder / CALIBRATION_FILE).exists():
        context.calibration.save(store.folder / CALIBRATION_FILE)
    (store.folder / "runs").mkdir(exist_ok=True)
    write_json(store.folder / "sweep.json", {"name": name, "context": context.describe(), "n_runs": len(runs),
                                               "runs": [asdict(r) for r in runs]})
    return store


def run_sweep(context: SweepContext, runs: Sequence[Run], out: str | Path, retry_failed: bool = False,
              progress: bool = True, name: str = "sweep", lock_timeout: float = 0, launch=None) -> list[dict]:
    """Run every run not yet finished in ``out``; return the latest record of each run.

    Before any work: every run is checked (``check_runs``), the folder's writer lock is taken
    (FolderBusyError naming the other writer after ``lock_timeout`` s) and its context compared
    (ContextMismatchError). Damaged result lines are set aside and their runs redone, as are
    finished runs whose saved results are missing and transient failures (``is_transient``).

    ``launch`` (a ``distributed.Launch``): one of several processes sharing the folder. Its main
    process opens the folder as above; the others then check the context (writing nothing), and each
    runs its share of the unfinished runs. Returns the latest records this process can see."""
    from tqdm.auto import tqdm
    from .data import data_versions
    runs = list(runs)
    check_runs(context, runs)
    described = context.describe()
    folder_context = {**described, "budget": budget_of(runs),
                      "data": data_versions(run.task for run in runs if run.task != "prompts")}
    main = launch is None or launch.is_main
    with folder_lock(out, lock_timeout, launch):
        if main:
            store = _open_folder(context, runs, out, folder_context, name)
        if launch is not None:
            launch.wait_for_everyone()  # the main process has set damaged lines aside and claimed the context
        if not main:
            store = ResultStore(out, set_aside=False)
            check_context(store.folder, folder_context)
        records = store.records()
        done = latest_by_run(records)
        ids = [run.run_id(described) for run in runs]
        lost = [done[rid]["label"] for rid in ids if rid in done and done[rid]["status"] == "ok"
                and _needs_running(done[rid], store.folder, retry_failed)]
        if lost and main:
            warnings.warn(f"{len(lost)} finished run(s) lost their saved results under {store.folder / 'runs'} and "
                          f"run again: {lost}", stacklevel=2)
        todo = [(run, rid) for run, rid in zip(runs, ids) if _needs_running(done.get(rid), store.folder, retry_failed)]
        if launch is not None:
            launch.wait_for_everyone()  # every process has read the same results before any appends
            todo = launch.share_of(todo)
            name = f"{name} [process {launch.process_index}/{launch.num_processes}]"
        for run, run_id in tqdm(todo, desc=name, disable=not progress, unit="run"):
            record = _execute(context, run, run_id, store.folder, described)
            if launch is not None:
                record["process"] = {"index": launch.process_index, "of": launch.num_processes,
                                     "launch": launch.launch_id, "device": launch.device}
            try:
                store.append(record)
            except OSError as error:
                raise OSError(error.errno, f"cannot record run {run.label!r} in {store.path} ({error.strerror}); "
                                           "free space (or fix the folder) and rerun the same sweep to resume: "
                                           "finished runs are kept") from error
        latest = store.latest()
    return [latest[rid] for rid in ids if rid in latest]
