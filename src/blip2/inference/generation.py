"""Generation settings and prompt lengths, checked where the library receives them (Python API, CLI, server).

A bad setting reaching transformers' `generate` fails deep inside it (`num_beams=0` is a ZeroDivisionError)
or not at all (a NaN temperature samples garbage); a prompt past the LLM's context runs for minutes before
answering garbage, or indexes past OPT's learned positions. Both are user mistakes, so both end here in one
`ValueError` that names the setting or the token counts (STYLE "Errors for people").

Standard library only: the server imports these before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

# Why reject rather than pass through unknown keys: a typo ("num_beam") would otherwise be dropped silently
# by transformers, and keys such as num_return_sequences, return_dict_in_generate or streamer change what
# `generate` returns, which breaks the one-text-per-input contract of caption/ask/chat.
SETTINGS: dict[str, str] = {
    "num_beams": "an integer >= 1",
    "max_new_tokens": "an integer >= 1",
    "min_new_tokens": "an integer >= 0",
    "length_penalty": "a finite number",
    "repetition_penalty": "a finite number > 0",
    "temperature": "a finite number > 0",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 0 (0: no top-k filter)",
    "no_repeat_ngram_size": "an integer >= 0 (0: off)",
    "do_sample": "True or False",
    "seed": "an integer in [0, 2**64)",
}
SEED_LIMIT = 2**64  # torch.manual_seed takes unsigned 64-bit seeds
DEFAULT_T5_CONTEXT = 512  # T5 / Flan-T5 were trained on 512-token inputs


def _fail(name: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {SETTINGS[name]}, got {value!r}")


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    # bool is an Integral in Python, but `num_beams=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _fail(name, value)
    if value < low or (high is not None and value >= high):
        raise _fail(name, value)
    return int(value)


def _real(name: str, value: Any, above: float | None = None, at_most: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(name, value)
    value = float(value)
    if not math.isfinite(value):
        raise _fail(name, value)
    if (above is not None and value <= above) or (at_most is not None and value > at_most):
        raise _fail(name, value)
    return value


def check_generation(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of `settings` with plain Python types (numpy scalars become int/float).

    Raises one `ValueError` naming the first bad setting and its allowed range, e.g.
    "num_beams must be an integer >= 1, got 0". Unknown keys are rejected (see SETTINGS for the known ones);
    `None` values are not allowed here: callers drop unset settings before merging with defaults.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown generation setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name in ("num_beams", "max_new_tokens"):
            out[name] = _integer(name, value, 1)
        elif name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            out[name] = _integer(name, value, 0)
        elif name == "seed":
            out[name] = _integer(name, value, 0, SEED_LIMIT)
        elif name == "length_penalty":
            out[name] = _real(name, value)
        elif name in ("repetition_penalty", "temperature"):
            out[name] = _real(name, value, above=0.0)
        elif name == "top_p":
            out[name] = _real(name, value, above=0.0, at_most=1.0)
        elif name == "do_sample":
            if not isinstance(value, bool):
                raise _fail(name, value)
            out[name] = value
    low, high = out.get("min_new_tokens"), out.get("max_new_tokens")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min_new_tokens must be <= max_new_tokens ({high}), got {low}")
    return out


def check_max_prompt_tokens(value: Any) -> int | None:
    """The per-call prompt cap: None (the LLM's context is the only limit) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"max_prompt_tokens must be an integer >= 1 or None, got {value!r}")
    return int(value)


def llm_context(llm_config: Any, is_encoder_decoder: bool) -> int:
    """The most positions the LLM takes: its input for a decoder-only LLM (soft prompt + prompt + new
    tokens), its encoder input for an encoder-decoder one (soft prompt + prompt).

    Decoder-only: `max_position_embeddings` (OPT, Llama, ...) or `n_positions` (GPT-2), 2048 when neither
    is set. T5 has relative position buckets, so nothing breaks past any length, but Flan-T5 was trained on
    512-token inputs (its `n_positions` and tokenizer `model_max_length`): we take `n_positions`, else 512.
    The T5 decoder's answer has its own positions, so `max_new_tokens` does not count against this limit.
    """
    if is_encoder_decoder:
        return int(getattr(llm_config, "n_positions", None) or DEFAULT_T5_CONTEXT)
    limit = getattr(llm_config, "max_position_embeddings", None) or getattr(llm_config, "n_positions", None)
    return int(limit or 2048)


def prompt_budget(image_tokens: int, max_new_tokens: int, context: int, is_encoder_decoder: bool = False,
                  max_prompt_tokens: int | None = None) -> int:
    """The most prompt tokens that fit: what the context leaves after the soft prompt (and, decoder-only,
    the new tokens), lowered to `max_prompt_tokens` when that is given. May be <= 0 (nothing fits)."""
    room = context - image_tokens - (0 if is_encoder_decoder else max_new_tokens)
    return room if max_prompt_tokens is None else min(room, max_prompt_tokens)


def check_prompt_length(
    prompt_tokens: int,
    image_tokens: int,
    max_new_tokens: int,
    context: int,
    is_encoder_decoder: bool = False,
    max_prompt_tokens: int | None = None,
    what: str = "prompt",
) -> None:
    """Raise a `ValueError` naming the counts when a prompt of `prompt_tokens` tokens (as tokenized for the
    LLM, special tokens included) is over `max_prompt_tokens` or does not fit the LLM's `context` together
    with the `image_tokens`-token soft prompt (the Q-Former's queries) and `max_new_tokens`. `what` names
    the prompt in the message ("prompt", "prompt 3 of 8", "the question alone")."""
    if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
        raise ValueError(
            f"{what} is {prompt_tokens} tokens, more than max_prompt_tokens={max_prompt_tokens}: shorten it"
        )
    if prompt_tokens <= prompt_budget(image_tokens, max_new_tokens, context, is_encoder_decoder):
        return
    if is_encoder_decoder:
        total = prompt_tokens + image_tokens
        raise ValueError(
            f"{what} is {prompt_tokens} tokens; with the {image_tokens}-token image prompt that is "
            f"{total} tokens, longer than the model's context of {context} tokens (the LLM encoder's input): "
            "shorten it"
        )
    total = prompt_tokens + image_tokens + max_new_tokens
    raise ValueError(
        f"{what} is {prompt_tokens} tokens; with the {image_tokens}-token image prompt and "
        f"max_new_tokens={max_new_tokens} that is {total} tokens, longer than the model's context of "
        f"{context} tokens: shorten it or lower max_new_tokens"
    )
