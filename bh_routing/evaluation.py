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

Speed: requests are sorted by length (length bucketing, so a batch holds sequences of nearly the
same length and padding is minimal), packed into batches under a token budget that fits the device
(halved and retried on out-of-memory), and the vocabulary projection runs only at the positions
that are scored (a HellaSwag/LAMBADA context costs no logits at all). HellaSwag's four endings share
one pass over their context: one packed row per item with a 4-D attention mask (`share_prefix`).

Results keep every scored token's log-probability, flat and in a fixed order, so two routing
configurations evaluated on the same model, data and `max_length` can be compared token by token
(`EvalResult.paired`). With a `RoutingRecorder`, the number of experts each scored token used is
kept too, with padding excluded.
"""
from __future__ import annotations

import json
import math
import numbers
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import data as data_module
from .findings import Outcome

LM_EVAL_SEMANTICS = "0.4.13"   # the lm-evaluation-harness version whose definitions are mirrored here
TASK_NAMES = ("wikitext", "hellaswag", "lambada", "domains")
LM_EVAL_TASK_NAMES = ("wikitext", "hellaswag", "lambada")   # the tasks lm-eval defines


# ==================================================================================================
# Metrics: lm_eval/api/metrics.py, defined once
# ==================================================================================================

def mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def perplexity(logprobs: Sequence[float]) -> float:
    """lm-eval's `perplexity` aggregation: exp(-mean of per-item log-likelihoods)."""
    return math.exp(-mean(logprobs))


def weighted_perplexity(logprobs: Sequence[float], weights: Sequence[float]) -> float:
    """lm-eval's `weighted_perplexity`: exp(-sum(ll) / sum(units)); units = words, bytes or tokens."""
    return math.exp(-_total(logprobs) / _total(weights))


def bits_per_byte(logprobs: Sequence[float], n_bytes: Sequence[float]) -> float:
    """lm-eval's `bits_per_byte`: -sum(ll) / sum(bytes) / ln 2."""
    return -_total(logprobs) / _total(n_bytes) / math.log(2)


def _total(values: Sequence[float]) -> float:
    return float(np.asarray(values, dtype=np.float64).sum())


# ==================================================================================================
# Tokenisation: exactly as lm-eval's HFLM (lm_eval/models/huggingface.py, lm_eval/api/model.py)
# ==================================================================================================

def prefix_token_id(tokenizer) -> int:
    """The token lm-eval puts before a text with no context: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; lm-eval needs one as the "
                         "prefix of rolling windows and empty contexts")
    return int(token)


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """HFLM.tok_encode for many strings: the tokenizer's default special tokens, except for a string
    that already starts with the prefix token's text (then none, so it is not doubled)."""
    prefix_text = tokenizer.decode(prefix_token_id(tokenizer))
    out: list[list[int]] = [[] for _ in texts]
    for skip in (False, True):
        idx = [i for i, text in enumerate(texts) if text.startswith(prefix_text) == skip]
        if idx:
            kwargs = {"add_special_tokens": False} if skip else {}
            # verbose=False: whole documents are longer than the model's context on purpose (they
            # are cut into windows afterwards); the tokenizer's length warning would mislead
            for i, ids in zip(idx, tokenizer([texts[i] for i in idx], verbose=False, **kwargs)["input_ids"]):
                out[i] = list(ids)
    return out


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `loglikelihood` tokenisation of (context, continuation) pairs -> (context_enc,
    continuation_enc): trailing spaces of the context move to the continuation; the whole string is
    encoded and split at the length of the encoded context (so a merge across the boundary belongs
    to the continuation); an empty context becomes the prefix token."""
    prefix = prefix_token_id(tokenizer)
    contexts, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    unique = list(dict.fromkeys(contexts))     # a HellaSwag context serves 4 endings: encode it once
    encoded_unique = dict(zip(unique, encode(tokenizer, unique)))
    encoded_contexts, encoded_wholes = [encoded_unique[c] for c in contexts], encode(tokenizer, wholes)
    out = []
    for (context, continuation), ctx, whole in zip(pairs, encoded_contexts, encoded_wholes):
        if context == "":
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ctx, cont = ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
        else:
            cont = whole[len(ctx):]
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after {context[-40:]!r}")
        out.append((list(ctx), list(cont)))
    return out


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows` + `make_disjoint_window`: (context, continuation) pairs
    whose continuations tile `tokens` exactly once, each window at most `max_length` tokens of input.

    stride = tokens newly predicted per window (default `max_length`: lm-eval's non-overlapping
    windows, each conditioned on one token of the previous window; the first window on the prefix
    token). A smaller stride gives every prediction at least `max_length - stride` tokens of context
    (lm-eval's `context_len = max_length - stride + 1`). The last window is always extended on the
    left to `max_length` tokens of input, as lm-eval does."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[:first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_new = min(len(tokens) - predicted, stride)
        end = predicted + n_new
        windows.append((tokens[end - max_length - 1:end - 1], tokens[end - n_new:end]))
        predicted += n_new
    # make_disjoint_window: keep only the context the continuation does not cover
    return [(ctx[:len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


@dataclass(frozen=True)
class Request:
    """One scored sequence: the model reads `tokens[:-1]` and the last `n_scored` tokens are scored
    (lm-eval: `(context_enc + continuation_enc)[-(max_length + 1):]`)."""
    item: int                 # document index within the task's documents
    choice: int               # HellaSwag ending, WikiText window, else 0
    tokens: tuple[int, ...]
    n_scored: int
    context_dropped: int = 0  # context tokens cut on the left to fit max_length (lm-eval does the same)

    @property
    def input_length(self) -> int:
        return len(self.tokens) - 1


def make_request(item: int, choice: int, context: Sequence[int], continuation: Sequence[int],
                 max_length: int) -> Request:
    if len(continuation) > max_length:
        raise ValueError(f"item {item}: continuation of {len(continuation)} tokens > max_length={max_length}")
    whole = list(context) + list(continuation)
    tokens = whole[-(max_length + 1):]
    return Request(item, choice, tuple(tokens), len(continuation), len(whole) - len(tokens))


# ==================================================================================================
# Tasks: documents -> requests, per-request log-likelihoods -> per-item results and metrics
# ==================================================================================================

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip WikiHow's bracket artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query_choices(doc: Mapping[str, Any]) -> tuple[str, list[str], int]:
    """lm-eval's hellaswag `process_docs`: (query, choices, gold). Continuations are " " + choice
    (lm-eval's default `target_delimiter`); acc_norm divides by len(choice) without that space."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return query, [hellaswag_preprocess(ending) for ending in doc["endings"]], int(doc["label"])


def _hellaswag_requests(docs, tokenizer, max_length, stride):
    pairs, keys = [], []
    for item, doc in enumerate(docs):
        query, choices, _ = hellaswag_query_choices(doc)
        for choice, text in enumerate(choices):
            pairs.append((query, " " + text))
            keys.append((item, choice))
    return [make_request(item, choice, ctx, cont, max_length)
            for (item, choice), (ctx, cont) in zip(keys, encode_pairs(tokenizer, pairs))]


def _hellaswag_results(docs, requests: pd.DataFrame):
    rows = []
    for item, group in requests.groupby("item", sort=True):
        doc = docs[item]
        _, choices, gold = hellaswag_query_choices(doc)
        lls = group.sort_values("choice")["logprob"].to_numpy(np.float64)
        chars = np.array([len(c) for c in choices], dtype=np.float64)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / chars))
        rows.append({"item": item, "ind": doc.get("ind"), "label": gold, "pred": pred, "pred_norm": pred_norm,
                     "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
                     "logprobs": lls.tolist(), "choice_chars": chars.astype(int).tolist(),
                     "n_tokens": int(group["n_tokens"].sum())})
    items = pd.DataFrame(rows)
    metrics = {"acc": mean(items["acc"]), "acc_stderr": mean_stderr(items["acc"]),
               "acc_norm": mean(items["acc_norm"]), "acc_norm_stderr": mean_stderr(items["acc_norm"])}
    return items, metrics


