"""Evaluator throughput against the naive per-item loop, on the same requests, with the bound this machine sets.

    python bench/bench_eval.py                       # bundled tiny model (tiny random OLMoE if absent), CPU
    python bench/bench_eval.py --model allenai/OLMoE-1B-7B-0924 --device cuda --hellaswag 200

Naive loop = one unbatched forward per request with full logits and a log-softmax over every
position (lm-eval at batch size 1). Evaluator = `bh_routing.evaluation.score_requests` as
`evaluate` runs it: batches planned by `batching.plan_batches`, logits at the scored positions
only, HellaSwag's endings packed with their shared context (also timed without, for the record).
Both score exactly the same tokens; the script checks that they agree (max |delta log-prob|) before
reporting tokens/s (the requests' input tokens per second of scoring, the same count for every
method; tokenisation, shared by both, is reported separately). With --repeats R every measurement
(evaluator, naive loop, and the decoder and scoring rates of the speedup bound) runs once per
round, R interleaved rounds; the evaluator's share of the bound is reported from the medians of the
rounds (the figure to read) and from the fastest rounds.
Writes bench/results/eval_<device>_<threads>thread_<stamp>.json (--out: another folder).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bh_routing import evaluation as ev

OLMOE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer" / \
    "allenai_gpt-neox-olmo-dolma-v1_5.json"


def tiny_random_olmoe(max_length: int):
    """The fallback: a random OLMoE of the bundled tiny model's shape (scripts/train_tiny_olmoe.py
    defaults: 5 layers, hidden 64, 64 experts of width 32, top-8, 4 heads), with OLMoE's tokenizer."""
    from transformers import AutoModelForCausalLM, OlmoeConfig, PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(OLMOE_TOKENIZER), eos_token="<|endoftext|>",
                                        pad_token="<|padding|>")
    config = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=max_length, norm_topk_prob=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer, "tiny random OLMoE (5 layers, 64 experts, OLMoE tokenizer)"


def load(name: str, device: str, max_length: int):
    from bh_routing.models import TINY_MODEL_DIR, load_model
    if name == "tiny" and not (TINY_MODEL_DIR / "config.json").is_file():
        return tiny_random_olmoe(max_length)
    model, tokenizer = load_model(name, device=device, verbose=False)
    return model, tokenizer, name


# The bound's decoder shapes: rows of each length at 1 row and at batches of ~2k, 4k and 8k tokens.
# Lengths matter: attention costs grow with the row, so a 1,024-token WikiText window can never run
# at the rate of 128-token rows (the tiny model: ~24k vs ~35k tokens/s at 1 thread).
BOUND_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)


