"""Tokenisation exactly as lm-eval's HFLM (lm_eval/models/huggingface.py, lm_eval/api/model.py):
the prefix token, context/continuation encoding, rolling windows, and the :class:`Request` they make."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


