"""Perplexity and zero-shot accuracies as lm-evaluation-harness defines them, batched.

Three tasks, each lm-eval's own (lm-eval 0.4.x; YAMLs in `bh_routing/lm_eval_tasks/`):

| task      | lm-eval task     | request per document                               | metrics |
|-----------|------------------|----------------------------------------------------|---------|
| wikitext  | `wikitext`       | rolling windows over the detokenized article       | word_perplexity, byte_perplexity, bits_per_byte, token_perplexity |
| hellaswag | `hellaswag`      | (query, " " + ending) for each of the 4 endings    | acc, acc_norm |
| lambada   | `lambada_openai` | (passage minus last word, " " + last word)         | acc, perplexity |

Everything reduces to lm-eval's request: a context and a continuation, tokenised the way its `HFLM`
does (encode context + continuation whole, then split at the context's length), truncated on the
left to `max_length + 1` tokens; the model reads all but the last token and the continuation tokens
are scored. One forward pass per batch, never `generate()`.

Speed: requests are sorted by length and split into batches under a token budget that fits the
device (halved and retried on out-of-memory), the split with the fewest padded tokens plus a fixed
cost per forward pass (`batching.plan_batches`), and the vocabulary projection runs only at the
positions that are scored (a HellaSwag/LAMBADA context costs no logits at all). HellaSwag's four endings share
one pass over their context: one packed row per item with a 4-D attention mask (`share_prefix`).

Results keep every scored token's log-probability, flat and in a fixed order, so two routing
configurations evaluated on the same model, data and `max_length` can be compared token by token
(`EvalResult.paired`). With a `RoutingRecorder`, the number of experts each scored token used is
kept too, with padding excluded.

The package, along these sections: `metrics` (lm-eval's metric functions), `tokenize` (HFLM's
tokenisation, `Request`), `tasks` (`TASKS`: requests and results per task), `engine` (batched
scoring, `score_requests`), `results` (`EvalResult`), `harness` (the lm-eval backend); this module
is the entry point (`evaluate`) and re-exports their public names.
"""
from __future__ import annotations

import numbers
import platform
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import data as data_module
from .engine import (Scores, _model_device, as_recorder, auto_batch_tokens, resolve_softmax_dtype, score_naive,
                     score_requests)
from .harness import _evaluate_lm_eval
from .metrics import bits_per_byte, mean, mean_stderr, perplexity, weighted_perplexity
from .results import EvalResult, _jsonable, _model_id, _routing_summary, _version
from .tasks import (LM_EVAL_SEMANTICS, LM_EVAL_TASK_NAMES, TASK_NAMES, TASKS, Metric, Task, hellaswag_preprocess,
                    hellaswag_query_choices)
from .tokenize import Request, encode, encode_pairs, make_request, prefix_token_id, rolling_windows

__all__ = [  # the entry point, and every submodule's public name (used as `evaluation.<name>`)
    "evaluate", "evaluate_tasks", "load_docs", "resolve_max_length", "describe_patch",
    "Scores", "as_recorder", "auto_batch_tokens", "resolve_softmax_dtype", "score_naive", "score_requests",
    "bits_per_byte", "mean", "mean_stderr", "perplexity", "weighted_perplexity", "EvalResult",
    "LM_EVAL_SEMANTICS", "LM_EVAL_TASK_NAMES", "TASK_NAMES", "TASKS", "Metric", "Task", "hellaswag_preprocess",
    "hellaswag_query_choices", "Request", "encode", "encode_pairs", "make_request", "prefix_token_id",
    "rolling_windows", "data_module",
]

# ==================================================================================================
# The entry point
# ==================================================================================================

