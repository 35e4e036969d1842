"""bh_routing.evaluation: definitions (lm-eval's), exactness of batching and padding, routing statistics.

Offline, CPU, a tiny random OLMoE (2 layers, 64 experts, top-8, hidden 64) with the real OLMoE
tokenizer; every reference is computed here, unbatched and by hand.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from bh_routing import data
from bh_routing import evaluation as ev

TINY_ASSET = Path(__file__).resolve().parents[1] / "bh_routing" / "assets" / "tiny-olmoe"
# The real OLMoE tokenizer, where the project's shared data sits beside the checkout: only the test
# parametrised on it reads it (and skips, saying so, without it); every other test uses the bundled one.
OLMOE_TOKENIZER = Path(os.environ.get("BH_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") \
    / "tokenizer" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
TOL = 1e-5   # float32, batched vs unbatched

try:
    import lm_eval  # noqa: F401
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval)")


def load_tokenizer(name: str = "bundled"):
    """"bundled": the tiny model's tokenizer, shipped in the package (every test, every checkout);
    "olmoe": the real OLMoE-1B-7B tokenizer from the shared data (eos <|endoftext|> = lm-eval's
    prefix token, pad <|padding|>), skipped where that file is absent."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name == "bundled":
        return AutoTokenizer.from_pretrained(str(TINY_ASSET))
    if not OLMOE_TOKENIZER.is_file():
        pytest.skip(f"the OLMoE tokenizer {OLMOE_TOKENIZER} is absent (set BH_SHARED_DATA to the shared data folder)")
    return PreTrainedTokenizerFast(tokenizer_file=str(OLMOE_TOKENIZER), eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")


def random_olmoe(tokenizer):
    """Random OLMoE with the shape the brief asks for (2 layers, 64 experts, top-8), context 128 tokens."""
    from transformers import AutoModelForCausalLM, OlmoeConfig
    config = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=128, norm_topk_prob=False, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random OLMoE and the bundled tokenizer, the same in every checkout."""
    tokenizer = load_tokenizer("bundled")
    return random_olmoe(tokenizer), tokenizer


TOY_DOCS = [  # WikiText-style raw pages: the detokenizer and the word/byte counts all have work to do
    {"page": " = Toy Page = \n\n The cat sat on the mat @-@ happily , and then it slept . \n"
             " It was 3 @,@ 000 cats ( or so ) . \n"},
    {"page": " = Second = \n\n Dogs bark ; birds sing . The end \n"},
]


def full_sequence_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) for i >= 1, one forward, full log-softmax (the reference)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1).numpy()


def hand_rolling_logprob(model, tokens: list[int], prefix: int, max_length: int, stride: int) -> float:
    """lm-eval's rolling loglikelihood, written independently: the sequence is [prefix] + tokens;
    chunks of predicted tokens are [0, L), then `stride` at a time; each chunk is predicted by one
    forward over the (at most L) inputs that end where the chunk ends."""
    seq, total, start = [prefix] + tokens, 0.0, 0
    while start < len(tokens):
        end = min(len(tokens), max_length if start == 0 else start + stride)
        window = seq[max(0, end - max_length):end + 1]     # inputs seq[.. end) and the target seq[end]
        total += full_sequence_logprobs(model, window)[-(end - start):].sum()
        start = end
    return total


# ------------------------------------------------------------------------------------------------
# definitions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_length,stride", [(128, None), (16, None), (16, 5), (7, 2)])
def test_wikitext_perplexity_equals_a_hand_computation(tiny, max_length, stride):
    model, tokenizer = tiny
    result = ev.evaluate(model, tokenizer, "wikitext", docs=TOY_DOCS, max_length=max_length, stride=stride)
    prefix = tokenizer.eos_token_id
    lls, n_tokens = [], []
    for doc in TOY_DOCS:
        tokens = tokenizer(data.wikitext_detokenize(doc["page"]))["input_ids"]
        lls.append(hand_rolling_logprob(model, tokens, prefix, max_length, stride or max_length))
        n_tokens.append(len(tokens))
    words = [len(re.split(r"\s+", d["page"])) for d in TOY_DOCS]     # on the original page, as lm-eval
    n_bytes = [len(d["page"].encode("utf-8")) for d in TOY_DOCS]
    expected = {"token_perplexity": math.exp(-sum(lls) / sum(n_tokens)),
                "word_perplexity": math.exp(-sum(lls) / sum(words)),
                "byte_perplexity": math.exp(-sum(lls) / sum(n_bytes)),
                "bits_per_byte": -sum(lls) / sum(n_bytes) / math.log(2)}
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert result.items["logprob"].to_numpy() == pytest.approx(lls, rel=1e-5)
    # every token of every article is scored exactly once, in order
    assert len(result.token_logprobs) == sum(n_tokens)
    expected_ids = np.concatenate([tokenizer(data.wikitext_detokenize(d["page"]))["input_ids"] for d in TOY_DOCS])
    assert np.array_equal(result.token_ids, expected_ids)
    assert result.config["max_length"] == max_length and result.config["stride"] == (stride or max_length)


def test_rolling_windows_tile_the_tokens_and_respect_max_length():
    tokens = list(range(100, 137))
    for max_length in (1, 2, 5, 37, 40):
        for stride in sorted({s for s in (1, 2, max_length // 2, max_length) if 1 <= s <= max_length}):
            windows = ev.rolling_windows(tokens, 0, max_length, stride)
            assert sum((cont for _, cont in windows), []) == tokens
            for ctx, cont in windows:
                assert len(ctx) + len(cont) - 1 <= max_length     # inputs the model reads
                assert len(ctx) >= 1
    with pytest.raises(ValueError):
        ev.rolling_windows(tokens, 0, 8, 9)


def lm_eval_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What lm-eval's HFLM feeds the model for one (context, continuation) request: the whole encoding,
    cut on the left to max_length + 1 tokens (the model reads all but the last)."""
    return (context + continuation)[-(max_length + 1):]


@pytest.mark.parametrize("tokenizer_name", ["bundled", "olmoe"])
def test_hellaswag_and_lambada_by_hand(tokenizer_name):
    """acc / acc_norm / LAMBADA acc and perplexity recomputed from unbatched full-logit passes, at the
    model's context (128) and at a context short enough that every tokenizer must truncate: a hand
    computation that forgets lm-eval's left truncation (or an evaluator that truncates wrongly) fails."""
    tokenizer = load_tokenizer(tokenizer_name)
    model = random_olmoe(tokenizer)
    docs = data.load_hellaswag(source="bundled", n=6).records
    result = ev.evaluate(model, tokenizer, "hellaswag", docs=docs)
    accs, norms = [], []
    for doc in docs:
        query, choices, gold = ev.hellaswag_query_choices(doc)
        context = tokenizer(query)["input_ids"]
        lls = []
        for choice in choices:
            whole = tokenizer(query + " " + choice)["input_ids"]
            assert len(whole) <= 129, "HellaSwag items fit the model's context: no truncation here"
            lls.append(full_sequence_logprobs(model, whole)[len(context) - 1:].sum())
        accs.append(np.argmax(lls) == gold)
        norms.append(np.argmax(np.array(lls) / [len(c) for c in choices]) == gold)
    assert result.metrics["acc"] == pytest.approx(np.mean(accs))
    assert result.metrics["acc_norm"] == pytest.approx(np.mean(norms))

    docs = data.load_lambada(source="bundled", n=6).records
    for max_length in (128, 24):
        result = ev.evaluate(model, tokenizer, "lambada", docs=docs, max_length=max_length)
        lls, hits, truncated = [], [], 0
        for doc in docs:
            context_text, target = data.lambada_context_target(doc)
            context, whole = tokenizer(context_text)["input_ids"], tokenizer(context_text + target)["input_ids"]
            continuation = whole[len(context):]
            tokens = lm_eval_input(context, continuation, max_length)
            truncated += len(tokens) < len(whole)
            scored = full_sequence_logprobs(model, tokens)[-len(continuation):]   # predicts the continuation
            with torch.no_grad():
                greedy = model(torch.tensor([tokens])).logits[0, -len(continuation) - 1:-1].argmax(-1)
            lls.append(float(scored.sum()))
            hits.append(bool((greedy == torch.tensor(continuation)).all()))      # the whole word, every token
        assert result.config["truncated_requests"] == truncated
        if max_length == 24:
            assert truncated == len(docs)      # the short context truncates every passage, whatever the tokenizer
        assert result.metrics["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
        assert result.metrics["acc"] == pytest.approx(np.mean(hits))
        np.testing.assert_allclose(result.items["logprob"], lls, rtol=1e-5)
    assert result.items["target"].tolist() == [" " + d["text"].split(" ")[-1] for d in docs]


def test_encode_pairs_moves_trailing_space_and_splits_the_whole_encoding(tiny):
    _, tokenizer = tiny
    (ctx, cont), = ev.encode_pairs(tokenizer, [("The capital of France is ", "Paris")])
    assert ctx == tokenizer("The capital of France is")["input_ids"]
    assert ctx + cont == tokenizer("The capital of France is Paris")["input_ids"]
    (ctx, cont), = ev.encode_pairs(tokenizer, [("", "Paris")])                # empty context: prefix token
    assert ctx == [tokenizer.eos_token_id] and cont == tokenizer("Paris")["input_ids"]


# ------------------------------------------------------------------------------------------------
# batching and padding never change a score
# ------------------------------------------------------------------------------------------------

def _requests(task, tokenizer, n, max_length=128, stride=None):
    docs = ev.load_docs(task, n=n, source="bundled")[0]
    return ev.TASKS[task].build_requests(docs, tokenizer, max_length, stride)


@pytest.mark.parametrize("task,n,max_length", [("hellaswag", 8, 128), ("lambada", 12, 128), ("wikitext", 1, 48)])
def test_batched_per_token_logprobs_equal_unbatched(tiny, task, n, max_length):
    model, tokenizer = tiny
    requests = _requests(task, tokenizer, n, max_length)
    if task == "wikitext":
        requests = requests[:12]
    naive = ev.score_naive(model, requests)
    batched = ev.score_requests(model, requests, max_batch_tokens=400, pad_token_id=tokenizer.pad_token_id,
                                share_prefix=True)
    assert batched.stats["shared_prefix_groups"] == (n if task == "hellaswag" else 0)
    assert batched.stats["n_batches"] < len(requests) and batched.stats["padding_fraction"] >= 0
    np.testing.assert_allclose(batched.logprobs, naive.logprobs, rtol=0, atol=TOL)
    assert np.array_equal(batched.greedy, naive.greedy)


def test_padding_side_batch_composition_and_prefix_sharing_do_not_change_scores(tiny):
    model, tokenizer = tiny
    requests = _requests("hellaswag", tokenizer, 6) + _requests("lambada", tokenizer, 6)
    reference = ev.score_requests(model, requests, batch_size=1, share_prefix=False)
    assert reference.stats["padding_fraction"] == 0
    unshared = {"share_prefix": False}
    for kwargs in ({"padding_side": "right", "batch_size": 5, **unshared}, {"padding_side": "left", "batch_size": 5, **unshared},
                   {"padding_side": "left", "max_batch_tokens": 10_000, **unshared}, {"batch_size": 3, **unshared},
                   {"batch_size": 5}, {"batch_size": 1}, {"max_batch_tokens": 150}):
        scores = ev.score_requests(model, requests, pad_token_id=tokenizer.pad_token_id, **kwargs)
        assert scores.stats["padding_fraction"] > 0 or kwargs.get("batch_size") == 1, kwargs
        assert scores.stats["shared_prefix_groups"] == (0 if kwargs.get("share_prefix") is False else 6)   # default: shared
        np.testing.assert_allclose(scores.logprobs, reference.logprobs, rtol=0, atol=TOL, err_msg=str(kwargs))
        assert np.array_equal(scores.greedy, reference.greedy)
    # a request scored among other requests, or with a different pad token, scores the same
    shuffled = ev.score_requests(model, requests[::-1], batch_size=4, pad_token_id=7)
    np.testing.assert_allclose(np.concatenate([shuffled.logprobs[shuffled.offsets[i]:shuffled.offsets[i + 1]]
                                               for i in range(len(requests))[::-1]]),
                               reference.logprobs, rtol=0, atol=TOL)


def test_logits_at_scored_positions_equal_the_full_model_logits(tiny, monkeypatch):
    model, tokenizer = tiny
    requests = _requests("lambada", tokenizer, 5)
    split = ev.score_requests(model, requests, batch_size=5)
    monkeypatch.setattr(ev.engine, "_split_head", lambda model: None)
    full = ev.score_requests(model, requests, batch_size=5)
    assert full.stats["logits"].startswith("full") and split.stats["logits"].startswith("scored")
    np.testing.assert_allclose(split.logprobs, full.logprobs, rtol=0, atol=TOL)


def test_greedy_is_lm_eval_argmax_on_ties_and_nan():
    """greedy = (argmax of the log-softmax == target), argmax being the first maximal index (NaN
    counting as the maximum), whichever kernel computes it; 600 rows span several CPU chunks."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 2, (600, 64), generator=generator).float()   # many tied maxima
    logits[::7, 3] = float("nan")
    logits[::11, [5, 9]] = float("inf")
    targets = torch.randint(0, 64, (600,), generator=generator)
    targets[::2] = logits.nan_to_num(nan=torch.inf).argmax(-1)[::2]          # half the rows: the first maximum
    last_maximum = torch.where(logits == logits.amax(-1, keepdim=True), torch.arange(64), -1).amax(-1)
    targets[1::4] = last_maximum.clamp(min=0)[1::4]                         # a later tied maximum: not greedy
    logprobs, greedy = ev.engine._token_logprobs(logits, None, targets)
    reference = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(greedy, reference.argmax(-1) == targets, rtol=0, atol=0)
    torch.testing.assert_close(logprobs, reference.gather(1, targets[:, None]).squeeze(1), rtol=0, atol=0,
                               equal_nan=True)
    assert 0 < int(greedy.sum()) < 600


def test_out_of_memory_halves_the_batch_and_goes_on(tiny, monkeypatch):
    model, tokenizer = tiny
    requests = _requests("hellaswag", tokenizer, 4)
    reference = ev.score_requests(model, requests, batch_size=1)
    def small_memory(real):   # room for 4 sequences: one HellaSwag item, the smallest shared unit
        def run(model, split, batch, *args):
            if sum(len(unit) if isinstance(unit, list) else 1 for unit in batch) > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, split, batch, *args)
        return run
    monkeypatch.setattr(ev.engine, "_score_batch", small_memory(ev.engine._score_batch))
    monkeypatch.setattr(ev.engine, "_score_shared_batch", small_memory(ev.engine._score_shared_batch))
    for kwargs in ({"batch_size": 16}, {"max_batch_tokens": 100_000}):
        for share_prefix in (False, True):
            scores = ev.score_requests(model, requests, share_prefix=share_prefix, **kwargs)
            assert scores.stats["oom_retries"] >= 1
            np.testing.assert_allclose(scores.logprobs, reference.logprobs, rtol=0, atol=TOL)

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(ev.engine, "_score_batch", no_memory)
    with pytest.raises(RuntimeError, match="smaller max_length"):
        ev.score_requests(model, requests, share_prefix=False)


# ------------------------------------------------------------------------------------------------
# routing statistics: same tokens, padding excluded
# ------------------------------------------------------------------------------------------------

def test_routing_statistics_exclude_padding(tiny):
    from bh_routing.patching import RoutingPatch
    model, tokenizer = tiny
    docs = data.load_hellaswag(source="bundled", n=5).records
    with RoutingPatch(model, {"strategy": "topk", "k": 8}, mode="analyze", verbose=False) as patch:
        native = ev.evaluate(model, tokenizer, "hellaswag", docs=docs, recorder=patch, batch_size=20)
    scoring = native.config["scoring"]
    assert scoring["padding_fraction"] > 0.1                     # there was padding to exclude ...
    assert native.routing["all_positions"]["tokens"] == scoring["computed_tokens"] < scoring["padded_tokens"]
    assert native.routing["mean_experts"] == 8.0 and native.routing["all_positions"]["mean_experts"] == 8.0
    assert native.token_experts.shape == (len(native.token_logprobs), 2) and (native.token_experts == 8).all()
    assert native.config["routing_config"]["routers"] == {"all": {"strategy": "topk", "k": 8}}

    # variable k: padded batches (one sequence per ending, or endings packed with their shared
    # context) give exactly the counts of unpadded one-by-one passes
    config = {"strategy": "bh", "alpha": 0.2, "pvalues": "zscore", "max_k": 8}
    with RoutingPatch(model, config, verbose=False) as patch:
        single = ev.evaluate(model, tokenizer, "hellaswag", docs=docs, recorder=patch.recorder, batch_size=1,
                             share_prefix=False)
        padded = ev.evaluate(model, tokenizer, "hellaswag", docs=docs, recorder=patch, batch_size=20,
                             padding_side="left", share_prefix=False)
        shared = ev.evaluate(model, tokenizer, "hellaswag", docs=docs, recorder=patch, batch_size=20,
                             share_prefix=True)
    assert single.config["scoring"]["padding_fraction"] == 0
    assert padded.config["scoring"]["padding_fraction"] > 0 and shared.config["scoring"]["padding_fraction"] > 0
    for other in (padded, shared):
        assert np.array_equal(other.token_experts, single.token_experts)
        assert other.routing["mean_experts_per_layer"] == pytest.approx(single.routing["mean_experts_per_layer"])
        np.testing.assert_allclose(other.token_logprobs, single.token_logprobs, rtol=0, atol=TOL)
    # every non-padding position, counted once: the same tokens and the same experts per layer
    padded_all, single_all = padded.routing["all_positions"], single.routing["all_positions"]
    assert padded_all["tokens"] == single_all["tokens"]
    np.testing.assert_allclose(padded_all["mean_experts_per_layer"], single_all["mean_experts_per_layer"], rtol=1e-12)
    assert padded_all["mean_experts"] == pytest.approx(single_all["mean_experts"], rel=1e-12)
    # sharing computes each context once: fewer positions, counted once
    assert shared.routing["all_positions"]["tokens"] == shared.config["scoring"]["computed_tokens"] \
        < single.routing["all_positions"]["tokens"]
    assert 1 <= padded.routing["mean_experts"] < 8
    assert "experts_per_token" in padded.items


# ------------------------------------------------------------------------------------------------
# results: provenance, pairing, persistence
# ------------------------------------------------------------------------------------------------

def test_result_is_traceable_paired_and_round_trips(tiny, tmp_path):
    model, tokenizer = tiny
    a = ev.evaluate(model, tokenizer, "lambada", n=4, source="bundled", model_id="tiny-random")
    config = a.config
    assert config["model_id"] == "tiny-random" and config["n_items"] == 4 and config["max_length"] == 128
    assert config["data"]["source"] == "bundled" and config["data"]["sha256"]
    assert config["scoring"]["batch_size"] == "auto" and config["lm_eval_task"] == "lambada_openai"
    assert list(a.items["item"]) == [0, 1, 2, 3]
    assert len(a.token_logprobs) == a.requests["n_tokens"].sum() == len(a.token_item)
    pairs = a.paired(a)
    assert (pairs["delta"] == 0).all() and len(pairs) == len(a.token_logprobs)
    a.save(tmp_path / "lambada")
    b = ev.EvalResult.load(tmp_path / "lambada")
    assert b.metrics == a.metrics and np.array_equal(b.token_logprobs, a.token_logprobs)
    assert b.config["max_length"] == 128
    other = ev.evaluate(model, tokenizer, "lambada", n=3, source="bundled")
    with pytest.raises(ValueError, match="same tokens"):
        a.paired(other)


# ------------------------------------------------------------------------------------------------
# lm-eval's own functions (when lm-eval is installed)
# ------------------------------------------------------------------------------------------------

@needs_lm_eval
def test_hellaswag_preprocessing_matches_lm_eval():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs
    docs = data.load_hellaswag(source="bundled").records
    processed = process_docs(datasets.Dataset.from_list(docs))
    for doc, theirs in zip(docs, processed):
        query, choices, gold = ev.hellaswag_query_choices(doc)
        assert (query, choices, gold) == (theirs["query"], theirs["choices"], theirs["gold"])


@needs_lm_eval
def test_lambada_and_wikitext_preprocessing_match_lm_eval():
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer
    from lm_eval.utils import apply_template
    for doc in data.load_lambada(source="bundled", n=500).records:
        assert data.lambada_context_target(doc) == (apply_template("{{text.split(' ')[:-1]|join(' ')}}", doc),
                                                    apply_template("{{' '+text.split(' ')[-1]}}", doc))
    docs = data.load_wikitext_documents(source="bundled").records
    items = ev.tasks._wikitext_results(docs, __import__("pandas").DataFrame(
        {"item": range(len(docs)), "logprob": -1.0, "n_tokens": 1}))[0]
    for doc, (_, row) in zip(docs, items.iterrows()):
        assert data.wikitext_detokenize(doc["page"]) == wikitext_detokenizer(doc)
        theirs = process_results(doc, [-1.0])
        assert (row["n_words"], row["n_bytes"]) == (theirs["word_perplexity"][1], theirs["byte_perplexity"][1])


@needs_lm_eval
def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = rng.integers(2, 1000, size=int(rng.integers(1, 300))).tolist()
        max_length = int(rng.integers(1, 64))
        stride = int(rng.integers(1, max_length + 1))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(
            tokens, prefix_token=0, max_seq_len=max_length, context_len=max_length - stride + 1)]
        assert ev.rolling_windows(tokens, 0, max_length, stride) == [(list(a), list(b)) for a, b in theirs]


@needs_lm_eval
def test_metric_definitions_match_lm_eval():
    from lm_eval.api import metrics as M
    rng = np.random.default_rng(1)
    lls, units = (-rng.random(50) * 30).tolist(), rng.integers(1, 40, 50).tolist()
    assert ev.perplexity(lls) == pytest.approx(M.perplexity(lls), rel=1e-12)
    assert ev.weighted_perplexity(lls, units) == pytest.approx(M.weighted_perplexity(list(zip(lls, units))), rel=1e-12)
    assert ev.bits_per_byte(lls, units) == pytest.approx(M.bits_per_byte(list(zip(lls, units))), rel=1e-12)
    acc = rng.integers(0, 2, 50).astype(float).tolist()
    assert ev.mean_stderr(acc) == pytest.approx(M.mean_stderr(acc), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# the domains task and the softmax dtype
# ------------------------------------------------------------------------------------------------

def test_domains_task_is_per_domain_token_perplexity_by_hand(tiny):
    model, tokenizer = tiny
    docs = data.load_domains(n=8).records
    assert sorted({d["domain"] for d in docs}) == ["biomedical", "code", "encyclopedia", "math"]
    result = ev.evaluate(model, tokenizer, "domains", docs=docs, max_length=32)
    by_domain: dict[str, list[tuple[float, int]]] = {}
    for doc in docs:
        tokens = tokenizer(doc["text"])["input_ids"]
        by_domain.setdefault(doc["domain"], []).append(
            (hand_rolling_logprob(model, tokens, tokenizer.eos_token_id, 32, 32), len(tokens)))
    for domain, pairs in by_domain.items():
        expected = math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))
        assert result.metrics[f"token_perplexity_{domain}"] == pytest.approx(expected, rel=1e-5), domain
    assert list(result.items["domain"]) == [d["domain"] for d in docs]
    assert ev.TASKS["domains"].headline.name == "token_perplexity"


def test_domains_sample_is_held_out_from_training():
    """The training script holds documents out before it samples the bundled validation file from them."""
    script = (Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_olmoe.py").read_text()
    assert "write_validation_sample(" in script and "val_docs" in script
    assert len(data.load_domains()) == 128


def test_softmax_dtype_none_is_lm_eval_parity_in_bfloat16(tiny):
    model, tokenizer = tiny
    half = random_olmoe(tokenizer).to(torch.bfloat16)
    exact = ev.evaluate(half, tokenizer, "domains", docs=data.load_domains(n=4).records, max_length=32)
    parity = ev.evaluate(half, tokenizer, "domains", docs=data.load_domains(n=4).records, max_length=32,
                         softmax_dtype=None)
    # reference: lm-eval's F.log_softmax(logits, dim=-1, dtype=None) on bfloat16 logits
    request = ev.TASKS["domains"].build_requests(data.load_domains(n=1).records, tokenizer, 32, None)[0]
    with torch.no_grad():
        logits = half(torch.tensor([request.tokens[:-1]])).logits[0, -request.n_scored:]
    target = torch.tensor(request.tokens[-request.n_scored:])[:, None]
    in_bf16 = torch.log_softmax(logits, dim=-1).gather(1, target).squeeze(1).float().numpy()
    in_fp32 = torch.log_softmax(logits.float(), dim=-1).gather(1, target).squeeze(1).numpy()
    first = slice(0, request.n_scored)
    assert parity.token_logprobs[first] == pytest.approx(in_bf16, abs=1e-6)
    assert exact.token_logprobs[first] == pytest.approx(in_fp32, abs=1e-5)
    assert not np.allclose(in_bf16, in_fp32, atol=1e-4)          # the two really differ in bf16
    assert exact.config["softmax_dtype"] == "float32" and parity.config["softmax_dtype"] == "model dtype"
    with pytest.raises(ValueError, match="softmax_dtype"):
        ev.evaluate(half, tokenizer, "domains", docs=data.load_domains(n=1).records, softmax_dtype="int8")
