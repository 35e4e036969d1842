#!/usr/bin/env python
"""Train the tiny OLMoE that ships with bh_routing (bh_routing/assets/tiny-olmoe).

Why this exists: every offline test, the demo and CPU-only notebook runs need an MoE model whose
routing is *learned* (peaked, domain-dependent), not the near-uniform routing of random weights,
yet no machine of the project can download OLMoE-1B-7B. So we train, from scratch and on CPU, a
model of the same family -- transformers' `OlmoeForCausalLM`, 64 experts, top-8, softmax over all
64 then top-8 *without* renormalisation (norm_topk_prob=False) -- just very narrow and shallow.

Run (from the repository root):

    python scripts/train_tiny_olmoe.py --data <tiny_corpus folder> --out bh_routing/assets/tiny-olmoe

Everything is seeded and the run is a fixed number of optimizer steps (not a time budget), so a
re-run on the same software gives the same artefact up to CPU floating-point non-associativity.

Pipeline (nanoGPT-like, one file, top to bottom):
  1. read the four domain files, split into blank-line separated documents, hold out >= 5 % of
     each domain's documents for validation (seeded);
  2. train a byte-level BPE tokenizer on the training documents only;
  3. tokenize: one token stream per domain, documents joined by <|endoftext|>;
  4. train OlmoeForCausalLM with the router load-balancing loss on;
  5. evaluate on the held-out documents (perplexity per domain, unigram baseline, router
     sharpness, domain specialisation vs a random-initialised copy);
  6. write config, safetensors weights, tokenizer, a validation sample, metrics.json, README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time

import torch

DOMAINS = ("encyclopedia", "biomedical", "math", "code")
EOS = "<|endoftext|>"  # id 0: document separator, also used as bos (GPT-NeoX / OLMoE convention)
PAD = "<|padding|>"  # id 1: pad, as in OLMoE's tokenizer (pad_token_id=1)

# Licences of the training data, copied from the staged corpus's SOURCES.md (kept in the model card).
DATA_SOURCES = {
    "encyclopedia": ("Wikipedia passages (BoolQ passages, deduplicated)",
                     "mosaicml/llm-foundry local_data/reading_comprehension/boolq.jsonl", "CC BY-SA 3.0"),
    "biomedical": ("PubMed abstracts (PubMedQA labeled contexts)",
                   "llm-foundry local_data/reading_comprehension/pubmed_qa_labeled.jsonl", "MIT"),
    "math": ("GSM8K and MATH problems with worked solutions",
             "llm-foundry local_data/symbolic_problem_solving/{gsm8k,math}.jsonl", "MIT"),
    "code": ("HumanEval (Python, C++, JS) prompts + solutions, and ~20 CPython standard-library modules",
             "llm-foundry local_data/programming/; CPython 3.11 Lib/", "MIT; PSF (CPython stdlib parts)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="the staged training corpus: a folder with one sub-folder of text files per domain")
    p.add_argument("--out", default="bh_routing/assets/tiny-olmoe")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--val-frac", type=float, default=0.05, help="held-out fraction of each domain's documents")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096)
    # model (OLMoE family; only the widths are tiny)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=32, help="per-expert FFN width")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    # optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--domain-temp", type=float, default=0.5,
                   help="sample domain d with prob ∝ tokens_d**temp (0.5: small domains are upsampled)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on a busy shared machine 1 is faster (2 OpenMP threads stall at barriers)")
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers 5.x experts kernel (eager|grouped_mm|batched_mm)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--sample-docs", type=int, default=32, help="validation documents per domain bundled for tests")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (training is always fp32)")
    p.add_argument("--bench", type=int, default=0, help="only time this many training steps, write nothing")
    p.add_argument("--ckpt", default=None, help="also save the trained fp32 state (and training log) here")
    p.add_argument("--from-ckpt", default=None,
                   help="skip training: load --ckpt output of an identical earlier run, then evaluate and write")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# 1. data: documents and the validation split

def read_documents(path: str) -> list[str]:
    """Blank-line separated documents. Leading indentation is kept (code), surrounding newlines not."""
    text = open(path, encoding="utf-8").read()
    docs = [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text)]
    return [d for d in docs if d.strip()]


def split_documents(docs: list[str], val_frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Seeded document-level hold-out: ceil(val_frac * n) documents go to validation."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_val = max(1, math.ceil(val_frac * len(docs)))
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]  # original order kept within a split
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


# ----------------------------------------------------------------------------------------------
# 2. tokenizer

def train_tokenizer(train_docs: list[str], vocab_size: int):
    """Byte-level BPE (like OLMoE's GPT-NeoX tokenizer, just 12x smaller), trained on training docs only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: same as GPT-NeoX; byte-level means no <unk> is ever needed.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
        model_max_length=4096, model_input_names=["input_ids", "attention_mask"],
    )
    return fast


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents -> one 1-D token stream, each document followed by <|endoftext|> (id 0)."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)  # [N]


