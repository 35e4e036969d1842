"""Load a model (bundled tiny OLMoE, a local directory, or a hub id) and plan its memory.

`load_model(...)` returns `(model, tokenizer)`: the model in eval mode on the chosen device, the
tokenizer with a pad token. Before loading it works out from the config what will fit on the device
(`memory_plan`, pure arithmetic) and says so; a model that cannot fit is refused with advice.

Dtype policy ("auto"): float32 on CPU; on CUDA bfloat16 from Ampere on (compute capability >= 8.0),
float16 below (a T4 has no fast bfloat16).

Offline: a hub id that is neither cached nor reachable fails at once with `ModelUnavailableError`,
whose message lists the offline alternatives; nothing waits on the network for more than a few seconds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import hub_endpoint, hub_offline_by_env, hub_reachable
from .parameters import COUNTED_FAMILIES, Shape, count_parameters  # noqa: F401 (public here)

TINY = "tiny"
TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-olmoe"
OLMOE_1B_7B = "allenai/OLMoE-1B-7B-0924"
_BUILTIN_OLMOE = "builtin:olmoe-1b-7b"      # plan_for() falls back to the built-in config offline



def is_bundled(model_id: str | None) -> bool:
    """True for the bundled tiny model, named 'tiny' or by its folder."""
    return model_id is not None and (model_id == TINY or Path(str(model_id)).resolve() == TINY_MODEL_DIR)


def describe_model(model_id: str | None) -> str:
    """How reports, notebooks and figures name a model: the bundled tiny model as what it is (its
    parameter count read from its metrics.json), any other model by its id."""
    if not is_bundled(model_id):
        return str(model_id)
    import json
    n_params = json.loads((TINY_MODEL_DIR / "metrics.json").read_text())["architecture"]["n_params"]
    return (f"bundled tiny OLMoE ({n_params / 1e6:.1f} M-parameter pipeline model trained on four small domains; "
            "demonstrates the method, not evidence about OLMoE)")


GIB = 1024 ** 3
MIB = 1024 ** 2


class ModelUnavailableError(RuntimeError):
    """The model cannot be found locally and cannot be downloaded (offline, or no such path)."""


class ModelTooLargeError(RuntimeError):
    """The model's weights leave no room to run (not even one 128-token sequence) on the device."""


# --------------------------------------------------------------------------------------------------
# Configs, parameter counts
# --------------------------------------------------------------------------------------------------

def olmoe_1b_7b_config():
    """The published config of allenai/OLMoE-1B-7B-0924, built offline (for planning, and for
    random-weight models of the real shape: `AutoModelForCausalLM.from_config(olmoe_1b_7b_config())`)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False,
        pad_token_id=1, eos_token_id=50279, rms_norm_eps=1e-5,
    )


# --------------------------------------------------------------------------------------------------
# Dtype and device
# --------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False): use device 'cpu' or 'auto'")
        if device.index is None:   # pin an index: device_map wants one
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def default_dtype(device: str | torch.device, compute_capability: tuple[int, int] | None = None) -> torch.dtype:
    """float32 on CPU; bfloat16 on CUDA with compute capability >= 8.0 (Ampere+); float16 below (T4).
    `compute_capability` is read from the device when not given."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if compute_capability is None:
        compute_capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(compute_capability) >= (8, 0) else torch.float16


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto', a torch.dtype or one of {sorted(_DTYPE_NAMES)}; got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def free_under_cap(free: int, total: int, fraction: float, reserved: int) -> int:
    """Bytes this process may still allocate on a GPU: the device's free memory (`mem_get_info`),
    but no more than the per-process cap (`torch.cuda.set_per_process_memory_fraction`: the caching
    allocator refuses to reserve beyond fraction x total) less what it has reserved already."""
    return max(0, min(int(free), int(fraction * total) - int(reserved)))


def cuda_free_memory(device: str | torch.device | None = None) -> tuple[int, int]:
    """(free bytes honouring the per-process memory cap, total bytes) of a CUDA device."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)   # torch >= 2.5
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    return free_under_cap(free, total, fraction, torch.cuda.memory_reserved(device)), int(total)


def available_memory(device: str | torch.device) -> int:
    """Bytes free for a model now: free GPU memory (within the process's memory cap, if one is
    set), or available host RAM for CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_free_memory(device)[0]
    try:  # Linux: MemAvailable counts reclaimable caches, unlike "free"
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------------
# Memory plan (pure arithmetic)
# --------------------------------------------------------------------------------------------------

