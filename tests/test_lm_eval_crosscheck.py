"""bh_routing.evaluation agrees with lm-evaluation-harness itself.

The same model, the same documents (bundled copies, via the task YAMLs in bh_routing/lm_eval_tasks),
the same max_length: HellaSwag acc/acc_norm, LAMBADA acc/perplexity and WikiText word/byte
perplexity and bits per byte must equal `lm_eval.simple_evaluate`'s to 1e-4 relative, and so must
every per-item log-likelihood. lm-eval runs at batch size 1 in float32 on the CPU.

Model: the bundled tiny trained OLMoE (it ships with the package, so every checkout runs the same). Documents: BH_CROSSCHECK_N (default 20) HellaSwag and LAMBADA items and
BH_CROSSCHECK_DOCS (default 6, ~23k tokens) WikiText articles.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval (test extra)")

from bh_routing import evaluation as ev  # noqa: E402
from bh_routing.lm_eval_tasks import TASK_DIR, TASK_NAMES  # noqa: E402

N_ITEMS = int(os.environ.get("BH_CROSSCHECK_N", 20))
N_DOCS = int(os.environ.get("BH_CROSSCHECK_DOCS", 6))
REL = 1e-4


def _model_and_tokenizer():
    """The bundled tiny trained OLMoE: the same model in every checkout (it ships with the package)."""
    from bh_routing.models import load_model
    model, tokenizer = load_model("tiny", device="cpu", dtype="float32", verbose=False)
    return model, tokenizer, "tiny (bundled, trained)"


@pytest.fixture(scope="module")
def setup():
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model, tokenizer, name = _model_and_tokenizer()
    max_length = ev.resolve_max_length(model, tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=max_length, device="cpu")
    harness = {}
    for task, n in (("hellaswag", N_ITEMS), ("lambada", N_ITEMS), ("wikitext", N_DOCS)):
        manager = TaskManager(include_path=TASK_DIR, include_defaults=False,
                              metadata={"bh_n": n, "bh_source": "bundled"})
        output = lm_eval.simple_evaluate(model=lm, tasks=[TASK_NAMES[task]], task_manager=manager,
                                         num_fewshot=0, log_samples=True)
        harness[task] = (output["results"][TASK_NAMES[task]],
                         sorted(output["samples"][TASK_NAMES[task]], key=lambda s: s["doc_id"]))
    ours = {task: ev.evaluate(model, tokenizer, task, n=n, source="bundled", max_length=max_length, model_id=name)
            for task, n in (("hellaswag", N_ITEMS), ("lambada", N_ITEMS), ("wikitext", N_DOCS))}
    # the default packs HellaSwag's endings with their shared context; one sequence per ending gives
    # the same numbers
    ours["hellaswag_unshared"] = ev.evaluate(model, tokenizer, "hellaswag", n=N_ITEMS, source="bundled",
                                             max_length=max_length, share_prefix=False)
    return {"model": model, "tokenizer": tokenizer, "lm": lm, "harness": harness, "ours": ours,
            "max_length": max_length}


def _report(task, ours, theirs, names):
    deltas = {name: abs(ours.metrics[name] - theirs[f"{name},none"]) / max(abs(theirs[f"{name},none"]), 1e-12)
              for name in names}
    print(f"\n{task}: " + ", ".join(f"{n} ours={ours.metrics[n]:.6g} lm-eval={theirs[f'{n},none']:.6g} "
                                    f"rel.delta={d:.1e}" for n, d in deltas.items()))
    return deltas


@pytest.mark.parametrize("variant", ["hellaswag", "hellaswag_unshared"])
def test_hellaswag_matches_lm_eval(setup, variant):
    theirs, samples = setup["harness"]["hellaswag"]
    ours = setup["ours"][variant]
    assert ours.config["scoring"]["shared_prefix_groups"] == (0 if variant.endswith("unshared") else N_ITEMS)
    deltas = _report(variant, ours, theirs, ("acc", "acc_norm"))
    assert max(deltas.values()) <= REL
    for sample, (_, item) in zip(samples, ours.items.iterrows()):
        query, choices, _ = ev.hellaswag_query_choices(sample["doc"])
        assert [tuple(a) for a in sample["arguments"]] == [(query, " " + c) for c in choices]   # same requests
        harness_lls = [r[0][0] for r in sample["resps"]]
        np.testing.assert_allclose(item["logprobs"], harness_lls, rtol=REL)


def test_lambada_matches_lm_eval(setup):
    theirs, samples = setup["harness"]["lambada"]
    ours = setup["ours"]["lambada"]
    deltas = _report("lambada", ours, theirs, ("acc", "perplexity"))
    assert max(deltas.values()) <= REL
    harness = np.array([s["resps"][0][0][0] for s in samples])
    np.testing.assert_allclose(ours.items["logprob"], harness, rtol=REL)
    assert list(ours.items["acc"]) == [float(s["resps"][0][0][1]) for s in samples]


def test_wikitext_matches_lm_eval(setup):
    theirs, samples = setup["harness"]["wikitext"]
    ours = setup["ours"]["wikitext"]
    deltas = _report("wikitext", ours, theirs, ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    assert max(deltas.values()) <= REL
    np.testing.assert_allclose(ours.items["logprob"], [s["resps"][0][0] for s in samples], rtol=REL)
    assert ours.config["max_length"] == setup["max_length"]


def test_tokenisation_matches_hflm(setup):
    """Our (context, continuation) tokens are HFLM's `_encode_pair`, and our windows its rolling ones."""
    lm, tokenizer = setup["lm"], setup["tokenizer"]
    docs = ev.load_docs("hellaswag", n=N_ITEMS, source="bundled")[0]
    pairs = [(q, " " + c) for q, cs, _ in map(ev.hellaswag_query_choices, docs) for c in cs]
    pairs += [ev.data_module.lambada_context_target(d) for d in ev.load_docs("lambada", n=N_ITEMS, source="bundled")[0]]
    assert ev.encode_pairs(tokenizer, pairs) == [tuple(map(list, lm._encode_pair(c, x))) for c, x in pairs]
    assert ev.prefix_token_id(tokenizer) == lm.prefix_token_id


def test_lm_eval_backend_on_a_patched_model(setup):
    """evaluate(..., backend="lm-eval") runs the harness on the model as it is, here under BH routing,
    and agrees with the native evaluator on the same patched model."""
    from bh_routing.patching import RoutingPatch
    model, tokenizer = setup["model"], setup["tokenizer"]
    with RoutingPatch(model, {"strategy": "bh", "alpha": 0.1, "pvalues": "zscore", "max_k": 8},
                      verbose=False) as patch:
        harness = ev.evaluate(model, tokenizer, "lambada", n=5, source="bundled", backend="lm-eval", batch_size=1)
        native = ev.evaluate(model, tokenizer, "lambada", n=5, source="bundled", recorder=patch)
    unpatched = ev.evaluate(model, tokenizer, "lambada", n=5, source="bundled")
    assert native.routing["mean_experts"] < 8 and not np.allclose(native.token_logprobs, unpatched.token_logprobs)
    assert harness.config["backend"] == "lm-eval" and harness.config["lm_eval_version"]
    assert harness.metrics["perplexity"] == pytest.approx(native.metrics["perplexity"], rel=REL)
    assert harness.metrics["acc"] == pytest.approx(native.metrics["acc"], rel=REL)
    np.testing.assert_allclose(harness.items["logprob"], native.items["logprob"], rtol=REL)
