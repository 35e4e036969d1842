"""bh_routing.models: loading (offline), dtype policy, parameter counts and the memory planner."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, PreTrainedTokenizerFast

from bh_routing import data, models
from bh_routing.models import (GIB, OLMOE_1B_7B, ModelTooLargeError, ModelUnavailableError,
                               count_parameters, default_dtype, load_model, memory_plan,
                               olmoe_1b_7b_config, plan_for)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test runs offline with an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    data._PROBE_CACHE.clear()


def small_olmoe_config(**overrides) -> OlmoeConfig:
    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    sizes.update(overrides)
    return OlmoeConfig(**sizes)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer, so these tests need no shared files."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>"] + "the capital of france is paris a cat sat on mat".split()
    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def random_olmoe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("random-olmoe")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small_olmoe_config()).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


# --- parameter counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 2},                       # grouped-query attention
    {"attention_bias": True, "tie_word_embeddings": True},
    {"num_experts": 4, "num_experts_per_tok": 4, "num_hidden_layers": 3},
])
def test_count_parameters_matches_an_instantiated_model(overrides):
    config = small_olmoe_config(**overrides)
    model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_olmoe_1b_7b_sizes_match_the_published_ones():
    config = olmoe_1b_7b_config()
    assert count_parameters(config) == pytest.approx(6.9e9, rel=0.01)
    assert count_parameters(config, active=True) == pytest.approx(1.3e9, rel=0.02)   # "1B active"
    plan = memory_plan(config, 16 * GIB, torch.float16)
    assert plan.weight_bytes / GIB == pytest.approx(12.9, abs=0.05)


def test_olmoe_1b_7b_count_is_exact_at_full_size():
    # The meta device builds the real 7B module tree without allocating its weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(olmoe_1b_7b_config())
    assert count_parameters(olmoe_1b_7b_config()) == sum(p.numel() for p in model.parameters())


# --- memory plan ----------------------------------------------------------------------------------

T4_BYTES = 15_828_320_256          # what torch reports as a T4's total memory (14.74 GiB)


def test_memory_plan_olmoe_on_a_t4_fits_in_fp16_with_a_small_token_budget():
    plan = memory_plan(olmoe_1b_7b_config(), T4_BYTES, torch.float16)
    assert plan.fits
    # KV cache: k and v, 16 layers, 16 heads x 128 dims, 2 bytes.
    assert plan.kv_bytes_per_token == 2 * 16 * 16 * 128 * 2
    assert plan.fits_batch(1, 512) and not plan.fits_batch(1, 4096)
    assert plan.suggestions() and all(plan.fits_batch(b, n) for b, n in plan.suggestions())
    assert "Fits" in plan.summary()


def test_memory_plan_arithmetic_is_consistent():
    plan = memory_plan(olmoe_1b_7b_config(), 40 * GIB, "bf16")
    for length in (256, 1024, 4096):
        batch = plan.max_batch(length)
        assert batch * length * plan.bytes_per_token <= plan.token_budget_bytes
        assert (batch + 1) * length * plan.bytes_per_token > plan.token_budget_bytes
    assert plan.max_batch(512) >= 2 * plan.max_batch(1024)
    last_only = memory_plan(olmoe_1b_7b_config(), 40 * GIB, "bf16", logits="last")
    assert last_only.max_batch(1024) > plan.max_batch(1024)     # logits dominate at vocab 50304


def test_memory_plan_refuses_fp32_olmoe_in_colab_host_ram():
    plan = memory_plan(olmoe_1b_7b_config(), 12 * GIB, torch.float32)
    assert not plan.fits and plan.max_batch(128) == 0
    assert "Does NOT fit" in plan.summary()


def test_free_gpu_memory_honours_the_per_process_cap():
    """A T4-sized cap on an 80 GB GPU: mem_get_info says ~80 GB free, the allocator will give 15 GB
    less what this process reserved already; without a cap (fraction 1) the device's free memory."""
    total, t4 = 80 * GIB, 15 * GIB
    fraction = t4 / total
    assert models.free_under_cap(79 * GIB, total, fraction, 0) == t4
    assert models.free_under_cap(79 * GIB, total, fraction, 4 * GIB) == 11 * GIB
    assert models.free_under_cap(79 * GIB, total, fraction, 16 * GIB) == 0            # over the cap: nothing, not < 0
    assert models.free_under_cap(6 * GIB, total, fraction, 4 * GIB) == 6 * GIB       # other processes: the device's free
    assert models.free_under_cap(50 * GIB, total, 1.0, 30 * GIB) == 50 * GIB         # no cap


