"""Scoring: one forward pass per batch, log-probabilities at the scored positions only; batches of
length-sorted requests under a token budget (halved on out-of-memory), shared-prefix packing,
routing counts."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .batching import plan_batches
from .tokenize import Request

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
    from ..models import available_memory, memory_plan
    free = available_memory(device)          # within a per-process memory cap, if one is set
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
        # max(dim).indices is argmax (the first maximal index, NaN as the maximum, torch's documented
        # semantics for both) but 2.8x faster on a CPU (~1/3 of the scoring time with argmax)
        greedy.append(logp.max(dim=-1).indices == t)
    return torch.cat(logprobs), torch.cat(greedy)


def score_requests(model, requests: Sequence[Request], *, batch_size: int | str = "auto",
                   max_batch_tokens: int | None = None, padding_side: str = "right", pad_token_id: int = 0,
                   share_prefix: bool = True, recorder=None, progress: bool = False,
                   softmax_dtype: str | torch.dtype | None = "float32") -> Scores:
    """Log-probabilities of every request's scored tokens, batched.

    batch_size: "auto" splits the length-sorted requests into batches under a token budget
        (`max_batch_tokens`, default `auto_batch_tokens`), the split with the fewest padded tokens
        plus a fixed cost per forward pass (`batching.plan_batches`); an int fixes the number of
        sequences per batch. Either way an out-of-memory error halves the batch and the evaluation
        goes on.
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

    # Units longest first within each kind (an OOM shows at once, and a batch's row width is that of
    # its first unit); ties in request order, so runs are reproducible.
    units, cost = score_units(model, requests, share_prefix)
    n_groups = sum(len(unit) > 1 for unit in units)
    order = sorted(range(len(units)), key=lambda u: (len(units[u]) == 1, -cost[u], units[u][0]))
    batches = _plan(order, units, cost, budget, per_batch)
    lengths = np.array([r.n_scored for r in requests], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    logprobs = np.zeros(offsets[-1], dtype=np.float32)
    greedy = np.zeros(offsets[-1], dtype=bool)
    experts = experts_all = None
    n_batches = real_tokens = padded_tokens = oom_retries = done = 0
    started = time.perf_counter()

    while batches:
        taken = [units[u] for u in batches[0]]
        shared = len(taken[0]) > 1
        longest = cost[batches[0][0]]   # the batch's row width
        tokens, n_sequences = sum(cost[u] for u in batches[0]), sum(map(len, taken))
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
            batches = _plan([u for batch in batches for u in batch], units, cost, budget, per_batch)
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
        done += len(taken)
        batches.pop(0)
        if progress and n_batches % 10 == 0:
            print(f"[evaluate] {done}/{len(order)} units, {n_batches} batches", flush=True)

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
             "shared_prefix_groups": n_groups,
             "softmax_dtype": str(softmax_dtype).replace("torch.", "") if softmax_dtype else "model dtype",
             "logits": "scored positions only" if split is not None else "full (model forward)"}
    return Scores(logprobs, greedy, offsets, experts, experts_all, stats)


def _plan(order: Sequence[int], units: Sequence[Sequence[int]], cost: Sequence[int], budget: int | None,
          per_batch: int | None) -> list[list[int]]:
    """`order` (unit ids, one kind after the other, longest first) cut into batches of one kind: at
    most `per_batch` sequences each, or else `plan_batches` under the token budget."""
    batches = []
    for _, run in itertools.groupby(order, key=lambda u: len(units[u]) > 1):
        run = list(run)
        if per_batch is None:
            sizes = plan_batches([cost[u] for u in run], budget)
        else:
            sizes, n_sequences = [], per_batch
            for u in run:
                if n_sequences + len(units[u]) > per_batch:
                    sizes.append(0)
                    n_sequences = 0
                sizes[-1] += 1
                n_sequences += len(units[u])
        for end, size in zip(np.cumsum(sizes), sizes):
            batches.append(run[end - size:end])
    return batches


def score_units(model, requests: Sequence[Request], share_prefix: bool = True) -> tuple[list[list[int]], list[int]]:
    """How `score_requests` lays the requests out: units (one request, or a group sharing its unscored
    prefix, packed in one row where the model allows it) and the tokens each unit's row computes."""
    packable = _split_head(model) is not None and _takes_custom_4d_mask(model)
    groups = _shared_prefix_groups(requests) if share_prefix and packable else []
    grouped = {i for group in groups for i in group}
    units = [[i] for i in range(len(requests)) if i not in grouped] + groups
    return units, [_unit_tokens(requests, unit) for unit in units]


def _score_batch(model, split, batch: Sequence[Request], device, padding_side: str, pad_token_id: int,
                 recorder, softmax_dtype):
    """One forward pass over a batch -> per request (logprobs, greedy, experts [n, L] | None), and the
    experts summed over all non-padding positions per layer (or None)."""
    width = max(r.input_length for r in batch)
    # built in numpy: one torch.tensor per request costs more than the copy (~30 us each on a CPU)
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)             # [B, T]
    mask = np.zeros((len(batch), width), dtype=np.int64)                               # [B, T]
    rows, cols, targets = [], [], []
    for b, r in enumerate(batch):
        n = r.input_length
        start = width - n if padding_side == "left" else 0
        input_ids[b, start:start + n] = r.tokens[:-1]
        mask[b, start:start + n] = 1
        # the logits at input position p predict token p + 1: the scored tokens are the last n_scored
        cols.extend(range(start + n - r.n_scored, start + n))
        rows.extend([b] * r.n_scored)
        targets.extend(r.tokens[-r.n_scored:])
    input_ids, mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
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
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)                  # [B, W]
    segments = np.full((len(rows), width), -1, dtype=np.int64)                              # [B, W], -1 padding
    position_ids = np.zeros((len(rows), width), dtype=np.int64)                              # [B, W]
    for b, (ids, segment, position) in enumerate(rows):
        input_ids[b, :len(ids)], segments[b, :len(ids)], position_ids[b, :len(ids)] = ids, segment, position
    input_ids, segments, position_ids = map(torch.from_numpy, (input_ids, segments, position_ids))
    flat_cols = torch.from_numpy(np.concatenate([np.arange(start, start + n) + b * width
                                                 for b, start, n in cols]))                # [N] in B*W
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