def forward_shapes(max_length: int) -> list[tuple[int, int]]:
    """(batch, length) pairs measured for the bound: every grid length up to the longest row."""
    lengths = [length for length in BOUND_LENGTHS if length <= max_length] or [max_length]
    return [(batch, length) for length in lengths
            for batch in sorted({1, *(max(1, tokens // length) for tokens in (2048, 4096, 8192))})]


def forward_throughput(model, device: str, shapes: list[tuple[int, int]]) -> list[dict]:
    """Tokens/s of the bare decoder (no vocabulary projection) on random ids, by batch shape: with
    `scoring_throughput`, the machine's ceiling for any evaluator of this model."""
    decoder, vocab = model.get_decoder(), model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, length in shapes:
        ids = torch.randint(vocab, (batch, length), generator=generator).to(device)
        with torch.inference_mode():
            decoder(input_ids=ids, use_cache=False)    # warm-up
            started = time.perf_counter()
            decoder(input_ids=ids, use_cache=False)
            seconds = time.perf_counter() - started
        rows.append({"batch": batch, "length": length, "seconds": seconds, "tokens_per_s": batch * length / seconds})
    return rows


def evaluator_shapes(model, requests, pad: int) -> list[tuple[int, int]]:
    """(rows, width) of every forward pass `score_requests` makes for these requests."""
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        ev.score_requests(model, requests, pad_token_id=pad)
    finally:
        hook.remove()
    return shapes


def decoder_floor_s(row_tokens: list[int], forward: list[dict]) -> float:
    """Seconds the bare decoder needs at least for rows of these lengths: each row at the best rate
    in `forward` (any batch size) for rows no longer than it (the shortest grid length for shorter
    rows), an optimistic figure since longer rows only cost more per token."""
    best = {}
    for f in forward:
        best[f["length"]] = max(best.get(f["length"], 0.0), f["tokens_per_s"])
    lengths = np.array(sorted(best))
    rows = np.asarray(row_tokens, dtype=np.int64)
    grid = lengths[np.maximum(np.searchsorted(lengths, rows, side="right") - 1, 0)]   # [n_rows]
    return float(sum(rows[grid == length].sum() / best[int(length)] for length in lengths))


def scoring_throughput(model, device: str, positions: int = 2048) -> float:
    """Scored positions/s of the vocabulary projection + float32 log-softmax (what every scored
    token costs on top of the decoder, for the evaluator and the naive loop alike)."""
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, head.weight.shape[1], generator=generator).to(device, head.weight.dtype)
    targets = torch.randint(head.weight.shape[0], (positions,), generator=generator).to(device)
    with torch.inference_mode():
        ev.engine._token_logprobs(hidden, head, targets)      # warm-up
        started = time.perf_counter()
        ev.engine._token_logprobs(hidden, head, targets)
        return positions / (time.perf_counter() - started)


def fastest(scores):
    """The run least disturbed by other processes on a shared machine."""
    return min(scores, key=lambda s: s.stats["seconds"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hellaswag", type=int, default=50, help="items (4 requests each)")
    parser.add_argument("--lambada", type=int, default=100, help="items")
    parser.add_argument("--wikitext", type=int, default=2, help="articles")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (the share of the bound is read from their medians)")
    parser.add_argument("--max-length", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, model_name = load(args.model, args.device, args.max_length or 256)
    max_length = args.max_length or ev.resolve_max_length(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ev.prefix_token_id(tokenizer)
    machine = {"device": str(next(model.parameters()).device), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
               "load_average_before": os.getloadavg()}
    tasks = []   # (task, items, requests, tokenize_s)
    row_tokens = {}   # task -> tokens of each row the evaluator computes (its layout, for the bound)
    batch_shapes = {}   # task -> (rows, width) of each forward pass the evaluator makes
    for task, n in (("hellaswag", args.hellaswag), ("lambada", args.lambada), ("wikitext", args.wikitext)):
        if n > 0:
            docs = ev.load_docs(task, n=n, source="bundled")[0]
            started = time.perf_counter()
            requests = ev.TASKS[task].build_requests(docs, tokenizer, max_length, None)
            tasks.append((task, n, requests, time.perf_counter() - started))
            row_tokens[task] = ev.engine.score_units(model, requests)[1]
            batch_shapes[task] = evaluator_shapes(model, requests, pad)                  # also the warm-up

    # Rounds: each runs every method of every task once, then the decoder and scoring rates of the
    # bound; interleaving puts all of them under the same conditions (medians and fastest rounds below).
    runs = {task: [] for task, *_ in tasks}
    forward_rounds, scoring_rates = [], []
    own_shape_rounds = []   # per round: task -> seconds of the bare decoder on the evaluator's own batch shapes
    shapes = forward_shapes(max(max(rows) for rows in row_tokens.values()))
    for _ in range(args.repeats):
        for task, _, requests, _ in tasks:
            runs[task].append((ev.score_requests(model, requests, pad_token_id=pad), ev.score_naive(model, requests),
                               ev.score_requests(model, requests, pad_token_id=pad, share_prefix=False)
                               if task == "hellaswag" else None))
        forward_rounds.append(forward_throughput(model, args.device, shapes))
        own_shape_rounds.append({task: sum(f["seconds"] for f in forward_throughput(model, args.device, batch_shapes[task]))
                                 for task in batch_shapes})
        scoring_rates.append(scoring_throughput(model, args.device))

    rows = []
    for task, n, requests, tokenize_s in tasks:
        fast, naive = (fastest(run[i] for run in runs[task]) for i in (0, 1))
        unshared = fastest(run[2] for run in runs[task]) if task == "hellaswag" else None
        delta = float(np.abs(fast.logprobs - naive.logprobs).max())
        row = {"task": task, "items": n, "requests": len(requests), "max_length": max_length,
               "input_tokens": fast.stats["input_tokens"], "computed_tokens": fast.stats["computed_tokens"],
               "scored_tokens": fast.stats["scored_tokens"],
               "tokenize_s": tokenize_s,
               "evaluator_s": fast.stats["seconds"], "naive_s": naive.stats["seconds"],
               "evaluator_tokens_per_s": fast.stats["input_tokens_per_s"],
               "naive_tokens_per_s": naive.stats["input_tokens_per_s"],
               "speedup": naive.stats["seconds"] / fast.stats["seconds"],
               "batches": fast.stats["n_batches"], "max_batch_tokens": fast.stats["max_batch_tokens"],
               "padding_fraction": fast.stats["padding_fraction"], "max_abs_delta_logprob": delta,
               "greedy_equal": bool(np.array_equal(fast.greedy, naive.greedy)),
               "share_prefix": bool(fast.stats["shared_prefix_groups"])}
        if unshared is not None:     # the other setting of share_prefix, for the record
            row["other_share_prefix"] = {
                "share_prefix": False, "evaluator_s": unshared.stats["seconds"],
                "evaluator_tokens_per_s": unshared.stats["input_tokens_per_s"],
                "speedup": naive.stats["seconds"] / unshared.stats["seconds"],
                "computed_tokens": unshared.stats["computed_tokens"], "batches": unshared.stats["n_batches"],
                "max_abs_delta_logprob": float(np.abs(unshared.logprobs - naive.logprobs).max())}
        rows.append(row)
        print(f"{task:9s} {len(requests):5d} requests {row['input_tokens']:7d} tokens | evaluator "
              f"{row['evaluator_tokens_per_s']:9.0f} tok/s | naive {row['naive_tokens_per_s']:8.0f} tok/s | "
              f"x{row['speedup']:.1f} | padding {row['padding_fraction']:.1%} | max|d| {delta:.1e}", flush=True)
        if unshared is not None:
            other = row["other_share_prefix"]
            print(f"{'':9s} share_prefix={other['share_prefix']}: evaluator {other['evaluator_tokens_per_s']:9.0f} "
                  f"tok/s x{other['speedup']:.1f} ({other['computed_tokens']} tokens computed, {other['batches']} batches) | "
                  f"max|d| {other['max_abs_delta_logprob']:.1e}", flush=True)
    # The speedup no evaluator could beat on this machine: each row it must compute at the bare
    # decoder's best rate for rows of that length (the best batch size), plus the scored tokens'
    # vocabulary projection and log-softmax. Two statistics of the R rounds, on both sides alike:
    # medians (each shape's median rate against the evaluator's median time: the figure to read, as
    # one timing on this machine can be 30 % off either way and the best of many samples picks those
    # spikes) and fastest rounds (each shape's best rate, any round, against the evaluator's fastest).
    # `floor_any_length_s` (every row at the best rate of any length, an earlier version's bound) is
    # kept for comparison: too optimistic for long rows, which no batching makes as cheap as short ones.
    forward = [max(rounds, key=lambda f: f["tokens_per_s"]) for rounds in zip(*forward_rounds)]
    forward_median = [dict(rounds[0], seconds=float(np.median([f["seconds"] for f in rounds])),
                           tokens_per_s=float(np.median([f["tokens_per_s"] for f in rounds])))
                      for rounds in zip(*forward_rounds)]
    for f, m in zip(forward, forward_median):
        print(f"forward   [{f['batch']:3d} x {f['length']:4d}] {f['tokens_per_s']:9.0f} tok/s best, "
              f"{m['tokens_per_s']:9.0f} median")
    best_rate = max(f["tokens_per_s"] for f in forward)
    scoring_rate, scoring_median = max(scoring_rates), float(np.median(scoring_rates))
    print(f"scoring   {scoring_rate:9.0f} scored tokens/s best, {scoring_median:.0f} median "
          f"(vocabulary projection + log-softmax)")
    for row in rows:
        task, task_rows = row["task"], row_tokens[row["task"]]
        assert sum(task_rows) == row["computed_tokens"], "the bound's rows are not the evaluator's"
        scoring_s = row["scored_tokens"] / scoring_rate
        row["floor_s"] = decoder_floor_s(task_rows, forward) + scoring_s
        row["floor_any_length_s"] = row["computed_tokens"] / best_rate + scoring_s
        row["speedup_bound"] = row["naive_s"] / row["floor_s"]
        row["fraction_of_bound"] = row["floor_s"] / row["evaluator_s"]
        row["fraction_of_any_length_bound"] = row["floor_any_length_s"] / row["evaluator_s"]
        row["evaluator_median_s"] = float(np.median([run[0].stats["seconds"] for run in runs[task]]))
        row["floor_median_s"] = decoder_floor_s(task_rows, forward_median) + row["scored_tokens"] / scoring_median
        row["fraction_of_bound_median"] = row["floor_median_s"] / row["evaluator_median_s"]
        # What the evaluator adds to its own forward passes: the bare decoder on exactly its batch
        # shapes (random ids, no mask, as the bound) plus the same scoring, against its time. The rest
        # of the gap to the bound is the batch shapes its rows allow.
        row["batch_shapes"] = batch_shapes[task]
        row["own_shapes_floor_median_s"] = float(np.median([own[task] for own in own_shape_rounds])) + \
            row["scored_tokens"] / scoring_median
        row["fraction_of_own_shapes_floor_median"] = row["own_shapes_floor_median_s"] / row["evaluator_median_s"]
        print(f"{task:9s} x{row['speedup']:.1f}, bound x{row['speedup_bound']:.1f}: "
              f"{row['fraction_of_bound_median']:.0%} of the bound (medians of {args.repeats} rounds) | "
              f"{row['fraction_of_bound']:.0%} (fastest rounds; {row['fraction_of_any_length_bound']:.0%} of the "
              f"any-length bound) | rows {min(task_rows)}-{max(task_rows)} tokens\n{'':9s} "
              f"{row['fraction_of_own_shapes_floor_median']:.0%} of the bare decoder + scoring on its own "
              f"{len(batch_shapes[task])} batch shapes (medians)")
    total_fast = sum(r["evaluator_s"] for r in rows)
    total_naive = sum(r["naive_s"] for r in rows)
    tokens = sum(r["input_tokens"] for r in rows)
    summary = {"evaluator_tokens_per_s": tokens / total_fast, "naive_tokens_per_s": tokens / total_naive,
               "speedup": total_naive / total_fast,
               "speedup_bound": total_naive / sum(r["floor_s"] for r in rows)}
    print(f"all       {tokens:7d} tokens | evaluator {summary['evaluator_tokens_per_s']:.0f} tok/s | naive "
          f"{summary['naive_tokens_per_s']:.0f} tok/s | x{summary['speedup']:.1f}, bound x{summary['speedup_bound']:.1f}")
    machine["load_average_after"] = os.getloadavg()
    report = {"model": model_name, "machine": machine, "repeats": args.repeats,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "tasks": rows, "overall": summary, "forward_throughput": forward,
              "forward_throughput_median": forward_median, "scoring_tokens_per_s": scoring_rate,
              "scoring_tokens_per_s_median": scoring_median}
    out = Path(args.out) / (f"eval_{machine['device'].split(':')[0]}_{machine['torch_threads']}thread_"
                            f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
