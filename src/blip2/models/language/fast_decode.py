"""Faster decoding that never changes a token: repeated work removed around transformers' `generate`.

Beam search stays transformers' (DESIGN §4). What this module changes is how much work generate's first
forward (the prefill) does: generate repeats every input row `num_beams` times *before* the prefill, so the
prompt, its soft prompt included, is run through the LLM once per beam, although the copies are equal. The
profile (benchmarks/results/profile_cpu.md) puts that prefill at 15-50% of a 5-beam call on CPU.

`prefill_once_per_row` intercepts that first forward: it runs the LLM on one copy of each row, then repeats
the key/value cache and the logits `num_beams` times, which is what the full forward would have produced: the
rows of a batch are computed independently (every matmul, attention and norm works row by row), so on CPU with
one thread each row's numbers are the same bit for bit whatever the batch around it (`bit_exact` says where
that holds; elsewhere the prefill keeps its full batch). The tests compare the logits and cache bit for bit and
the tokens with the plain path on tiny random OPT, Llama and Flan-T5 models, greedy, beam and sampled, batched
and left-padded.

The opt-in compiled decode (`enable_compiled_decode`) is the other saving: greedy and sampled decode steps on a
static key/value cache with a torch.compile'd forward, whether `generate` starts from nothing, from the shared
soft-prompt prefix (`generate_shared`) or from a chat's kept cache (`static_cache` copies a filled dynamic cache
into a static one whose length is bucketed, so nearby lengths reuse the compiled graph).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import CompileConfig, PreTrainedModel
from transformers.cache_utils import Cache, StaticCache

from blip2.models.language import kv_cache

# Model outputs other than the logits and the cache that a caller may ask generate for; with any of them the
# prefill runs unchanged (we would have to repeat them too).
_EXTRA_OUTPUTS = ("output_attentions", "output_hidden_states")


def _rows_repeat(t: torch.Tensor, repeats: int) -> bool:
    """True when `t`'s rows come in groups of `repeats` equal rows (what `repeat_interleave` makes)."""
    if t.shape[0] % repeats:
        return False
    groups = t.reshape(t.shape[0] // repeats, repeats, *t.shape[1:])
    return bool((groups == groups[:, :1]).all())


def _batched(kwargs: dict[str, Any], rows: int) -> dict[str, torch.Tensor]:
    """The keyword tensors that carry one entry per row (inputs, mask, positions); 1-D `cache_position`
    and broadcast (batch 1) tensors are shared by every row and stay as they are."""
    return {
        k: v for k, v in kwargs.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == rows
    }


def repeated_rows(model: PreTrainedModel, generation: dict[str, Any]) -> int:
    """How many copies of each row `generate` will make with these settings (num_beams for beam search,
    num_return_sequences when sampling several): `kv_cache.rows_per_sequence`'s count, 1 for the modes it leaves
    to the plain path. A wrong count costs nothing but the saving: `prefill_once_per_row` checks that the rows
    really are copies."""
    return kv_cache.rows_per_sequence(model, generation) or 1


COMPILED_DECODE = "_blip2_compiled_decode"  # the opt-in flag's attribute on the LLM
# Static caches are sized in steps of this many positions: calls whose prompts differ by a few tokens (another
# question, the next chat turn) get the same cache shape, so they reuse the compiled decode step instead of
# compiling another one (tests count the compiled graphs).
CACHE_BUCKET = 64
# One config object for every call: transformers recompiles the forward when the config differs from the last.
# Inductor by default; the fast tests swap in dynamo's "eager" backend (same tracing, guards and recompiles,
# without inductor's minute of code generation per shape), a slow test runs inductor itself.
COMPILE_CONFIG = CompileConfig(fullgraph=False)
COMPILE_CONFIG._compile_all_devices = True  # transformers' own switch for compiling on CPU


def enable_compiled_decode(model: PreTrainedModel) -> None:
    """Opt in (`blip2.load(..., compile_decode=True)`): greedy and sampled `generate` calls run their decode steps
    on a static key/value cache (`static_cache`, its length rounded up to `CACHE_BUCKET`) with a torch.compile'd
    forward (transformers' `CompileConfig`, which it uses only on accelerators unless forced). The prefill stays
    eager. Calls that bring a filled cache compile too: the shared soft-prompt prefix (`generate_shared`, copied
    into a static cache) and a chat's kept cache (kept static between turns: cropping it only moves its length).

    Why opt-in: each new batch size or cache bucket compiles first (seconds to a minute), and compiled kernels may
    round differently from eager ones, so identical tokens are tested on tiny models but not guaranteed for every
    model. Measured: 1.20x plain generate on the mid-size model's LLM on CPU (benchmarks/probe_compile_decode.py),
    and the end-to-end rows of benchmarks/results/inference_cpu_compiled.md. Beam search (and several sampled
    sequences per prompt) keeps the plain path with its dynamic cache."""
    if model.config.is_encoder_decoder:
        raise ValueError("compile_decode supports decoder-only LLMs (OPT, Llama, ...), not encoder-decoder ones (Flan-T5)")
    setattr(model, COMPILED_DECODE, True)


def compiles(model: PreTrainedModel, generation: dict[str, Any]) -> bool:
    """Whether this call's decode steps run compiled: opted in, and one cache row per sequence (greedy or
    sampling one sequence); beam search and several returned sequences keep the plain path."""
    return bool(getattr(model, COMPILED_DECODE, False)) and kv_cache.rows_per_sequence(model, generation) == 1


def compiled_decode_settings(model: PreTrainedModel, generation: dict[str, Any]) -> dict[str, Any]:
    """The generate settings that compile the forward for this call (with a static cache passed in), else {}."""
    return {"compile_config": COMPILE_CONFIG} if compiles(model, generation) else {}


def total_length(model: PreTrainedModel, generation: dict[str, Any], prompt: int) -> int:
    """An upper bound on the positions `generate` writes to its cache for a prompt of `prompt` positions."""
    config = copy.deepcopy(model.generation_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate itself warns about the settings, once
        config.update(**{k: v for k, v in generation.items() if hasattr(config, k)})
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    return prompt + new  # max_length counts the prompt too: an over-estimate only costs unused positions


def bucket(length: int) -> int:
    """`length` rounded up to a multiple of CACHE_BUCKET."""
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


def static_cache(model: PreTrainedModel, length: int, source: Cache | None = None) -> StaticCache:
    """A static cache of `bucket(length)` positions holding `source`'s keys/values (a filled DynamicCache, or a
    StaticCache too short for `length`); `source` itself when it is a StaticCache of `length` positions or more.

    The keys/values are copied as they are, so the positions they hold are exactly what the eager prefill
    computed; the rest of the cache is zeros that the attention mask hides. The copy costs one pass over the
    cache, which the compiled decode steps repay."""
    if isinstance(source, StaticCache) and source.get_max_length() >= length:
        return source
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=bucket(length))
    held = int(source.get_seq_length()) if source is not None else 0
    if held:
        for layer, old in zip(cache.layers, source.layers, strict=True):
            keys, values = old.keys[:, :, :held], old.values[:, :, :held]
            layer.lazy_initialization(keys, values)  # on the layer's device and dtype (device-mapped LLMs)
            layer.keys[:, :, :held].copy_(keys)
            layer.values[:, :, :held].copy_(values)
            layer.cumulative_length.fill_(held)
    return cache


def bit_exact(model: PreTrainedModel) -> bool:
    """Whether a row's numbers are the same whatever the batch around it, so computing fewer rows is exact:
    on CPU with one intra-op thread. With several, elementwise kernels split a tensor into one chunk per
    thread, each with its own scalar tail, at places that move with the batch size; on GPUs the matmul kernel
    (split-K or not) depends on the number of rows. There a smaller batch can differ in the last bit, so the
    prefill keeps its full batch."""
    return next(model.parameters()).device.type == "cpu" and torch.get_num_threads() == 1


@contextmanager
def prefill_once_per_row(model: PreTrainedModel, num_beams: int) -> Iterator[None]:
    """Within the block, `model`'s first forward call over `num_beams` equal copies of each row (the beam-search
    prefill of a decoder-only LLM) computes each row once and repeats its cache and logits.

    The first call falls back to the plain forward when its rows are not such copies, when it starts from a
    non-empty cache (a kept chat cache: then the rows may differ), or when attentions or hidden states are asked
    for. Later calls (the decode steps) are never touched.
    """
    if num_beams <= 1 or model.config.is_encoder_decoder or not bit_exact(model):
        yield  # encoder-decoder models: generate runs the encoder before repeating it; the decoder prefill is 1 token
        return
    original = model.forward
    done = False

    @functools.wraps(original)  # generate reads forward's signature (e.g. whether it takes logits_to_keep)
    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        if done or args:
            return original(*args, **kwargs)
        done = True
        caches = [v for v in kwargs.values() if isinstance(v, Cache)]
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        if (
            len(caches) != 1 or caches[0].get_seq_length() != 0 or inputs is None
            or any(kwargs.get(k) for k in _EXTRA_OUTPUTS)
        ):
            return original(**kwargs)
        rows = inputs.shape[0]
        batched = _batched(kwargs, rows)
        if not all(_rows_repeat(t, num_beams) for t in batched.values()):
            return original(**kwargs)
        # One copy of each row, plus a second copy of the last one: elementwise kernels compute a tensor's last
        # few elements (its tail, numel % vector width) in scalar code, which rounds SiLU/GELU differently
        # from their vector code. With the extra row, no row we keep holds a tail, as in the full batch.
        unique = rows // num_beams
        keep = torch.arange(unique + 1, device=inputs.device).clamp(max=unique - 1) * num_beams
        out = original(**{**kwargs, **{k: t[keep.to(t.device)] for k, t in batched.items()}})
        spread = torch.arange(unique).repeat_interleave(num_beams)  # row b -> rows b*beams.., as generate expands
        caches[0].batch_select_indices(spread)  # CPU indices: every layer's device can use them
        out.logits = out.logits[spread.to(out.logits.device)]
        return out

    model.forward = forward  # the instance attribute shadows the class's forward for generate's `self(...)`
    try:
        yield
    finally:
        del model.forward