def _lambada_requests(docs, tokenizer, max_length, stride):
    pairs = [data_module.lambada_context_target(doc) for doc in docs]
    return [make_request(item, 0, ctx, cont, max_length)
            for item, (ctx, cont) in enumerate(encode_pairs(tokenizer, pairs))]


def _lambada_results(docs, requests: pd.DataFrame):
    items = requests[["item", "logprob", "greedy", "n_tokens"]].copy()
    items["target"] = [data_module.lambada_context_target(docs[i])[1] for i in items["item"]]
    items["acc"] = items.pop("greedy").astype(float)    # every target token is the argmax
    metrics = {"acc": mean(items["acc"]), "acc_stderr": mean_stderr(items["acc"]),
               "perplexity": perplexity(items["logprob"])}
    return items.reset_index(drop=True), metrics


def _wikitext_requests(docs, tokenizer, max_length, stride):
    prefix = prefix_token_id(tokenizer)
    targets = encode(tokenizer, [data_module.wikitext_detokenize(doc["page"]) for doc in docs])
    return [make_request(item, window, ctx, cont, max_length)
            for item, tokens in enumerate(targets)
            for window, (ctx, cont) in enumerate(rolling_windows(tokens, prefix, max_length, stride))]


def _wikitext_results(docs, requests: pd.DataFrame):
    grouped = requests.groupby("item", sort=True)
    items = pd.DataFrame({"logprob": grouped["logprob"].sum(), "n_tokens": grouped["n_tokens"].sum(),
                          "n_windows": grouped.size()}).reset_index()
    # lm-eval counts words and bytes on the original page, not on the detokenized text it scores
    items["n_words"] = [len(re.split(r"\s+", docs[i]["page"])) for i in items["item"]]
    items["n_bytes"] = [len(docs[i]["page"].encode("utf-8")) for i in items["item"]]
    lls = items["logprob"]
    metrics = {"word_perplexity": weighted_perplexity(lls, items["n_words"]),
               "byte_perplexity": weighted_perplexity(lls, items["n_bytes"]),
               "bits_per_byte": bits_per_byte(lls, items["n_bytes"]),
               "token_perplexity": weighted_perplexity(lls, items["n_tokens"])}
    return items, metrics


def _domains_requests(docs, tokenizer, max_length, stride):
    prefix = prefix_token_id(tokenizer)
    targets = encode(tokenizer, [doc["text"] for doc in docs])
    return [make_request(item, window, ctx, cont, max_length)
            for item, tokens in enumerate(targets)
            for window, (ctx, cont) in enumerate(rolling_windows(tokens, prefix, max_length, stride))]