def test_available_cuda_memory_reads_the_cap(monkeypatch):
    """The CUDA readings feed `free_under_cap` (no GPU here: torch.cuda's three readings are injected)."""
    total = 80 * GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, total))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 15 * GIB / total)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    assert models.available_memory("cuda:0") == 12 * GIB
    assert models.cuda_free_memory("cuda:0") == (12 * GIB, total)


def test_dtype_policy():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda", compute_capability=(7, 5)) == torch.float16    # T4
    assert default_dtype("cuda", compute_capability=(8, 0)) == torch.bfloat16   # A100
    assert default_dtype("cuda", compute_capability=(9, 0)) == torch.bfloat16   # H100


def test_plan_for_the_headline_model_works_offline():
    plan = plan_for(OLMOE_1B_7B, device="cpu", dtype="fp16")
    assert plan.n_params == count_parameters(olmoe_1b_7b_config())


# --- loading --------------------------------------------------------------------------------------

def test_load_local_model_on_cpu_in_eval_mode_and_generate(random_olmoe_dir, capsys):
    model, tokenizer = load_model(str(random_olmoe_dir), device="auto")
    if torch.cuda.is_available():
        pytest.skip("this check is about the CPU default")
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token is not None
    assert "parameters" in capsys.readouterr().out          # the plan was reported
    inputs = tokenizer("the capital of france is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_load_with_explicit_dtype(random_olmoe_dir):
    model, _ = load_model(str(random_olmoe_dir), device="cpu", dtype="bf16", verbose=False)
    assert model.dtype == torch.bfloat16


def test_model_too_large_is_refused_with_advice(random_olmoe_dir, monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda device: 1024)
    with pytest.raises(ModelTooLargeError, match="What to do"):
        load_model(str(random_olmoe_dir), device="cpu", verbose=False)


def test_offline_hub_id_fails_fast_and_names_alternatives():
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as error:
        load_model(OLMOE_1B_7B, device="cpu", verbose=False)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message
    for alternative in ("load_model('tiny')", "local copy", "HF_HOME", "olmoe_1b_7b_config"):
        assert alternative in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")    # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_model("someone/some-model", device="cpu", verbose=False)
    assert time.monotonic() - start < 5


def fake_hub_cache(cache: Path, repo_id: str, source: Path, files=None) -> None:
    """Lay out `source`'s files as huggingface_hub caches a downloaded repo."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        if files is None or file.name in files:
            shutil.copy(file, snapshot / file.name)


def test_cached_hub_model_loads_offline(random_olmoe_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache, "someone/cached-olmoe", random_olmoe_dir)
    model, _ = load_model("someone/cached-olmoe", device="cpu", verbose=False)
    assert model.config.model_type == "olmoe" and not model.training


def test_partly_cached_hub_model_is_a_clear_error(random_olmoe_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache, "someone/partial", random_olmoe_dir, files={"config.json"})
    with pytest.raises(ModelUnavailableError, match="partly in the local cache"):
        load_model("someone/partial", device="cpu", verbose=False)


def test_missing_path_is_a_clear_error():
    with pytest.raises(ModelUnavailableError, match="neither 'tiny', an existing directory"):
        load_model("./no/such/model/dir", device="cpu")


# --- the bundled tiny model (committed separately) -------------------------------------------------

def test_tiny_resolves_to_the_bundled_directory(random_olmoe_dir, monkeypatch):
    monkeypatch.setattr(models, "TINY_MODEL_DIR", random_olmoe_dir)      # a stand-in artefact
    model, _ = load_model("tiny", device="cpu", verbose=False)
    assert model.config.num_experts == 8
    monkeypatch.setattr(models, "TINY_MODEL_DIR", random_olmoe_dir / "absent")
    with pytest.raises(ModelUnavailableError, match="bundled tiny model is missing"):
        load_model("tiny", device="cpu")


def test_tiny_model_loads_offline_and_generates():
    if not (models.TINY_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"bundled tiny model not present yet at {models.TINY_MODEL_DIR}")
    model, tokenizer = load_model("tiny", device="cpu", verbose=False)
    assert model.config.model_type == "olmoe"
    assert model.config.num_experts == 64 and model.config.num_experts_per_tok == 8
    assert not model.training
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(out[0]), str)