def _count(n: int) -> str:
    """6919161856 -> '6.92 B', 2590208 -> '2.59 M'."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


@dataclass(frozen=True)
class MemoryPlan:
    """What fits: weights, then how many tokens (batch x length) of KV cache and activations.

    Estimates, deliberately on the safe side: activations are the transient tensors of one layer
    (layers run one after another) plus the logits, which dominate for large vocabularies.
    """
    n_params: int
    n_active_params: int
    dtype: torch.dtype
    memory_bytes: int           # what the device has free
    reserve_bytes: int          # kept back for the CUDA context, allocator fragmentation, Python
    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    logits_bytes_per_token: int  # 0 when logits="last" (then counted per sequence)
    logits_bytes_per_sequence: int
    max_positions: int | None

    @property
    def token_budget_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes - self.weight_bytes

    @property
    def fits(self) -> bool:
        """The weights fit, with room for at least one sequence of 128 tokens."""
        return self.max_batch(128) >= 1

    @property
    def bytes_per_token(self) -> int:
        return self.kv_bytes_per_token + self.activation_bytes_per_token + self.logits_bytes_per_token

    def max_batch(self, length: int) -> int:
        """Largest batch of sequences of `length` tokens that fits (0 if none)."""
        per_sequence = length * self.bytes_per_token + self.logits_bytes_per_sequence
        return max(0, self.token_budget_bytes // per_sequence)

    def fits_batch(self, batch: int, length: int) -> bool:
        return batch <= self.max_batch(length)

    def suggestions(self, lengths=(256, 512, 1024, 2048, 4096)) -> list[tuple[int, int]]:
        """(batch, length) pairs that fit, for lengths the model supports."""
        usable = [n for n in lengths if self.max_positions is None or n <= self.max_positions]
        return [(self.max_batch(n), n) for n in usable if self.max_batch(n) >= 1]

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        lines = [
            f"{_count(self.n_params)} parameters ({_count(self.n_active_params)} active per token); "
            f"{dtype} weights {self.weight_bytes / GIB:.2f} GiB; free {self.memory_bytes / GIB:.2f} GiB, "
            f"reserve {self.reserve_bytes / GIB:.2f} GiB.",
            f"Per token: KV cache {self.kv_bytes_per_token / 1024:.0f} KiB, activations "
            f"{self.activation_bytes_per_token / 1024:.0f} KiB, logits "
            + (f"{self.logits_bytes_per_token / 1024:.0f} KiB (all positions)." if self.logits_bytes_per_token
               else f"{self.logits_bytes_per_sequence / 1024:.0f} KiB per sequence (last position only)."),
        ]
        if self.token_budget_bytes <= 0:
            short = (self.weight_bytes + self.reserve_bytes - self.memory_bytes) / GIB
            lines.append(f"Does NOT fit: the weights alone need {short:.2f} GiB more than is free.")
        elif not self.fits:
            lines.append("Does NOT fit: the weights fit, but there is no room left for activations.")
        else:
            shown = ", ".join(f"{b}x{n}" for b, n in self.suggestions())
            lines.append(f"Fits ~{self.token_budget_bytes // self.bytes_per_token:,} tokens at once "
                         f"(batch x length): {shown}.")
            if self.logits_bytes_per_token > self.kv_bytes_per_token + self.activation_bytes_per_token:
                without = self.token_budget_bytes // (self.kv_bytes_per_token + self.activation_bytes_per_token)
                lines.append(f"Logits dominate: computing them in chunks (or for the last position only) "
                             f"raises this to ~{without:,} tokens.")
        return "\n".join(lines)


def memory_plan(config, memory_bytes: int, dtype: torch.dtype | str = torch.float16, *,
                logits: str = "all", reserve_bytes: int | None = None) -> MemoryPlan:
    """Plan memory for `config` on a device with `memory_bytes` free, weights in `dtype`.

    logits: "all" when every position's logits are kept (perplexity, multiple choice), "last" when
    only the last position's are (generation; or evaluation that computes logits in chunks).
    reserve_bytes: default 512 MiB + 3 % of memory (CUDA context, fragmentation, Python objects).
    """
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES[dtype]
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    s = Shape.of(config)
    size = torch.empty((), dtype=dtype).element_size()
    n_params = count_parameters(config)

    kv = 2 * s.layers * s.kv_heads * s.head_dim * size
    # One layer's transient tensors per token: residual, norm, attention and MLP outputs (4 x hidden),
    # q/k/v, and for each routed expert a copy of the token plus gate/up/act (H + 3I); router logits
    # and probabilities in float32.
    activations = (size * (4 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim
                           + s.top_k * (s.hidden + 3 * s.intermediate))
                   + 4 * 2 * s.experts)
    # Logits in the model dtype, a float32 copy and its log-softmax.
    logits_each = s.vocab * (size + 4 + 4)
    if reserve_bytes is None:
        reserve_bytes = 512 * MIB + int(0.03 * memory_bytes)
    return MemoryPlan(
        n_params=n_params, n_active_params=count_parameters(config, active=True), dtype=dtype,
        memory_bytes=int(memory_bytes), reserve_bytes=int(reserve_bytes), weight_bytes=n_params * size,
        kv_bytes_per_token=kv, activation_bytes_per_token=activations,
        logits_bytes_per_token=logits_each if logits == "all" else 0,
        logits_bytes_per_sequence=logits_each if logits == "last" else 0,
        max_positions=s.max_positions,
    )


def _advice(plan: MemoryPlan, device: torch.device, name: str) -> str:
    needed = (plan.weight_bytes + plan.reserve_bytes) / GIB
    if device.type == "cpu":
        todo = (f"use a GPU runtime or a machine with more than {needed:.1f} GiB free for {name!r} "
                f"(OLMoE-1B-7B in float16 fits a 15 GB T4), or load_model('tiny') for the bundled demo model")
    elif plan.dtype == torch.float32:
        todo = "load in half precision (dtype='auto' picks float16 or bfloat16 on a GPU)"
    else:
        todo = ("free GPU memory (e.g. restart the runtime), use a GPU with more memory, "
                "or load_model('tiny') for the bundled demo model")
    return f"What to do: {todo}. To try {name!r} anyway, pass check_memory=False."


# --------------------------------------------------------------------------------------------------
# Weights identity
# --------------------------------------------------------------------------------------------------

def _strided_sample(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` entries spread evenly over the flattened tensor, float32 on CPU."""
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, steps=min(count, flat.numel()), device=flat.device).long()
    return flat[index].float().cpu()