def _domains_results(docs, requests: pd.DataFrame):
    grouped = requests.groupby("item", sort=True)
    items = pd.DataFrame({"logprob": grouped["logprob"].sum(), "n_tokens": grouped["n_tokens"].sum()}).reset_index()
    items["domain"] = [docs[i]["domain"] for i in items["item"]]
    metrics = {"token_perplexity": weighted_perplexity(items["logprob"], items["n_tokens"])}
    for domain, frame in items.groupby("domain", sort=False):
        metrics[f"token_perplexity_{domain}"] = weighted_perplexity(frame["logprob"], frame["n_tokens"])
    return items, metrics


@dataclass(frozen=True)
class Metric:
    """One metric of a task: its name in `EvalResult.metrics`, its direction, and the accuracy a
    guesser gets (`chance`; None when the metric is not an accuracy)."""
    name: str
    higher_is_better: bool
    chance: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Task:
    """A task as data: where its documents come from, how they become requests, how per-request
    log-likelihoods become per-item results and metrics, its lm-eval equivalent, its metrics (the
    first is the headline) and the per-item value paired comparisons test (`outcome`)."""
    name: str
    dataset: str                 # bh_routing.data.load name
    lm_eval_task: str | None     # the task in bh_routing/lm_eval_tasks (None: no lm-eval equivalent)
    lm_eval_source: str | None   # lm-eval's own task of the same name
    output_type: str             # lm-eval's output_type
    build_requests: Callable[..., list[Request]]
    process_results: Callable[..., tuple[pd.DataFrame, dict[str, float]]]
    metrics: tuple[Metric, ...]
    outcome: Outcome
    uses_stride: bool = False

    @property
    def headline(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)


_LOGLIKELIHOOD = "log-likelihood"
TASKS: dict[str, Task] = {
    "wikitext": Task("wikitext", "wikitext_documents", "bh_wikitext", "wikitext", "loglikelihood_rolling",
                     _wikitext_requests, _wikitext_results,
                     (Metric("word_perplexity", False, description="WikiText-2 word perplexity"),
                      Metric("byte_perplexity", False), Metric("bits_per_byte", False),
                      Metric("token_perplexity", False)),
                     Outcome("logprob", "continuous", True, "article", _LOGLIKELIHOOD), uses_stride=True),
    "hellaswag": Task("hellaswag", "hellaswag", "bh_hellaswag", "hellaswag", "multiple_choice",
                      _hellaswag_requests, _hellaswag_results,
                      (Metric("acc_norm", True, 0.25, "HellaSwag length-normalised accuracy (4 endings)"),
                       Metric("acc", True, 0.25, "HellaSwag accuracy (4 endings)")),
                      Outcome("acc_norm", "binary", True, "question", "acc_norm")),
    "lambada": Task("lambada", "lambada", "bh_lambada_openai", "lambada_openai", "loglikelihood",
                    _lambada_requests, _lambada_results,
                    # chance: guessing a whole word from an open vocabulary is ≈ 0
                    (Metric("acc", True, 0.0, "LAMBADA last-word accuracy (open vocabulary)"),
                     Metric("perplexity", False)),
                    Outcome("acc", "binary", True, "passage", "accuracy")),
    "domains": Task("domains", "domains", None, None, "loglikelihood_rolling",
                    _domains_requests, _domains_results,
                    (Metric("token_perplexity", False, description="token perplexity on held-out domain text"),),
                    Outcome("logprob", "continuous", True, "document", _LOGLIKELIHOOD), uses_stride=True),
}


# ==================================================================================================
# Scoring: one forward pass per batch, log-probabilities at the scored positions only
# ==================================================================================================

