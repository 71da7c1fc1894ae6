"""Key/value caches that outlive one `generate` call (issue 13): a chat keeps its conversation's cache between
turns, and many questions about one image share the cache of its soft prompt.

Both rest on one fact of decoder-only LLMs: the keys and values of a position depend only on the positions
before it, so a cache computed for a prefix serves every sequence that starts with that prefix. transformers'
`generate(inputs_embeds=full, attention_mask=full, cache=filled)` then prefills only the embeddings the cache
does not hold (`GenerationMixin._prefill` slices `inputs_embeds[:, past:]`), and its position ids still come
from the FULL mask's cumulative sum, so padding in the middle (between a shared prefix and a left-padded
question) shifts nothing. Equality with the one-pass prefill holds up to float rounding, as for `generate`
itself, whose decode steps already read keys computed in an earlier pass (tests compare tokens).

Only plain full-attention caches qualify: a sliding-window layer cannot be cropped back, and an LLM whose
forward takes no `position_ids` would number a padded column as a real token.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.configuration_utils import GenerationMode

# Modes whose cache transformers treats as one row per sequence (beams: batch * num_beams rows, reordered in
# place each step); the others (assisted, contrastive, DoLa, group/constrained beams) keep the plain path.
_MODES = {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache of the kind `generate` builds itself for this model."""
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def can_keep(model: PreTrainedModel) -> bool:
    """True when this LLM's cache may be kept, cropped and shared (see the module docstring)."""
    if model.config.is_encoder_decoder or "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    return all(type(layer) is DynamicLayer for layer in new_cache(model).layers)


def rows_per_sequence(model: PreTrainedModel, generation: dict[str, Any]) -> int | None:
    """How many cache rows `generate` runs per input sequence with these settings (num_beams, or
    num_return_sequences when sampling several), as its `_expand_inputs_for_generation` does; None when
    the settings ask for a mode or a cache of its own (`cache_implementation`) that a passed cache would not fit."""
    config = copy.deepcopy(model.generation_config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generate itself warns about the settings, once
            config.update(**{k: v for k, v in generation.items() if hasattr(config, k)})
            mode = config.get_generation_mode()
    except ValueError:  # a bad setting: the plain path raises generate's own error
        return None
    if mode not in _MODES or config.cache_implementation is not None or config.use_cache is False:
        return None
    return max(config.num_beams or 1, config.num_return_sequences or 1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a (B, L) mask, exactly as `generate` makes them: each row counts its real tokens;
    padding gets 0 (it is masked)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    cache: DynamicCache,
    embeds: torch.Tensor,
    mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Run embeds (B, T, H) through the LLM, appending their keys/values to `cache` (B rows, P positions).
    `mask` (B, P+T) covers the cached and the new positions; None: no padding. No logits are kept."""
    if position_ids is None:
        past = cache.get_seq_length()
        position_ids = torch.arange(past, past + embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
    kw: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # the LM head over a 50k vocabulary would cost more than the layers here
    model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, **kw)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def crop(cache: Cache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    extra = int(cache.get_seq_length()) - length  # a StaticCache's length is a tensor; cropping it moves that back
    if extra > 0:
        cache.crop(-extra)