# ----------------------------------------------------------------------------------------------
# 3. model

def make_config(args, tokenizer):
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,  # per expert
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len * 4,  # RoPE: can run a little past the training length
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,  # OLMoE-1B-7B: softmax over all 64, take top-8, no renormalisation
        output_router_logits=False,  # switched on per call during training (so inference stays cheap)
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,  # as in OLMoE-1B-7B
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
        initializer_range=0.02,
    )
    return cfg


def build_model(cfg, experts_impl: str | None = None):
    from transformers import OlmoeForCausalLM

    if experts_impl is not None and hasattr(cfg, "_experts_implementation"):
        # 5.x only: which kernel runs the 64 experts. grouped_mm (sort tokens by expert, one grouped
        # matmul) measured ~15-25 % faster than eager per training step here; batched_mm ~20x slower.
        cfg._experts_implementation = experts_impl
    return OlmoeForCausalLM(cfg)


def param_groups(model, weight_decay: float):
    """Decay matrices (embeddings, projections, experts, router); never norms' gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_frac * lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


class Batcher:
    """Random (T+1)-token windows; domain first (prob ∝ n_tokens**temp), then a uniform offset."""

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, batch: int, temp: float, seed: int):
        self.streams, self.T, self.B = streams, seq_len, batch
        sizes = torch.tensor([float(len(streams[d])) for d in DOMAINS])
        self.p = sizes**temp / (sizes**temp).sum()  # [4]
        self.g = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        dom = torch.multinomial(self.p, self.B, replacement=True, generator=self.g)  # [B]
        rows = []
        for d in dom.tolist():
            s = self.streams[DOMAINS[d]]
            i = int(torch.randint(0, len(s) - self.T - 1, (1,), generator=self.g))
            rows.append(s[i : i + self.T + 1])
        return torch.stack(rows)  # [B, T+1]


# ----------------------------------------------------------------------------------------------
# 4. evaluation (used by the script; the tests re-implement these independently on the sample)

def windows(stream: torch.Tensor, T: int) -> list[torch.Tensor]:
    """Non-overlapping windows of at most T tokens (the last one may be shorter)."""
    return [stream[i : i + T] for i in range(0, len(stream) - 1, T) if len(stream[i : i + T]) >= 2]


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, T: int, unigram_logp: torch.Tensor, num_experts: int, batch: int = 32):
    """Teacher-forced NLL of `stream` in independent windows of T tokens, plus router statistics.

    Returns sums (so domains can be pooled): nll, unigram nll and count over predicted tokens;
    per layer the sum of top-1 router probabilities and the expert-assignment counts [L, E].
    """
    model.eval()
    ws = windows(stream, T)
    nll = uni = 0.0
    n_pred = n_tok = 0
    top1 = None  # [L]
    counts = None  # [L, E]
    for b in range(0, len(ws), batch):
        chunk = ws[b : b + batch]
        L_max = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), L_max), 1, dtype=torch.long)  # [b, L_max], padded with pad id 1
        mask = torch.zeros_like(ids)
        for j, w in enumerate(chunk):
            ids[j, : len(w)] = w
            mask[j, : len(w)] = 1
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # [b, L_max, V]
        tgt = ids[:, 1:]  # [b, L_max-1]
        m = mask[:, 1:].bool()  # [b, L_max-1]
        tok_lp = logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [b, L_max-1]
        nll -= tok_lp[m].sum().item()
        uni -= unigram_logp[tgt[m]].sum().item()
        n_pred += int(m.sum())
        # router: out.router_logits is a tuple of L tensors [b*L_max, E] (raw logits in 5.10+)
        flat_mask = mask.reshape(-1).bool()  # [b*L_max]
        layer_top1, layer_counts = [], []
        for rl in out.router_logits:
            probs = torch.softmax(rl.float()[flat_mask], dim=-1)  # [n, E]
            layer_top1.append(probs.max(dim=-1).values.sum())
            sel = probs.topk(model.config.num_experts_per_tok, dim=-1).indices  # [n, k]
            layer_counts.append(torch.bincount(sel.reshape(-1), minlength=num_experts).double())
        t1, c = torch.stack(layer_top1).double(), torch.stack(layer_counts)  # [L], [L, E]
        top1 = t1 if top1 is None else top1 + t1
        counts = c if counts is None else counts + c
        n_tok += int(flat_mask.sum())
    return {"nll": nll, "unigram_nll": uni, "n_pred": n_pred, "top1_sum": top1, "counts": counts, "n_tok": n_tok}


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    p = p / p.sum(dim=-1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1)


def domain_specialisation(counts_by_domain: dict[str, torch.Tensor]) -> list[float]:
    """Per layer: Jensen-Shannon divergence (bits, equal weights) among the domains' expert-usage
    distributions = H(mean usage) - mean H(usage). 0: every domain uses experts alike; max log2(#domains)."""
    U = torch.stack([c / c.sum(dim=-1, keepdim=True) for c in counts_by_domain.values()])  # [D, L, E]
    return (entropy_bits(U.mean(0)) - entropy_bits(U).mean(0)).tolist()  # [L]


# ----------------------------------------------------------------------------------------------
# 5. artefact

def write_validation_sample(path, tokenizer, val_docs: dict[str, list[str]], n_per_domain: int, seed: int,
                            max_tokens: int = 256):
    """A few dozen held-out documents per domain, so tests need no ../shared. Long documents
    (most PubMed abstracts) are cut at the last whitespace that keeps them <= max_tokens tokens;
    cutting text, not tokens, keeps every row valid UTF-8 that re-tokenizes the same way."""
    rng = random.Random(seed + 7)
    rows = []
    for d in DOMAINS:
        docs = list(val_docs[d])
        rng.shuffle(docs)
        kept = 0
        for doc in docs:
            text, cut = doc, False
            while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_tokens:
                # drop ~10 % of the characters, back to a whitespace boundary
                j = max(text.rfind(" ", 0, int(len(text) * 0.9)), text.rfind("\n", 0, int(len(text) * 0.9)))
                text, cut = text[: j if j > 0 else int(len(text) * 0.9)].rstrip(), True
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 16:
                continue  # too short to say anything about a domain
            rows.append({"domain": d, "text": text, "truncated": cut})
            kept += 1
            if kept == n_per_domain:
                break
    # mtime=0: byte-identical file on every run (gzip otherwise stores the current time)
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(rows)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def model_card(m: dict) -> str:
    a, tr, v = m["architecture"], m["training"], m["validation"]
    L = a["num_hidden_layers"]
    rows = "\n".join(
        f"| {d} | {v['per_domain'][d]['n_docs']} | {v['per_domain'][d]['n_pred_tokens']} | "
        f"{v['per_domain'][d]['perplexity']:.2f} | {v['per_domain'][d]['unigram_perplexity']:.1f} |"
        for d in DOMAINS
    )
    top1 = " | ".join(f"{x:.3f}" for x in v["router"]["mean_top1_prob_per_layer"])
    top1_rand = " | ".join(f"{x:.3f}" for x in v["router_random_init"]["mean_top1_prob_per_layer"])
    spec = " | ".join(f"{x:.3f}" for x in v["router"]["domain_js_bits_per_layer"])
    spec_rand = " | ".join(f"{x:.3f}" for x in v["router_random_init"]["domain_js_bits_per_layer"])
    rewritten = ("" if tr["artefact_written_by"] == tr["command"] else
                 f" (the files were then re-written from its saved checkpoint, without retraining, by "
                 f"`{tr['artefact_written_by']}`)")
    src = "\n".join(f"| {d} | {DATA_SOURCES[d][0]} | {DATA_SOURCES[d][1]} | {DATA_SOURCES[d][2]} |" for d in DOMAINS)
    return f"""# tiny-olmoe — a tiny *trained* OLMoE for offline tests and demos

A {a['n_params']/1e6:.2f} M-parameter `OlmoeForCausalLM` trained from scratch on CPU by
`scripts/train_tiny_olmoe.py` so that bh_routing's tests, offline demo and CPU notebook runs have an
MoE model whose routing is **learned** (peaked, domain-dependent), not random. It belongs to the same
architecture family as `allenai/OLMoE-1B-7B-0924` — **{a['num_experts']} experts per layer, top-{a['num_experts_per_tok']},
softmax over all {a['num_experts']} then top-{a['num_experts_per_tok']} without renormalisation (`norm_topk_prob=False`)**,
RMSNorm, q/k-norm, RoPE, SwiGLU experts, untied embeddings — only narrow and shallow. It is a
*pipeline* model, not a language model: it writes locally plausible text in its four domains and
nothing more. Do not read its quality numbers as statements about OLMoE.

Load it offline with plain transformers (≥ 4.46; weights are saved in the per-expert checkpoint
layout of the real OLMoE, which 5.x fuses on load):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
path = "bh_routing/assets/tiny-olmoe"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
```

## Architecture

| | tiny-olmoe | OLMoE-1B-7B |
|---|---|---|
| layers | {L} | 16 |
| hidden size | {a['hidden_size']} | 2048 |
| attention heads | {a['num_attention_heads']} | 16 |
| experts / layer | {a['num_experts']} | 64 |
| active experts (top-k) | {a['num_experts_per_tok']} | 8 |
| expert FFN width | {a['intermediate_size']} | 1024 |
| norm_topk_prob | False | False |
| vocabulary | {a['vocab_size']} (own byte-level BPE) | 50304 rows (GPT-NeoX/Dolma BPE, 50280 tokens) |
| parameters | {a['n_params']:,} ({a['n_active_params']:,} active per token) | 6.9 B (1.3 B active) |
| weights on disk | {a['weights_dtype']} safetensors | (hub checkpoint) |

Tokenizer: byte-level BPE trained with HF `tokenizers` on the training split only;
`<|endoftext|>` (id 0) is eos, bos and document separator, `<|padding|>` (id 1) is pad — the
same roles as in OLMoE's tokenizer. No BOS is prepended.

## Training data

The staged `tiny_corpus` (about 8 MB, four domains), split into blank-line separated documents;
a seeded {tr['val_frac']*100:.0f} % of each domain's documents (rounded up) is held out for validation.
Code documents are therefore blank-line separated chunks of programs.

| domain | content | source | licence |
|---|---|---|---|
{src}

The validation sample bundled here (`validation_sample.jsonl.gz`, {v['sample_docs']} held-out documents,
up to {tr['sample_docs_per_domain']} per domain, 16–256 tokens each, long
documents cut at a whitespace) carries the same licences.

## Training

Seed {tr['seed']}; {tr['steps']} AdamW steps (β = 0.9/0.95, weight decay {tr['weight_decay']} on matrices,
grad clip {tr['grad_clip']}), batch {tr['batch']} × {tr['seq_len']} tokens = {tr['tokens_per_step']:,} tokens/step,
{tr['tokens_seen']/1e6:.1f} M tokens in all (the training split has {tr['train_tokens']/1e6:.2f} M tokens);
learning rate {tr['lr']} with {tr['warmup']} warm-up steps and cosine decay to {tr['min_lr_frac']}×.
Windows are random {tr['seq_len']+1}-token slices of one domain's token stream, domain drawn with
probability ∝ tokens^{tr['domain_temp']} ({', '.join(f'{d} {p:.2f}' for d, p in tr['domain_probs'].items())}).
Loss: next-token cross-entropy + {tr['router_aux_loss_coef']} × the Switch-style load-balancing loss of
transformers (`output_router_logits=True`). Experts kernel during training: `{tr['experts_implementation']}`.

Wall time: **{tr['train_wall_s']/60:.1f} min of training** ({tr['total_wall_s']/60:.1f} min for the whole script) on
{tr['machine']}, torch {tr['torch']} / transformers {tr['transformers']}, {tr['threads']} torch thread(s);
load average {tr['loadavg_start'][0]:.2f} at the start and {tr['loadavg_at_write'][0]:.2f} when the files were written (a shared machine:
other jobs' tests ran throughout). Short timing runs before training measured about 0.5 s/step with
2 threads on an idle machine (≈ 25 min for {tr['steps']} steps); under contention, 2 OpenMP threads
stalled at barriers (4–5 s/step), so the run used `--threads {tr['threads']}` (training is otherwise identical).
Final training loss (last 50 steps, cross-entropy only): {tr['final_train_ce']:.3f}.
Command: `{tr['command']}`{rewritten}.

## Validation (held-out documents, independent windows of {tr['seq_len']} tokens)

| domain | documents | predicted tokens | perplexity | unigram perplexity |
|---|---|---|---|---|
{rows}
| **all** | {sum(v['per_domain'][d]['n_docs'] for d in DOMAINS)} | {v['overall']['n_pred_tokens']} | **{v['overall']['perplexity']:.2f}** | {v['overall']['unigram_perplexity']:.1f} |

The unigram model uses this tokenizer's token frequencies on the training split (add-one smoothed),
scored on exactly the same validation tokens.

Router (all validation tokens; layers 0 … {L - 1}):

| | {' | '.join(f'L{i}' for i in range(L))} |
|---|{'---|' * L}
| mean top-1 router probability, trained | {top1} |
| same, random-initialised copy | {top1_rand} |
| domain specialisation (JS bits), trained | {spec} |
| same, random-initialised copy | {spec_rand} |

Uniform routing would give a top-1 probability of 1/64 = {1/64:.4f}. Mean over layers: trained
{v['router']['mean_top1_prob']:.3f}, random {v['router_random_init']['mean_top1_prob']:.3f}; the top-8 carry
{v['router']['mean_top8_mass']:.2f} of the router mass on average (OLMoE-1B-7B: 0.14 and 0.44).
Domain specialisation is the Jensen–Shannon divergence (in bits, equal weights; 0 = identical,
max 2) among the four domains' expert-usage distributions (share of top-8 assignments per expert),
averaged over layers: **{v['router']['domain_js_bits']:.3f} bits trained vs {v['router_random_init']['domain_js_bits']:.3f}
bits for a random-initialised copy** of the same config (seed {tr['seed']}), on the same tokens.
Load balance (normalised entropy of overall expert usage, 1 = perfectly balanced): trained
{v['router']['usage_entropy_norm']:.3f}.

All figures are in `metrics.json`. `tests/test_tiny_model.py` recomputes the key ones independently
on the bundled sample.

## Licence

Weights and tokenizer are derived from the data above; they are distributed under the same terms
(CC BY-SA 3.0 for what derives from the Wikipedia passages; MIT; PSF for the CPython parts).
"""


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    t_script = time.time()
    loadavg_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    import transformers

    # 1. documents and split ------------------------------------------------------------------
    rng = random.Random(args.seed)
    train_docs, val_docs = {}, {}
    for d in DOMAINS:
        docs = read_documents(os.path.join(args.data, f"{d}.txt"))
        train_docs[d], val_docs[d] = split_documents(docs, args.val_frac, rng)
        print(f"{d:13s} {len(docs):6d} docs: {len(train_docs[d])} train, {len(val_docs[d])} val", flush=True)

    # 2. tokenizer (training split only; BPE pair counts do not depend on document order)
    t0 = time.time()
    tokenizer = train_tokenizer([doc for d in DOMAINS for doc in train_docs[d]], args.vocab_size)
    print(f"tokenizer: vocab {len(tokenizer)} in {time.time() - t0:.1f}s", flush=True)

    # 3. token streams ------------------------------------------------------------------------
    train_streams = {d: encode_stream(tokenizer, train_docs[d]) for d in DOMAINS}  # each [N_d]
    val_streams = {d: encode_stream(tokenizer, val_docs[d]) for d in DOMAINS}
    n_train = sum(len(s) for s in train_streams.values())
    for d in DOMAINS:
        print(f"{d:13s} train {len(train_streams[d]):8d} tok, val {len(val_streams[d]):7d} tok", flush=True)
    # unigram baseline from training tokens, add-one smoothed: [V] log-probabilities
    uni_counts = torch.bincount(torch.cat(list(train_streams.values())), minlength=len(tokenizer)).double() + 1
    unigram_logp = (uni_counts / uni_counts.sum()).log()

    # 4. model and training -------------------------------------------------------------------
    cfg = make_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model = build_model(cfg, args.experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - expert_params + expert_params * args.top_k // args.experts
    print(f"model: {n_params:,} params ({n_active:,} active/token), experts impl "
          f"{getattr(model.config, '_experts_implementation', 'n/a')}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batcher = Batcher(train_streams, args.seq_len, args.batch, args.domain_temp, args.seed)
    n_steps = args.bench or args.steps
    ce_hist, aux_hist, evals = [], [], []
    t_train = t_log = time.time()
    model.train()
    for step in range(0 if args.from_ckpt else n_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        xy = batcher.next()  # [B, T+1]
        x, y = xy[:, :-1], xy[:, 1:]  # [B, T] each
        out = model(input_ids=x, output_router_logits=True)  # no labels: we shift ourselves (y)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), y.reshape(-1))
        loss = ce + args.aux_coef * out.aux_loss  # the same sum HF forms when labels are given
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ce_hist.append(ce.item())
        aux_hist.append(out.aux_loss.item())
        if (step + 1) % args.log_every == 0 or step == 0 or args.bench:
            now = time.time()
            el, dt = now - t_train, (now - t_log) / (1 if args.bench or not step else args.log_every)
            t_log = now
            print(f"step {step + 1:5d}/{n_steps} ce {sum(ce_hist[-50:]) / len(ce_hist[-50:]):.3f} "
                  f"aux {sum(aux_hist[-50:]) / len(aux_hist[-50:]):.3f} lr {lr_at(step, args):.2e} "
                  f"{dt:.3f}s/step (mean {el / (step + 1):.3f}) eta {el / (step + 1) * (n_steps - step - 1) / 60:.1f}min "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        if not args.bench and ((step + 1) % args.eval_every == 0 and step + 1 < n_steps):
            # quick held-out loss on the first 4 windows of each domain: a learning curve, not a result
            r = [evaluate(model, val_streams[d][: 4 * args.seq_len], args.seq_len, unigram_logp, args.experts)
                 for d in DOMAINS]
            vl = sum(x["nll"] for x in r) / sum(x["n_pred"] for x in r)
            evals.append({"step": step + 1, "val_ce_subset": vl})
            print(f"  eval step {step + 1}: val ce (subset) {vl:.3f} ppl {math.exp(vl):.1f}", flush=True)
            model.train()
    train_wall = time.time() - t_train
    train_command = command_line()
    print(f"training: {train_wall / 60:.1f} min", flush=True)
    if args.bench:
        return
    if args.from_ckpt:  # same data, tokenizer and config were rebuilt above; restore the trained state
        ck = torch.load(args.from_ckpt, weights_only=True)  # tensors and plain data only: never run pickled code
        model.load_state_dict(ck["model"])
        ce_hist, aux_hist, evals, train_wall = ck["ce_hist"], ck["aux_hist"], ck["evals"], ck["train_wall"]
        loadavg_start, t_script = ck["loadavg_start"], time.time() - ck["pre_eval_wall"]
        train_command = ck.get("command", command_line().replace("--from-ckpt", "--ckpt"))
    elif args.ckpt:
        torch.save({"model": model.state_dict(), "ce_hist": ce_hist, "aux_hist": aux_hist, "evals": evals,
                    "train_wall": train_wall, "loadavg_start": loadavg_start,
                    "pre_eval_wall": time.time() - t_script, "command": command_line()}, args.ckpt)

    # 5. evaluation ---------------------------------------------------------------------------
    model.eval()
    res = {d: evaluate(model, val_streams[d], args.seq_len, unigram_logp, args.experts) for d in DOMAINS}
    cfg_rand = make_config(args, tokenizer)
    torch.manual_seed(args.seed)
    rand_model = build_model(cfg_rand, args.experts_impl).eval()
    res_rand = {d: evaluate(rand_model, val_streams[d], args.seq_len, unigram_logp, args.experts) for d in DOMAINS}

    def router_summary(r):
        top1_sum = sum(x["top1_sum"] for x in r.values())  # [L]
        n_tok = sum(x["n_tok"] for x in r.values())
        counts = sum(x["counts"] for x in r.values())  # [L, E]
        top1 = (top1_sum / n_tok).tolist()
        js = domain_specialisation({d: x["counts"] for d, x in r.items()})
        usage_h = (entropy_bits(counts) / math.log2(args.experts)).mean().item()
        return {"mean_top1_prob_per_layer": top1, "mean_top1_prob": sum(top1) / len(top1),
                "uniform_top1_prob": 1 / args.experts, "domain_js_bits_per_layer": js,
                "domain_js_bits": sum(js) / len(js), "usage_entropy_norm": usage_h}

    per_domain = {
        d: {"n_docs": len(val_docs[d]), "n_pred_tokens": r["n_pred"], "perplexity": math.exp(r["nll"] / r["n_pred"]),
            "unigram_perplexity": math.exp(r["unigram_nll"] / r["n_pred"]),
            "perplexity_random_init": math.exp(res_rand[d]["nll"] / r["n_pred"])}
        for d, r in res.items()
    }
    n_pred = sum(r["n_pred"] for r in res.values())
    router = router_summary(res)
    # mass of the top-8: needs the probabilities themselves; one more cheap pass on a subset
    with torch.no_grad():
        ids = torch.stack([val_streams[d][: args.seq_len] for d in DOMAINS])  # [4, T]
        rl = model(input_ids=ids, output_router_logits=True).router_logits
        router["mean_top8_mass"] = sum(
            torch.softmax(x.float(), -1).topk(args.top_k, -1).values.sum(-1).mean().item() for x in rl) / len(rl)
    validation = {
        "per_domain": per_domain,
        "overall": {"n_pred_tokens": n_pred,
                    "perplexity": math.exp(sum(r["nll"] for r in res.values()) / n_pred),
                    "unigram_perplexity": math.exp(sum(r["unigram_nll"] for r in res.values()) / n_pred),
                    "perplexity_random_init": math.exp(sum(r["nll"] for r in res_rand.values()) / n_pred)},
        "router": router,
        "router_random_init": router_summary(res_rand),
        "learning_curve": evals,
    }
    print(json.dumps(validation["overall"]), flush=True)

    # 6. artefact -----------------------------------------------------------------------------
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    save_dtype = getattr(torch, args.dtype)
    model = model.to(save_dtype)
    model.config.use_cache = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # save_pretrained (5.x) reverts its fused expert tensors to the original per-expert layout
    # (experts.{e}.gate_proj/up_proj/down_proj), which is what 4.46-4.57 expect.
    model.save_pretrained(args.out, safe_serialization=True)
    portable_config(args.out)
    tokenizer.save_pretrained(args.out)
    fix_tokenizer_config(args.out)
    n_sample = write_validation_sample(os.path.join(args.out, "validation_sample.jsonl.gz"), tokenizer, val_docs,
                                       args.sample_docs, args.seed)
    total_wall = time.time() - t_script
    metrics = {
        "architecture": {
            "model_type": "olmoe", "num_hidden_layers": args.layers, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_attention_heads": args.heads, "num_experts": args.experts,
            "num_experts_per_tok": args.top_k, "norm_topk_prob": False, "vocab_size": len(tokenizer),
            "n_params": n_params, "n_active_params": n_active, "weights_dtype": args.dtype,
        },
        "training": {
            "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "tokens_per_step": args.batch * args.seq_len, "tokens_seen": args.steps * args.batch * args.seq_len,
            "train_tokens": n_train, "train_tokens_per_domain": {d: len(s) for d, s in train_streams.items()},
            "val_frac": args.val_frac, "lr": args.lr, "min_lr_frac": args.min_lr_frac, "warmup": args.warmup,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "domain_temp": args.domain_temp,
            "domain_probs": {d: float(p) for d, p in zip(DOMAINS, batcher.p)},
            "router_aux_loss_coef": args.aux_coef, "experts_implementation": args.experts_impl,
            "final_train_ce": sum(ce_hist[-50:]) / len(ce_hist[-50:]), "final_aux_loss": sum(aux_hist[-50:]) / 50,
            "train_wall_s": train_wall, "total_wall_s": total_wall, "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''} Linux, {os.cpu_count()} CPU cores "
                       f"(shared with other jobs), no GPU".replace("  ", " "),
            "loadavg_start": list(loadavg_start), "loadavg_at_write": list(os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "sample_docs_per_domain": args.sample_docs, "command": train_command,
            "artefact_written_by": command_line(),
        },
        "validation": {**validation, "sample_docs": n_sample},
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    with open(os.path.join(args.out, "README.md"), "w") as fh:
        fh.write(model_card(metrics))
    size = dir_size(args.out)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB", flush=True)
    assert size <= 12_000_000, "artefact over the 12 MB budget"


def command_line() -> str:
    return " ".join(["python", "scripts/" + os.path.basename(sys.argv[0])] + sys.argv[1:])


def portable_config(out: str):
    """5.x writes `rope_parameters` and `dtype`; 4.46-4.57 read `rope_theta` and `torch_dtype`.
    Writing both spellings keeps one config.json valid for every supported transformers
    (5.x folds `rope_theta` into `rope_parameters`; 4.x ignores the keys it does not know)."""
    path = os.path.join(out, "config.json")
    cfg = json.load(open(path))
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg.setdefault("rope_scaling", None)
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    with open(path, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")


def fix_tokenizer_config(out: str):
    """Make tokenizer_config.json loadable by transformers 4.46+ as well as 5.x: name the class
    PreTrainedTokenizerFast (5.x may write its new backend name) and keep only portable keys."""
    path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD,
                "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
                # 4.x's PreTrainedTokenizerFast otherwise also returns token_type_ids, which
                # generate(**tok(text, return_tensors="pt")) rejects for OLMoE
                "model_input_names": ["input_ids", "attention_mask"]})
    with open(path, "w") as fh:
        json.dump(cfg, fh, indent=2)


if __name__ == "__main__":
    main()