@dataclass
class Scores:
    """Per-token scores of a list of requests, flat, in request order."""
    logprobs: np.ndarray           # float32 [n_scored_tokens]
    greedy: np.ndarray             # bool    [n_scored_tokens]: token is the argmax of its distribution
    offsets: np.ndarray            # int64   [n_requests + 1]: request r owns [offsets[r], offsets[r+1])
    experts: np.ndarray | None     # int16   [n_scored_tokens, n_layers]: experts used at the predicting position
    experts_all: np.ndarray | None  # float64 [n_layers]: sum of experts over every non-padding input position
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_softmax_dtype(softmax_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"float32" / torch.float32 / "bfloat16" ... -> torch dtype; None stays None (the logits' dtype)."""
    if softmax_dtype is None or isinstance(softmax_dtype, torch.dtype):
        return softmax_dtype
    dtype = getattr(torch, str(softmax_dtype).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"softmax_dtype must be a floating dtype name such as 'float32', or None "
                         f"(the model's dtype, as lm-eval), got {softmax_dtype!r}")
    return dtype


def _is_oom(error: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(error, oom_types) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error)))


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _split_head(model):
    """(decoder, lm_head) when logits are exactly lm_head(decoder(...).last_hidden_state), so the
    vocabulary projection can run at the scored positions only; None for other architectures."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _takes_custom_4d_mask(model) -> bool:
    """Eager and SDPA attention apply a custom 4-D mask as given; flash-attention kernels take only
    padding masks (they would ignore the packing), so packed shared prefixes are off there."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "eager") in ("eager", "sdpa")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def auto_batch_tokens(model, max_length: int) -> int:
    """Tokens (batch x padded length) per forward pass that fit the device's free memory now, from
    `models.memory_plan` (logits are chunked, so they count once per chunk, not per token)."""
    device = _model_device(model)
    if device.type != "cuda":
        # CPU: memory is rarely the limit; a batch beyond ~2k tokens is no faster (measured with the
        # tiny model: 2048-4096 flat, 8192 up to 4x slower for 1024-token windows)
        return max(2048, max_length)
    from .models import memory_plan
    free, _ = torch.cuda.mem_get_info(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        plan = memory_plan(model.config, free + weights, next(model.parameters()).dtype, logits="last")
        budget = (plan.token_budget_bytes - _LOGIT_CHUNK_BYTES) // max(plan.bytes_per_token, 1)
    except Exception:            # not an OLMoE/llama-like config: a conservative guess
        budget = 8192
    return int(min(max(budget, max_length), 65536))


_LOGIT_CHUNK_BYTES = 64 * 2 ** 20   # float32 logits of one chunk of scored positions (~330 x 50k vocab)
# On a CPU a chunk that stays in cache is scored 2.4x faster (tiny model, 2048 positions: 12 ms in
# 4 MiB chunks vs 29 ms in 64 MiB ones); at least 256 rows, so a large vocabulary's projection
# weights are still read once per 256 positions.
_CPU_LOGIT_CHUNK_BYTES, _CPU_MIN_CHUNK_ROWS = 4 * 2 ** 20, 256
_MIN_LENGTH_RATIO = 0.8             # a batch holds sequences of at least 80 % of its longest's length


def _token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None,
                    targets: torch.Tensor, softmax_dtype: torch.dtype | None = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (or logits [N, V] when head is None), targets [N] -> (logprob [N] float32,
    greedy [N] bool). The log-softmax is in `softmax_dtype` (None: the logits' own dtype, as lm-eval
    does by default) and in chunks, so [N, V] never exists at once."""
    vocab = head.weight.shape[0] if head is not None and hasattr(head, "weight") else hidden.shape[-1]
    if hidden.device.type == "cpu":
        chunk = max(_CPU_MIN_CHUNK_ROWS, _CPU_LOGIT_CHUNK_BYTES // (4 * vocab))
    else:
        chunk = max(1, _LOGIT_CHUNK_BYTES // (4 * vocab))
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        logp = torch.log_softmax(head(h) if head is not None else h, dim=-1, dtype=softmax_dtype)   # [n, V]
        logprobs.append(logp.gather(1, t[:, None]).squeeze(1).float())
        greedy.append(logp.argmax(dim=-1) == t)
    return torch.cat(logprobs), torch.cat(greedy)


def score_requests(model, requests: Sequence[Request], *, batch_size: int | str = "auto",
                   max_batch_tokens: int | None = None, padding_side: str = "right", pad_token_id: int = 0,
                   share_prefix: bool = True, recorder=None, progress: bool = False,
                   softmax_dtype: str | torch.dtype | None = "float32") -> Scores:
    """Log-probabilities of every request's scored tokens, batched.

    batch_size: "auto" packs length-sorted requests under a token budget (`max_batch_tokens`, default
        `auto_batch_tokens`), starting a new batch when lengths fall below 80 % of the batch's
        longest; an int fixes the number of sequences per batch. Either way an out-of-memory error
        halves the batch and the evaluation goes on.
    padding_side: "right" or "left"; scores do not depend on it (positions come from the mask).
    share_prefix: requests whose unscored inputs are identical (HellaSwag's 4 endings) run that
        prefix once, packed in one row with their scored parts (`_score_shared_batch`): same scores,
        about half the tokens. Used where the attention applies a custom 4-D mask (eager, SDPA);
        ignored with flash-attention.
    recorder: a `bh_routing.recording` recorder attached to `model` (optional): the experts used
        at each scored position, and summed over every non-padding position computed, are returned.
    softmax_dtype: dtype of the log-softmax over the vocabulary ("float32", the default: exact to
        float32 whatever the model's dtype), or None for the logits' own dtype — lm-eval's default
        (`HFLM(softmax_dtype=None)`), which differs from float32 in fp16/bf16.
    """
    softmax_dtype = resolve_softmax_dtype(softmax_dtype)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    device = _model_device(model)
    split = _split_head(model)
    longest_input = max((r.input_length for r in requests), default=1)
    if batch_size == "auto":
        budget, per_batch = int(max_batch_tokens or auto_batch_tokens(model, longest_input)), None
    else:
        budget, per_batch = None, int(batch_size)

    # A unit is one request, or a group of requests sharing their unscored prefix (one packed row).
    # Either is one row of `cost` tokens. Length bucketing: longest first (an OOM happens at once,
    # and the padded length of a batch is that of its first unit); ties in request order, so runs
    # are reproducible.
    packable = split is not None and _takes_custom_4d_mask(model)
    groups = _shared_prefix_groups(requests) if share_prefix and packable else []
    grouped = {i for group in groups for i in group}
    units = [[i] for i in range(len(requests)) if i not in grouped] + groups
    cost = [_unit_tokens(requests, unit) for unit in units]
    order = sorted(range(len(units)), key=lambda u: (-cost[u], units[u][0]))
    lengths = np.array([r.n_scored for r in requests], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    logprobs = np.zeros(offsets[-1], dtype=np.float32)
    greedy = np.zeros(offsets[-1], dtype=bool)
    experts = experts_all = None
    n_batches = real_tokens = padded_tokens = oom_retries = 0
    started = time.perf_counter()

    position = 0
    while position < len(order):
        # a batch: consecutive units of one kind (single or shared-prefix) under the budget
        first = units[order[position]]
        shared = len(first) > 1
        longest = cost[order[position]]   # the batch's row width
        taken, tokens, n_sequences = [first], longest, len(first)
        for u in order[position + 1:]:
            unit = units[u]
            if (len(unit) > 1) != shared:
                break
            if per_batch is not None:
                if n_sequences + len(unit) > per_batch:
                    break
            # "auto": rows x the longest row under the budget; a new bucket when rows get far
            # shorter than the longest (bounds padding)
            elif (len(taken) + 1) * longest > budget or cost[u] < _MIN_LENGTH_RATIO * longest:
                break
            taken.append(unit)
            tokens, n_sequences = tokens + cost[u], n_sequences + len(unit)
        batch_units = [[requests[i] for i in unit] for unit in taken]
        try:
            if shared:
                lp, gr, ex, ex_all, padded = _score_shared_batch(model, split, batch_units, device, pad_token_id,
                                                                 recorder, softmax_dtype)
            else:
                lp, gr, ex, ex_all, padded = _score_batch(model, split, [u[0] for u in batch_units], device,
                                                          padding_side, pad_token_id, recorder, softmax_dtype)
        except Exception as error:   # noqa: BLE001 -- only out-of-memory is handled
            if not _is_oom(error):
                raise
            if len(taken) == 1:
                raise RuntimeError(f"out of memory on a single unit ({n_sequences} sequence(s) in one row of "
                                   f"{longest} tokens): pass a smaller max_length") from error
            oom_retries += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if per_batch is not None:
                per_batch = max(1, n_sequences // 2)
            else:
                budget = max(longest, (len(taken) // 2) * longest)
            continue
        flat = [i for unit in taken for i in unit]
        for j, request_index in enumerate(flat):
            span = slice(offsets[request_index], offsets[request_index + 1])
            logprobs[span], greedy[span] = lp[j], gr[j]
            if ex is not None:
                if experts is None:
                    experts = np.zeros((offsets[-1], ex[j].shape[1]), dtype=np.int16)
                    experts_all = np.zeros(ex[j].shape[1], dtype=np.float64)
                experts[span] = ex[j]
        if ex_all is not None:
            experts_all += ex_all
        n_batches += 1
        real_tokens += tokens
        padded_tokens += padded
        position += len(taken)
        if progress and n_batches % 10 == 0:
            print(f"[evaluate] {position}/{len(order)} units, {n_batches} batches", flush=True)

    seconds = time.perf_counter() - started
    # input_tokens: the requests' inputs (lm-eval's workload, the same for every method: tokens/s
    # compare across methods); computed_tokens: non-padding tokens actually run (a shared prefix once)
    input_tokens = sum(r.input_length for r in requests)
    stats = {"n_batches": n_batches, "input_tokens": input_tokens, "computed_tokens": int(real_tokens),
             "padded_tokens": int(padded_tokens), "padding_fraction": 1 - real_tokens / max(padded_tokens, 1),
             "scored_tokens": int(offsets[-1]), "seconds": seconds,
             "input_tokens_per_s": input_tokens / max(seconds, 1e-9),
             "batch_size": batch_size if per_batch is None else per_batch,
             "max_batch_tokens": budget, "oom_retries": oom_retries, "padding_side": padding_side,
             "shared_prefix_groups": len(groups),
             "softmax_dtype": str(softmax_dtype).replace("torch.", "") if softmax_dtype else "model dtype",
             "logits": "scored positions only" if split is not None else "full (model forward)"}
    return Scores(logprobs, greedy, offsets, experts, experts_all, stats)


def _score_batch(model, split, batch: Sequence[Request], device, padding_side: str, pad_token_id: int,
                 recorder, softmax_dtype):
    """One forward pass over a batch -> per request (logprobs, greedy, experts [n, L] | None), and the
    experts summed over all non-padding positions per layer (or None)."""
    width = max(r.input_length for r in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)        # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)                          # [B, T]
    rows, cols, targets = [], [], []
    for b, r in enumerate(batch):
        n = r.input_length
        start = width - n if padding_side == "left" else 0
        input_ids[b, start:start + n] = torch.tensor(r.tokens[:-1])
        mask[b, start:start + n] = 1
        # the logits at input position p predict token p + 1: the scored tokens are the last n_scored
        cols.extend(range(start + n - r.n_scored, start + n))
        rows.extend([b] * r.n_scored)
        targets.extend(r.tokens[-r.n_scored:])
    # positions from the mask, so a left-padded sequence sees the same rotary positions as unpadded
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)                               # [B, T]
    input_ids, mask, position_ids = input_ids.to(device), mask.to(device), position_ids.to(device)
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    targets_t = torch.tensor(targets, device=device)

    if recorder is not None:
        recorder.clear()   # so that it holds this batch only
    with torch.inference_mode():
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        if split is not None:
            decoder, head = split
            hidden = decoder(**kwargs).last_hidden_state                                # [B, T, H]
            lp, gr = _token_logprobs(hidden[rows_t, cols_t], head, targets_t, softmax_dtype)   # [N]
        else:
            logits = model(**kwargs).logits                                             # [B, T, V]
            lp, gr = _token_logprobs(logits[rows_t, cols_t], None, targets_t, softmax_dtype)

    ex = ex_all = None
    if recorder is not None:
        counts = _recorder_counts(recorder, mask)                                       # [L, B, T]
        if counts is not None:
            ex = counts[:, rows_t.cpu(), cols_t.cpu()].T.numpy()                        # [N, L]
            ex_all = counts.clamp(min=0).sum(dim=(1, 2)).double().numpy()               # [L], padding is -1
    return (*_split_parts(lp, gr, ex, [r.n_scored for r in batch]), ex_all, input_ids.numel())


def _split_parts(lp: torch.Tensor, gr: torch.Tensor, ex: np.ndarray | None, sizes: Sequence[int]):
    """Flat per-token results [N] -> one array per request."""
    splits = np.cumsum(sizes)[:-1]
    return (np.split(lp.cpu().numpy(), splits), np.split(gr.cpu().numpy(), splits),
            np.split(ex, splits) if ex is not None else None)


def _prefix_length(request: Request) -> int:
    """Inputs before the first scored position: what requests with the same context share."""
    return request.input_length - request.n_scored


def _shared_prefix_groups(requests: Sequence[Request]) -> list[list[int]]:
    """Indices of requests whose unscored inputs are identical (>= 1 token, >= 2 requests)."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        if _prefix_length(r) >= 1:
            by_prefix.setdefault(r.tokens[:_prefix_length(r)], []).append(i)
    return [group for group in by_prefix.values() if len(group) > 1]


def _unit_tokens(requests: Sequence[Request], unit: Sequence[int]) -> int:
    """Input tokens a unit actually computes: the shared prefix once, then each scored part."""
    return _prefix_length(requests[unit[0]]) * (len(unit) > 1) + sum(
        requests[i].input_length if len(unit) == 1 else requests[i].n_scored for i in unit)


def _score_shared_batch(model, split, groups: Sequence[Sequence[Request]], device, pad_token_id: int, recorder,
                        softmax_dtype):
    """Groups of requests sharing their unscored prefix, one packed row per group:

        [prefix | member 1's scored part | member 2's | ...]   positions 0..P-1 | P.. | P.. | ...

    A 4-D attention mask lets each part see the prefix and itself (causally), never another part, so
    every part scores exactly as its own sequence would; the prefix runs once and there is one
    forward pass per batch (no KV cache to copy). Returns what `_score_batch` does."""
    decoder, head = split
    # rows: per group (token ids, segment per token: 0 prefix / j member j, positions);
    # cols: per member (row, first column, length of its scored part)
    rows, cols, targets = [], [], []
    for b, group in enumerate(groups):
        prefix_length = _prefix_length(group[0])
        ids, segment, position = list(group[0].tokens[:prefix_length]), [0] * prefix_length, list(range(prefix_length))
        for j, r in enumerate(group, start=1):
            cols.append((b, len(ids), r.n_scored))
            ids += r.tokens[prefix_length:r.input_length]
            segment += [j] * r.n_scored
            position += range(prefix_length, prefix_length + r.n_scored)
            targets.extend(r.tokens[-r.n_scored:])
        rows.append((ids, segment, position))
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)            # [B, W]
    segments = torch.full((len(rows), width), -1, dtype=torch.long)                        # [B, W], -1 padding
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)                        # [B, W]
    for b, (ids, segment, position) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        segments[b, :len(ids)] = torch.tensor(segment)
        position_ids[b, :len(ids)] = torch.tensor(position)
    flat_cols = torch.cat([torch.arange(n) + b * width + start for b, start, n in cols])  # [N] in B*W
    query, key = segments[:, :, None], segments[:, None, :]                                 # [B, W, 1], [B, 1, W]
    sees = ((key == 0) & (query >= 0)) | (key == query)
    sees &= torch.ones(width, width, dtype=torch.bool).tril()                              # causal
    sees |= torch.eye(width, dtype=torch.bool)             # padding sees itself: no all-masked row (NaN)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]  # [B, 1, W, W]

    if recorder is not None:
        recorder.clear()
    with torch.inference_mode():
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids.to(device), use_cache=False).last_hidden_state   # [B, W, H]
        lp, gr = _token_logprobs(hidden.reshape(-1, hidden.shape[-1])[flat_cols.to(device)], head,
                                 torch.tensor(targets, device=device), softmax_dtype)

    members = [r for group in groups for r in group]
    ex = ex_all = None
    if recorder is not None:
        counts = torch.as_tensor(recorder.counts()).long()          # [L, B*W]: a 4-D mask marks no padding
        if counts.numel():
            real = (segments >= 0).reshape(-1)                                              # [B*W]
            ex = counts[:, flat_cols].T.numpy()                                             # [N, L]
            ex_all = counts[:, real].sum(dim=1).double().numpy()                            # [L]
    return (*_split_parts(lp, gr, ex, [r.n_scored for r in members]), ex_all, input_ids.numel())