def weights_fingerprint(model) -> str:
    """A cheap, deterministic digest of the weights as loaded (names, shapes, dtypes, 64 strided
    entries and the float64 sum of every parameter): any change that moves a tensor's sum or one
    of its sampled entries changes it. One reduction per tensor, on the weights' device (9 ms for
    the tiny model on CPU)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        total = torch.sum(tensor.detach(), dtype=torch.float64).item()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
        digest.update(_strided_sample(tensor, 64).numpy().tobytes())
    return digest.hexdigest()[:24]


def weights_sample(model, per_tensor: int = 2) -> dict[str, Any]:
    """A dtype-tolerant identity for calibration files: a digest of the parameter names and shapes,
    and ``per_tensor`` strided entries of every parameter (4 significant digits)."""
    import hashlib

    parameters = list(model.named_parameters())
    structure = "|".join(f"{name}{tuple(t.shape)}" for name, t in parameters)
    values = torch.cat([_strided_sample(t, per_tensor) for _, t in parameters]) if parameters else torch.zeros(0)
    return {"structure": hashlib.sha256(structure.encode()).hexdigest()[:24],
            "values": [float(f"{v:.4g}") for v in values.tolist()]}


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``weights_sample`` results come from the same weights (up to fp16/bf16 rounding)."""
    import numpy as np

    if a.get("structure") != b.get("structure") or len(a.get("values", ())) != len(b.get("values", ())):
        return False
    return bool(np.allclose(a["values"], b["values"], rtol=2e-2, atol=1e-4))