def resolve_max_length(model, tokenizer=None, default: int = 2048) -> int:
    """lm-eval's rule: the config's n_positions / max_position_embeddings / n_ctx, else the
    tokenizer's model_max_length, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < int(1e30) else default


def load_docs(task: str, n: int | None = None, seed: int | None = None, source: str = "auto",
              wikitext_part: str = "evaluation"):
    """The task's documents and their provenance (via bh_routing.data). WikiText: articles of
    ``wikitext_part`` (``data.wikitext_split``: by default the evaluation part, never calibration text;
    "all" or "calibration" score calibration text, with a warning)."""
    if task == "wikitext":
        if wikitext_part != "evaluation":
            warnings.warn(f"WikiText part {wikitext_part!r}: the evaluation scores the articles BH p-values are "
                          "calibrated on (recorded in config['data']['part'])", stacklevel=3)
        dataset = data_module.wikitext_split(wikitext_part, source=source, n=n, seed=seed)
    else:
        dataset = data_module.load(TASKS[task].dataset, source=source, n=n, seed=seed)
    return dataset.records, dataset.provenance.as_dict()


def evaluate(model, tokenizer, task: str, *, n: int | None = None, seed: int | None = None,
             source: str = "auto", docs: Sequence[Mapping[str, Any]] | None = None,
             max_length: int | None = None, stride: int | None = None, batch_size: int | str = "auto",
             max_batch_tokens: int | None = None, padding_side: str = "right", share_prefix: bool = True,
             recorder=None, model_id: str | None = None, routing_config: Any = None,
             backend: str = "native", progress: bool = False, wikitext_part: str = "evaluation",
             softmax_dtype: str | torch.dtype | None = "float32") -> EvalResult:
    """Evaluate `model` (patched or not) on one task; see the module docstring for definitions.

    task: "wikitext", "hellaswag" or "lambada".
    n, seed, source: which documents (`bh_routing.data.load`; WikiText counts articles of
        `wikitext_part`, by default the evaluation articles: `data.wikitext_split`); or `docs`.
    max_length: tokens of input per sequence (default: the model's context length, lm-eval's rule).
    stride: WikiText only; tokens newly predicted per window (default max_length: non-overlapping).
    batch_size, max_batch_tokens, padding_side, share_prefix: see `score_requests`; they change
        speed, not scores (share_prefix changes routing["all_positions"]: a context counts once).
    recorder: the `RoutingPatch` the model runs under (or its `RoutingRecorder`), for the experts
        each scored token used; the patch's routers are recorded in `config["routing_config"]`.
        The recorder is cleared before each batch (it holds the last batch afterwards).
    model_id, routing_config: recorded in `config` (what was evaluated).
    backend: "native" (this module) or "lm-eval" (lm_eval.simple_evaluate on the same documents;
        metrics and per-item log-likelihoods only).
    softmax_dtype: "float32" (default: scores exact to float32 in any model dtype) or None (the
        model's dtype, lm-eval's default: identical numbers to lm-eval in fp16/bf16). Passed to
        lm-eval's HFLM as its `softmax_dtype` with backend="lm-eval".
    """
    resolve_softmax_dtype(softmax_dtype)   # a bad name fails before any work
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASK_NAMES}")
    spec = TASKS[task]
    if routing_config is None and hasattr(recorder, "routers"):
        routing_config = describe_patch(recorder)
    recorder = as_recorder(recorder)
    for name, value in (("n", n), ("max_length", max_length)):  # 0 would mean "nothing", not "default"
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1 or None (default), got {value!r}")
    if docs is not None and len(docs) == 0:
        raise ValueError("docs is empty: there is nothing to evaluate (pass documents, or docs=None and n)")
    max_length = int(max_length if max_length is not None else resolve_max_length(model, tokenizer))
    if stride is not None and not spec.uses_stride:
        raise ValueError(f"stride applies to wikitext only, not {task}")
    if docs is None:
        docs, provenance = load_docs(task, n=n, seed=seed, source=source, wikitext_part=wikitext_part)
    else:
        docs, provenance = list(docs), {"dataset": spec.dataset, "source": "given", "n": len(docs)}
    config = {
        "task": task, "lm_eval_task": spec.lm_eval_source, "lm_eval_semantics": LM_EVAL_SEMANTICS,
        "backend": backend, "model_id": model_id or _model_id(model), "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(_model_device(model)),
        "routing_config": _jsonable(routing_config),
        "softmax_dtype": str(resolve_softmax_dtype(softmax_dtype) or "model dtype").replace("torch.", ""),
        "n_items": len(docs), "data": provenance, "max_length": max_length,
        "stride": (stride or max_length) if spec.uses_stride else None,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "bh_routing": _version("bh_routing"), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if backend == "lm-eval":
        if spec.lm_eval_task is None:
            raise ValueError(f"{task} has no lm-eval equivalent: use backend='native'")
        if provenance.get("source") == "given":
            raise ValueError("backend='lm-eval' reads documents through bh_routing.data: pass n/seed/source")
        if stride is not None and stride != max_length:
            raise ValueError("backend='lm-eval' scores WikiText with non-overlapping windows only (stride=None)")
        return _evaluate_lm_eval(model, tokenizer, spec, docs, config, n=n, seed=seed, source=source,
                                 batch_size=batch_size, wikitext_part=wikitext_part, softmax_dtype=softmax_dtype)
    if backend != "native":
        raise ValueError(f"backend must be 'native' or 'lm-eval', got {backend!r}")

    started = time.perf_counter()
    requests = spec.build_requests(docs, tokenizer, max_length, stride)
    tokenize_seconds = time.perf_counter() - started
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    scores = score_requests(model, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                            padding_side=padding_side, pad_token_id=pad, share_prefix=share_prefix,
                            recorder=recorder, progress=progress, softmax_dtype=softmax_dtype)
    offsets = scores.offsets
    request_logprobs = np.add.reduceat(scores.logprobs.astype(np.float64), offsets[:-1]) if len(requests) else []
    table = pd.DataFrame({
        "item": [r.item for r in requests], "choice": [r.choice for r in requests],
        "n_tokens": [r.n_scored for r in requests], "input_length": [r.input_length for r in requests],
        "logprob": request_logprobs,
        "greedy": np.logical_and.reduceat(scores.greedy, offsets[:-1]) if len(requests) else [],
        "token_start": offsets[:-1]})
    items, metrics = spec.process_results(docs, table)
    token_request = np.repeat(np.arange(len(requests)), table["n_tokens"].to_numpy())
    token_ids = np.concatenate([r.tokens[-r.n_scored:] for r in requests]).astype(np.int32)
    routing = None
    if scores.experts is not None:
        routing = _routing_summary(scores.experts, scores.experts_all, scores.stats["computed_tokens"])
        routing["layers"] = list(recorder.layers)
        per_token = scores.experts.mean(axis=1)
        item_of_token = table["item"].to_numpy()[token_request]
        items["experts_per_token"] = items["item"].map(pd.Series(per_token).groupby(item_of_token).mean())
    # requests whose context was cut on the left to fit max_length: their scores condition on less text
    truncated = sum(r.context_dropped > 0 for r in requests)
    config |= {"n_requests": len(requests), "truncated_requests": truncated, "tokenize_seconds": tokenize_seconds,
               "scoring": scores.stats}
    return EvalResult(task, metrics, items, table, scores.logprobs, token_ids, scores.greedy,
                      token_request, scores.experts, routing, config)


def evaluate_tasks(model, tokenizer, tasks: Iterable[str] = LM_EVAL_TASK_NAMES, **kwargs) -> dict[str, EvalResult]:
    """`evaluate` for several tasks with the same settings (stride applies to wikitext only)."""
    stride = kwargs.pop("stride", None)
    return {task: evaluate(model, tokenizer, task, stride=stride if TASKS[task].uses_stride else None, **kwargs)
            for task in tasks}


def describe_patch(patch) -> dict[str, Any]:
    """What a RoutingPatch does, for provenance: mode, layers, dispatch and each layer's router config
    ("all" when every layer has the same one)."""
    routers = {layer: dict(r.config) if getattr(r, "config", None) else {"strategy": r.strategy}
               for layer, r in patch.routers.items()}
    configs = list(routers.values())
    same = all(c == configs[0] for c in configs)
    return {"mode": patch.mode, "layers": list(patch.layers), "dispatch": dict(patch.dispatch) or None,
            "routers": {"all": configs[0]} if configs and same else routers}