def as_recorder(routing):
    """A RoutingRecorder from a RoutingRecorder or a RoutingPatch (its `.recorder`), or None."""
    if routing is None or callable(getattr(routing, "counts", None)):
        return routing
    recorder = getattr(routing, "recorder", None)
    if recorder is None:
        raise ValueError(f"{routing!r} records nothing: create the RoutingPatch with record=True (the default)")
    return recorder


def _recorder_counts(recorder, mask: torch.Tensor) -> torch.Tensor | None:
    """Experts used per recorded layer and position in the last forward pass: long [L, B, T], -1 at
    padding. The recorder keeps real tokens only, in (row, position) order, so they scatter back
    through the attention mask [B, T]."""
    counts = torch.as_tensor(recorder.counts()).long()                                  # [L, n_real]
    if counts.numel() == 0:
        return None
    keep = mask.cpu().bool().reshape(-1)                                                # [B*T]
    if counts.shape[1] != int(keep.sum()):
        raise RuntimeError(f"the recorder holds {counts.shape[1]} tokens for a batch of {int(keep.sum())}: "
                           "is it attached to this model (RoutingPatch(model, ..., record=True))?")
    full = torch.full((counts.shape[0], keep.numel()), -1, dtype=torch.long)
    full[:, keep] = counts
    return full.reshape(counts.shape[0], *mask.shape)