# --------------------------------------------------------------------------------------------------
# Resolving and loading
# --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_cache_dir() -> str:
    """The HF hub cache as the environment says now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(hf_home, "hub")


def _offline_alternatives(name: str) -> str:
    return (
        "Offline alternatives:\n"
        "  - load_model('tiny'): the tiny trained OLMoE bundled with bh_routing (CPU, seconds);\n"
        f"  - load_model('/path/to/dir'): a local copy; make one where the hub is reachable with\n"
        f"      huggingface-cli download {name} --local-dir DIR   and copy DIR here;\n"
        "  - point HF_HOME (or HF_HUB_CACHE) at a Hugging Face cache that already holds the model;\n"
        "  - for speed/memory at real scale without weights: AutoModelForCausalLM.from_config("
        "bh_routing.models.olmoe_1b_7b_config())."
    )


def _resolve(name_or_path: str) -> tuple[str, str, bool]:
    """-> (kind, location, local_files_only); kind is 'bundled', 'local' or 'hub'."""
    if name_or_path == TINY:
        if not (TINY_MODEL_DIR / "config.json").is_file():
            raise ModelUnavailableError(
                f"The bundled tiny model is missing at {TINY_MODEL_DIR}. Reinstall bh_routing with its "
                f"package data, or pass a local model directory or a hub id.")
        return "bundled", str(TINY_MODEL_DIR), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return "local", str(path), True
    if not _HUB_ID.match(name_or_path):
        raise ModelUnavailableError(
            f"{name_or_path!r} is neither 'tiny', an existing directory, nor a hub id like "
            f"'{OLMOE_1B_7B}'.")
    cached = _is_cached(name_or_path)
    if hub_reachable():
        return "hub", name_or_path, False
    if cached:
        return "hub", name_or_path, True
    why = ("offline mode is set (HF_HUB_OFFLINE)" if hub_offline_by_env()
           else f"the Hugging Face hub ({hub_endpoint()}) is unreachable")
    raise ModelUnavailableError(
        f"Cannot load {name_or_path!r}: {why} and it is not in the local cache ({_hub_cache_dir()}).\n"
        + _offline_alternatives(name_or_path))


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache_dir())
    return isinstance(found, str)


def _dtype_argument(dtype: torch.dtype) -> dict[str, Any]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; the package supports 4.46+.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_config(location: str, **hub_kwargs):
    from transformers import AutoConfig

    if location == _BUILTIN_OLMOE:
        return olmoe_1b_7b_config()
    return AutoConfig.from_pretrained(location, **hub_kwargs)


def _hub_kwargs(location: str, local_only: bool, revision: str | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if not Path(location).is_dir():
        kwargs["cache_dir"] = _hub_cache_dir()
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def plan_for(name_or_path: str = TINY, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             *, logits: str = "all") -> MemoryPlan:
    """The memory plan `load_model` would make, from the config only (no weights are loaded).
    Works offline for "allenai/OLMoE-1B-7B-0924", whose published config is built in."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        _, location, local_only = _resolve(name_or_path)
    except ModelUnavailableError:
        if name_or_path != OLMOE_1B_7B:
            raise
        location, local_only = _BUILTIN_OLMOE, True
    config = _load_config(location, **_hub_kwargs(location, local_only))
    return memory_plan(config, available_memory(device), dtype, logits=logits)


def load_model(name_or_path: str = TINY, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", *, check_memory: bool = True, verbose: bool = True,
               revision: str | None = None):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)`.

    name_or_path: "tiny" (the OLMoE bundled in bh_routing/assets/tiny-olmoe), a local directory, or a
        hub id such as "allenai/OLMoE-1B-7B-0924".
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (float32 on CPU, bfloat16 on Ampere+, float16 on older GPUs such as the T4), a
        torch.dtype, or a name ("fp16", "bf16", "fp32", ...).
    check_memory: refuse (ModelTooLargeError, with advice) when the weights leave no room to run.
    verbose: print the memory plan (what batch x length fits) before loading.

    Raises ModelUnavailableError, quickly, when the model is neither local nor downloadable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kind, location, local_only = _resolve(name_or_path)
    hub_kwargs = _hub_kwargs(location, local_only, revision)

    try:
        config = _load_config(location, **hub_kwargs)
        plan = memory_plan(config, available_memory(device), dtype)
        if verbose:
            print(f"[bh_routing] {name_or_path} on {device}:\n{plan.summary()}")
        if check_memory and not plan.fits:
            raise ModelTooLargeError(f"{name_or_path} does not fit on {device}.\n{plan.summary()}\n"
                                     + _advice(plan, device, name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs)
        # On a GPU, load straight onto it: staging 13 GB of weights in Colab's 12 GB of RAM fails.
        placement = {"device_map": {"": device.index}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(location, **_dtype_argument(dtype), **placement,
                                                     **hub_kwargs)
    except OSError as error:
        if kind != "hub" or not local_only:
            raise
        # Cached config but missing weights/tokenizer, offline: say so instead of a bare OSError.
        raise ModelUnavailableError(
            f"{name_or_path!r} is only partly in the local cache ({error}).\n"
            + _offline_alternatives(name_or_path)) from error

    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token   # batching needs one; OLMo's tokenizer has its own
    return model, tokenizer