def score_naive(model, requests: Sequence[Request]) -> Scores:
    """The reference: one unbatched forward per request, full logits, log-softmax over every
    position (what lm-eval does with batch size 1). Used by the tests and the benchmark."""
    device = _model_device(model)
    lengths = np.array([r.n_scored for r in requests], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    logprobs, greedy = np.zeros(offsets[-1], np.float32), np.zeros(offsets[-1], bool)
    started = time.perf_counter()
    with torch.inference_mode():
        for i, r in enumerate(requests):
            inp = torch.tensor([r.tokens[:-1]], device=device)                            # [1, T]
            logits = torch.log_softmax(model(inp).logits[0].float(), dim=-1)              # [T, V]
            scored = logits[-r.n_scored:]                                                 # [n, V]
            target = torch.tensor(r.tokens[-r.n_scored:], device=device)
            logprobs[offsets[i]:offsets[i + 1]] = scored.gather(1, target[:, None]).squeeze(1).cpu().numpy()
            greedy[offsets[i]:offsets[i + 1]] = (scored.argmax(-1) == target).cpu().numpy()
    seconds = time.perf_counter() - started
    tokens = sum(r.input_length for r in requests)
    return Scores(logprobs, greedy, offsets, None, None,
                  {"n_batches": len(requests), "input_tokens": tokens, "computed_tokens": tokens,
                   "padded_tokens": tokens, "seconds": seconds,
                   "input_tokens_per_s": tokens / max(seconds, 1e-9), "scored_tokens": int(offsets[-1])})


# ==================================================================================================
# Results
# ==================================================================================================

@dataclass
class EvalResult:
    """What one evaluation produced, and everything needed to say how.

    metrics:        {"acc": ..., ...} (lm-eval's names; `*_stderr` as lm-eval's mean_stderr)
    items:          one row per document (per-item log-likelihoods, predictions, token counts)
    requests:       one row per scored sequence: item, choice (ending / window), n_tokens, logprob,
                    greedy, token_start (index of its first token in the token arrays)
    token_logprobs: float32 [n_tokens], every scored token, in request order (per item for
                    WikiText: the article's tokens in order; HellaSwag: the 4 endings in order)
    token_ids, token_greedy, token_request: aligned with token_logprobs
    token_experts:  int16 [n_tokens, n_layers], experts used at the position that predicted the
                    token (None without a recorder)
    routing:        mean experts per token, overall and per layer, over the scored positions and
                    over all non-padding input positions (None without a recorder)
    config:         provenance: model, data, max_length, stride, batching, timings, versions
    """
    task: str
    metrics: dict[str, float]
    items: pd.DataFrame
    requests: pd.DataFrame
    token_logprobs: np.ndarray
    token_ids: np.ndarray
    token_greedy: np.ndarray
    token_request: np.ndarray
    token_experts: np.ndarray | None
    routing: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def token_item(self) -> np.ndarray:
        """int [n_tokens]: the item each scored token belongs to."""
        return self.requests["item"].to_numpy()[self.token_request]

    def item_token_logprobs(self, item: int) -> np.ndarray:
        return self.token_logprobs[self.token_item == item]

    def paired(self, other: "EvalResult") -> pd.DataFrame:
        """Token-by-token comparison with another result on the same tokens: one row per scored
        token with item, request, token id, both log-probabilities and their difference (other - self)."""
        if self.task != other.task or not np.array_equal(self.token_ids, other.token_ids):
            raise ValueError("results are not on the same tokens (task, data, tokenizer and max_length/stride "
                             "must be the same)")
        return pd.DataFrame({"item": self.token_item, "request": self.token_request, "token_id": self.token_ids,
                             "logprob_a": self.token_logprobs, "logprob_b": other.token_logprobs,
                             "delta": other.token_logprobs.astype(np.float64) - self.token_logprobs})

    def summary(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items() if not k.endswith("_stderr"))
        routing = f"; experts/token {self.routing['mean_experts']:.2f}" if self.routing else ""
        return (f"{self.task} [{self.config.get('model_id')}, n={self.config.get('n_items')}, "
                f"max_length={self.config.get('max_length')}]: {shown}{routing}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: metrics, routing, config (not the per-token arrays; see `save`)."""
        return {"task": self.task, "metrics": self.metrics, "routing": self.routing, "config": self.config}

    def save(self, path: str | Path) -> None:
        """`path`.json (metrics, routing, config, items, requests) and `path`.npz (token arrays)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_dict() | {"items": self.items.to_dict(orient="list"),
                                    "requests": self.requests.to_dict(orient="list")}
        path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=_json_default))
        arrays = {"token_logprobs": self.token_logprobs, "token_ids": self.token_ids,
                  "token_greedy": self.token_greedy, "token_request": self.token_request}
        if self.token_experts is not None:
            arrays["token_experts"] = self.token_experts
        np.savez_compressed(path.with_suffix(".npz"), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        path = Path(path)
        payload = json.loads(path.with_suffix(".json").read_text())
        arrays = np.load(path.with_suffix(".npz"))
        return cls(payload["task"], payload["metrics"], pd.DataFrame(payload["items"]),
                   pd.DataFrame(payload["requests"]), arrays["token_logprobs"], arrays["token_ids"],
                   arrays["token_greedy"], arrays["token_request"],
                   arrays["token_experts"] if "token_experts" in arrays else None,
                   payload["routing"], payload["config"])


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _routing_summary(experts: np.ndarray, experts_all: np.ndarray, n_all_positions: int) -> dict[str, Any]:
    per_layer = experts.mean(axis=0, dtype=np.float64)                                      # [L]
    per_layer_all = experts_all / max(n_all_positions, 1)                                   # [L]
    return {"mean_experts": float(per_layer.mean()), "mean_experts_per_layer": per_layer.tolist(),
            "tokens": int(experts.shape[0]),
            # every non-padding position the model computed (a prefix shared by several requests once)
            "all_positions": {"mean_experts": float(per_layer_all.mean()),
                              "mean_experts_per_layer": per_layer_all.tolist(), "tokens": int(n_all_positions)},
            "aligned_at": "the input position whose logits score the token (padding excluded)"}


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


def _jsonable(value):
    return None if value is None else json.loads(json.dumps(value, default=_json_default))


def _model_id(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ==================================================================================================
# The harness itself (optional dependency)
# ==================================================================================================

def _evaluate_lm_eval(model, tokenizer, spec: Task, docs, config, *, n, seed, source, batch_size,
                      wikitext_part, softmax_dtype) -> EvalResult:
    """Run lm_eval.simple_evaluate on this task's YAML (bh_routing/lm_eval_tasks), same documents."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("backend='lm-eval' needs lm-evaluation-harness: pip install lm-eval") from error
    from .lm_eval_tasks import TASK_DIR

    started = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=config["max_length"],
              batch_size=batch_size if batch_size != "auto" else 1, device=config["device"],
              softmax_dtype=softmax_dtype)
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False,
                          metadata={"bh_n": n, "bh_seed": seed, "bh_source": source,
                                    "bh_wikitext_part": wikitext_part})
    output = lm_eval.simple_evaluate(model=lm, tasks=[spec.lm_eval_task], task_manager=manager,
                                     num_fewshot=0, log_samples=True)
    raw = output["results"][spec.lm_eval_task]
    metrics = {key.split(",")[0]: float(value) for key, value in raw.items()
               if "," in key and isinstance(value, (int, float))}
    samples = sorted(output["samples"][spec.lm_eval_task], key=lambda s: s["doc_id"])
    rows = []
    for sample in samples:
        for choice, response in enumerate(sample["resps"]):
            value = response[0]
            ll, greedy = (value if isinstance(value, (list, tuple)) else (value, None))
            rows.append({"item": sample["doc_id"], "choice": choice, "logprob": float(ll), "greedy": greedy})
    table = pd.DataFrame(rows)
    # the harness does not report token counts: they are ours (the same tokenisation, tested)
    counts = pd.DataFrame([(r.item, r.choice, r.n_scored) for r in
                           spec.build_requests(docs, tokenizer, config["max_length"], None)],
                          columns=["item", "choice", "n_tokens"])
    windows = counts.groupby("item")["choice"].size()
    if spec.output_type == "loglikelihood_rolling":      # one harness row per document, ours per window
        counts = counts.groupby("item", as_index=False)["n_tokens"].sum().assign(choice=0)
    table = table.merge(counts, on=["item", "choice"], how="left", validate="one_to_one")
    items, _ = spec.process_results(docs, table)      # per-item view; the metrics are the harness's
    if "n_windows" in items:
        items["n_windows"] = items["item"].map(windows)
    config |= {"lm_eval_version": _version("lm_eval"), "seconds": time.perf_counter() - started,
               "scoring": {"batch_size": lm.batch_size}}
    empty = np.zeros(0)
    return EvalResult(spec.name, metrics, items, table, empty.astype(np.float32), empty.astype(np.int32),
                      empty.astype(bool), empty.astype(np.int64), None, None, config)
