"""Continuous batching for decoder-only LLMs (DESIGN §4 "Serving"): requests join the running batch between
decode steps and leave the step they finish, as in vLLM, instead of waiting for a whole `generate` to end.

What it promises. Greedy rows: the tokens of a request equal `lm.generate(inputs_embeds=embeds[None],
**settings)` for that request alone (what `CausalLanguageModel.generate` runs), whatever its batch mates and
whenever it joins: the same generation config (the model's, updated by `settings`), the same logits processors
(built by transformers' own `_get_logits_processor`), the same stopping criteria, the same positions. Equality
holds up to float rounding: a row in a left-padded batch runs matmuls of other shapes than the row alone, and
masked columns add exact zeros, so logits differ in the last bits and an argmax flips only on a near-tie
(tested on tiny random OPT and Llama; the library's left-padded `caption`/`ask` batches rely on the same
fact). Sampling rows with a `seed` draw from their own `torch.Generator`: the tokens equal
`torch.manual_seed(seed); lm.generate(...)` alone (what the engine runs for a seeded job; tested on CPU) and
do not depend on batch mates. Unseeded sampling rows draw from the global RNG, so their draws depend on who
else drew.

What stays on `generate`: encoder-decoder LLMs (T5: the decoder cache also holds cross-attention over each
row's encoder output), beam search and `num_return_sequences > 1`, and models whose cache is not plain full
attention (sliding-window or linear-attention layers: a left-padded column would shift their window).

How. One `DynamicCache` holds every active row, LEFT-padded to the longest row, with an explicit (B, L)
attention mask and explicit position ids (each row counts only its own real tokens, so padding never shifts a
position). Requests that arrive together are prefilled in one pass, left-padded with a mask as generate
prefills a padded batch (a lone request gets generate's own unpadded prefill; requests that share a prefix,
e.g. one image's soft prompt, prefill it once, then their texts left-padded after it); then their cache and the batch's
are left-padded to one length and concatenated along the batch axis. A finished row is dropped at once, and
columns that became padding in every row are trimmed, so the cache is as long as the longest live row. Cost: a
join or leave copies the batch cache once.

Across requests (serve/prefix_cache.py): a request may come with `past`, the cached keys/values of its first
positions; it is prefilled alone from a copy of them, only over what they lack, then joins like any other. A
request may ask (`keep`) for its own cache when it finishes: its row, without the padding columns, one row as
if it had run alone.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode


@dataclass
class _Row:
    """One request: its own processors and stopping criteria, as `generate` would build them for it alone."""

    key: Hashable
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList
    do_sample: bool
    generator: torch.Generator | None  # None: greedy, or sampling from the global RNG
    embeds: torch.Tensor | None  # (T, H) until prefilled
    tokens: list[int] = field(default_factory=list)
    prefix: Hashable | None = None  # rows admitted together with the same key share their first prefix_len
    prefix_len: int = 0
    past: DynamicCache | None = None  # keys/values of the first embeddings (one row), from the prefix cache
    keep: Callable[[DynamicCache, list[int]], None] | None = None  # gets the row's cache when it finishes

class ContinuousDecoder:
    """Drives greedy/sampling decode steps of one decoder-only LM over a batch whose rows come and go.

    `add` queues a request; each `step` runs one decode step for the running rows, then prefills queued
    requests while there is room (`max_batch` rows), and returns one `(key, token, finished)` per row that
    produced a token. A finished row (EOS, which is returned, or its length limit) leaves the batch in that
    step. Not thread-safe: one thread (the model worker) owns it.
    """

    def __init__(self, lm: PreTrainedModel, max_batch: int, eos_token_ids: set[int] | None = None):
        """eos_token_ids: None uses the model's generation config, as `generate` does; a set overrides it
        (`generate(eos_token_id=sorted(ids))` is then the reference)."""
        if lm.config.is_encoder_decoder:
            raise ValueError(
                "ContinuousDecoder serves decoder-only LMs; encoder-decoder LMs (T5) stay on generate"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        layers = DynamicCache(config=lm.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ValueError(
                f"{type(lm).__name__} has sliding-window or other non-plain cache layers, which left padding "
                "would break; use generate"
            )
        self.lm = lm
        self.max_batch = max_batch
        self._eos = sorted(eos_token_ids) if eos_token_ids is not None else None
        params = inspect.signature(lm.forward).parameters
        self._takes_positions = "position_ids" in params
        self._forward_kw: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:  # as generate: only the last position's logits are computed
            self._forward_kw["logits_to_keep"] = 1
        self._width = lm.get_input_embeddings().embedding_dim
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []  # the running batch, in cache order
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)  # (B, L): 1 = real token
        self._positions = torch.zeros(0, dtype=torch.long, device=lm.device)  # (B,): next position id per row
        # (B,): each row's last token, not yet in the cache
        self._last = torch.zeros(0, dtype=torch.long, device=lm.device)

    @property
    def active(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests added but not yet admitted (the batch was full)."""
        return len(self._waiting)

    def add(self, key: Hashable, embeds: torch.Tensor, settings: dict[str, Any],
            prefix: Hashable | None = None, prefix_len: int = 0, past: DynamicCache | None = None,
            keep: Callable[[DynamicCache, list[int]], None] | None = None) -> None:
        """Queue a request. embeds (T, H): its [soft prompt; prompt token embeddings], unpadded. settings:
        what `generate` takes (max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, ...) plus an optional `seed` for sampling. Unsupported settings fail here.
        prefix: a key saying that the first `prefix_len` embeddings equal those of every other request with
        that key (the same image's soft prompt): requests admitted together then prefill that part once.
        past: a cache (one row) of the first P < T embeddings' keys/values (a prefix cache hit, serve/
        prefix_cache.py): the row prefills only embeds[P:]; `prefix` is then ignored. keep: called with the
        row's own cache (one row, unpadded: [embeds; generated tokens but the last]) and the generated tokens
        it holds when the row finishes (EOS or its length limit), so the prefix cache can keep it."""
        if any(row.key == key for row in (*self._rows, *self._waiting)):
            raise ValueError(f"a request with key {key!r} is already decoding")
        if embeds.dim() != 2 or embeds.shape[0] == 0 or embeds.shape[1] != self._width:
            raise ValueError(f"embeds must be (T >= 1, {self._width}), got {tuple(embeds.shape)}")
        if prefix is not None and not 0 < prefix_len < embeds.shape[0]:
            raise ValueError(f"prefix_len must be in [1, {embeds.shape[0] - 1}] (the text needs a position), got {prefix_len}")
        if past is not None:
            if not self._takes_positions:
                raise ValueError(f"{type(self.lm).__name__} takes no position ids: a cached prefix would shift them")
            if not 0 < past.get_seq_length() < embeds.shape[0]:
                raise ValueError(f"past must hold 1 to {embeds.shape[0] - 1} positions, got {past.get_seq_length()}")
            prefix = None
        row = self._plan(key, embeds, settings)
        row.prefix, row.prefix_len = (prefix, prefix_len) if prefix is not None else (None, 0)
        row.past, row.keep = past, keep
        self._waiting.append(row)

    def cancel(self, key: Hashable) -> None:
        """Drop a request, queued or running; an unknown (e.g. already finished) key is ignored."""
        self._waiting = deque(row for row in self._waiting if row.key != key)
        keep = [i for i, row in enumerate(self._rows) if row.key != key]
        if len(keep) < len(self._rows):
            self._select(keep)

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, int, bool]]:
        """One decode step for the running rows, then prefill of queued requests while there is room."""
        out: list[tuple[Hashable, int, bool]] = []
        if self._rows:
            out += self._decode()
        while self._waiting and len(self._rows) < self.max_batch:
            room = self.max_batch - len(self._rows)
            group = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            out += self._admit(group if self._takes_positions else group[:1])
            if not self._takes_positions:
                self._waiting.extendleft(reversed(group[1:]))  # without position ids a padded prefill would shift
        return out

    # -- per-request settings, the way generate builds them ----------------------------------------------

    def _plan(self, key: Hashable, embeds: torch.Tensor, settings: dict[str, Any]) -> _Row:
        # Private transformers helpers, called in generate's order (transformers 5.x
        # `GenerationMixin.generate`), so the model's generation config, min_length/min_new_tokens, warpers
        # and their order are generate's own; tests/serve/test_continuous.py pins the result against generate.
        lm = self.lm
        kwargs = dict(settings)
        seed = kwargs.pop("seed", None)
        if self._eos is not None:
            kwargs["eos_token_id"] = self._eos
        has_default_max_length = kwargs.get("max_length") is None and lm.generation_config.max_length is None
        has_default_min_length = kwargs.get("min_length") is None and lm.generation_config.min_length is None
        config, unused = lm._prepare_generation_config(None, **kwargs)
        if unused:
            raise ValueError(f"unsupported generation settings for continuous batching: {sorted(unused)}")
        mode = config.get_generation_mode()
        one_sequence = config.num_return_sequences in (None, 1)
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) or not one_sequence:
            raise ValueError(
                "continuous batching runs greedy or sampling with one sequence per request (got "
                f"{mode.value}, num_return_sequences={config.num_return_sequences}); use generate"
            )
        lm._prepare_special_tokens(config, True, device=lm.device, batch_size=1)
        inputs = embeds[None]  # (1, T, H): only its shape is read
        # With inputs_embeds and no input_ids, generate's "input ids" are the new tokens only (length 0 at
        # start), so max_length counts new tokens and processors see only generated ids (no prompt penalty).
        config = lm._prepare_generated_length(
            config, has_default_max_length, has_default_min_length, "inputs_embeds", 0, inputs
        )
        lm._validate_generated_length(config, 0, has_default_max_length)  # generate's checks and warnings
        # generate drops an all-ones mask before building processors: no padding for repetition_penalty.
        processors = lm._get_logits_processor(
            config, input_ids_seq_length=0, device=lm.device, model_kwargs={}
        )
        stopping = lm._get_stopping_criteria(config, StoppingCriteriaList())
        do_sample = bool(config.do_sample)
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=lm.device).manual_seed(int(seed))
        return _Row(key, processors, stopping, do_sample, generator, embeds)

    # -- the batch -----------------------------------------------------------------------------------------

    def _admit(self, rows: list[_Row]) -> list[tuple[Hashable, int, bool]]:
        """Prefill requests that arrived together in one forward pass, left-padded with a mask and per-row
        positions exactly as generate prefills a padded batch (one request: generate's unpadded prefill), then
        join their caches to the batch. One pass instead of one per request is what makes short answers cheap:
        for them the prefill is most of the work."""
        out: list[tuple[Hashable, int, bool]] = []
        fresh = [row for row in rows if row.past is None]
        if fresh:
            out += self._admit_group(fresh)
        for row in rows:
            if row.past is not None:
                # A prefix cache hit prefills only what its cache lacks, alone: a copy of its own cache rows
                # and a pass over the new embeddings, positions after the cached ones (no padding anywhere).
                out += self._admit_group([row])
        return out

    def _admit_group(self, rows: list[_Row]) -> list[tuple[Hashable, int, bool]]:
        device = self.lm.device
        embeds = [row.embeds.to(device, self.lm.dtype) for row in rows]  # each (T_i, H)
        for row in rows:
            row.embeds = None
        if rows[0].past is not None:
            cache, mask, logits = self._prefill_past(rows[0], embeds[0])
        elif self._shares_prefixes(rows):
            cache, mask, logits = self._prefill_shared(rows, embeds)
        else:
            cache, mask, logits = self._prefill(embeds)
        chosen = self._choose(rows, logits)
        for i, (row, (_, finished)) in enumerate(zip(rows, chosen)):
            if finished and row.keep is not None:
                row.keep(_row_cache(cache, mask, i), [])  # the first token was never fed
        keep = [i for i, (_, finished) in enumerate(chosen) if not finished]
        if keep:
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=device))
            self._join([rows[i] for i in keep], cache, mask[keep], [chosen[i][0] for i in keep])
        return [(row.key, token, finished) for row, (token, finished) in zip(rows, chosen)]

    def _prefill_past(self, row: _Row, embeds: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One row whose first P positions are in `row.past`: a pass over embeds[P:] only."""
        cache, row.past = row.past, None
        past = cache.get_seq_length()
        positions = torch.arange(past, embeds.shape[0], device=embeds.device)[None]  # (1, T-P)
        out = self.lm(inputs_embeds=embeds[None, past:], cache=cache, position_ids=positions, **self._forward_kw)
        mask = torch.ones(1, embeds.shape[0], dtype=torch.long, device=embeds.device)
        return cache, mask, out.logits[:, -1]

    def _prefill(self, embeds: list[torch.Tensor]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One left-padded pass over whole rows: their cache, mask (n, L) and last logits (n, V)."""
        device = self.lm.device
        length = max(e.shape[0] for e in embeds)
        batch = torch.stack([F.pad(e, (0, 0, length - e.shape[0], 0)) for e in embeds])  # (n, L, H), left-padded
        mask = torch.stack([_left_pad(torch.ones(1, e.shape[0], dtype=torch.long, device=device), length)[0]
                            for e in embeds])  # (n, L)
        cache = DynamicCache(config=self.lm.config)
        kw = dict(self._forward_kw)
        if len(embeds) > 1:
            kw["attention_mask"] = mask
        if self._takes_positions:
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, L): padding never shifts a position
        logits = self.lm(inputs_embeds=batch, cache=cache, **kw).logits[:, -1]  # (n, V)
        return cache, mask, logits

    def _shares_prefixes(self, rows: list[_Row]) -> bool:
        """Whether some rows of this group share a prefix (and the group can be prefilled in two passes)."""
        keys = [row.prefix for row in rows]
        if not self._takes_positions or None in keys or len(set(keys)) == len(keys):
            return False
        return len({row.prefix_len for row in rows}) == 1

    def _prefill_shared(
        self, rows: list[_Row], embeds: list[torch.Tensor]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Each distinct prefix (an image's soft prompt, Q positions) in one pass of U rows, its keys/values
        copied to the rows that share it, then the texts left-padded AFTER the prefix in a second pass: the pads
        sit between prefix and text, masked, and the positions come from the mask, so every row's tokens are
        those of its one-pass prefill (as `generate_shared` in models/language/causal.py)."""
        device = self.lm.device
        queries = rows[0].prefix_len
        keys = list(dict.fromkeys(row.prefix for row in rows))
        firsts = [next(e for row, e in zip(rows, embeds) if row.prefix == key) for key in keys]
        cache = DynamicCache(config=self.lm.config)
        positions = torch.arange(queries, device=device)[None].expand(len(keys), -1)
        prefixes = torch.stack([e[:queries] for e in firsts])  # (U, Q, H)
        self.lm(inputs_embeds=prefixes, cache=cache, position_ids=positions, **self._forward_kw)  # logits unused
        cache.batch_select_indices(torch.tensor([keys.index(row.prefix) for row in rows], device=device))  # (n, Q)
        texts = [e[queries:] for e in embeds]  # each (T_i - Q, H); `add` ensures T_i > Q
        length = max(t.shape[0] for t in texts)
        batch = torch.stack([F.pad(t, (0, 0, length - t.shape[0], 0)) for t in texts])  # (n, L, H), left-padded
        text_mask = torch.stack([_left_pad(torch.ones(1, t.shape[0], dtype=torch.long, device=device), length)[0]
                                 for t in texts])  # (n, L)
        mask = torch.cat([text_mask.new_ones(len(rows), queries), text_mask], dim=1)  # (n, Q+L)
        positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, queries:]  # (n, L): pads never shift a position
        out = self.lm(inputs_embeds=batch, attention_mask=mask, position_ids=positions, cache=cache, **self._forward_kw)
        return cache, mask, out.logits[:, -1]

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, tokens: list[int]) -> None:
        """Append prefilled rows (their cache (n, h, T, d), mask (n, T)) to the running batch."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            total = max(self._mask.shape[1], mask.shape[1])
            # keys/values (B, h, L, d) + (n, h, T, d) -> (B+n, h, max(L, T), d)
            for mine, new in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, total), _left_pad(new.keys, total)])
                mine.values = torch.cat([_left_pad(mine.values, total), _left_pad(new.values, total)])
            self._mask = torch.cat([_left_pad(self._mask, total), _left_pad(mask, total)])  # (B+n, L)
        self._rows += rows
        self._positions = torch.cat([self._positions, mask.sum(1)])  # each row's next position: its real tokens
        self._last = torch.cat([self._last, self._last.new_tensor(tokens)])

    def _decode(self) -> list[tuple[Hashable, int, bool]]:
        batch = len(self._rows)
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)  # (B, L+1)
        kw = dict(self._forward_kw)
        if self._takes_positions:
            kw["position_ids"] = self._positions[:, None]  # (B, 1)
        out = self.lm(input_ids=self._last[:, None], attention_mask=mask, cache=self._cache, **kw)
        logits = out.logits[:, -1]  # (B, V)
        self._mask, self._positions = mask, self._positions + 1
        chosen = self._choose(self._rows, logits)
        out = [(row.key, token, finished) for row, (token, finished) in zip(self._rows, chosen)]
        for i, (row, (_, finished)) in enumerate(zip(self._rows, chosen)):
            if finished and row.keep is not None:
                row.keep(_row_cache(self._cache, self._mask, i), row.tokens[:-1])  # the last was never fed
        self._last = self._last.new_tensor([token for token, _ in chosen])
        keep = [i for i, (_, finished) in enumerate(chosen) if not finished]
        if len(keep) < batch:
            self._select(keep)
        return out

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, bool]]:
        """Next token of each row from its logits (B, V), through the row's own processors (generate's order);
        then its stopping criteria on its own new tokens."""
        logits = logits.float()  # generate scores in float32 whatever the model's dtype
        plain = [i for i, row in enumerate(rows) if not row.do_sample and not row.processors]
        tokens = [0] * len(rows)
        if plain:  # greedy rows without processors: one argmax, one device sync
            for i, token in zip(plain, logits[plain].argmax(-1).tolist()):
                tokens[i] = token
        done = set(plain)
        for i, row in enumerate(rows):
            if i in done:
                continue
            ids = torch.tensor([row.tokens], dtype=torch.long, device=logits.device)  # (1, n): new tokens
            scores = row.processors(ids, logits[i : i + 1])  # (1, V)
            if row.do_sample:
                probs = scores.softmax(-1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
            else:
                tokens[i] = int(scores.argmax(-1))
        out = []
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            ids = torch.tensor([row.tokens], dtype=torch.long, device=logits.device)
            out.append((token, bool(row.stopping(ids, None).any())))
        return out

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; trim leading columns that are padding in every remaining row."""
        if not keep:
            self._rows, self._cache = [], None
            self._mask = self._mask[:0, :0]
            self._positions, self._last = self._positions[:0], self._last[:0]
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        self._cache.batch_select_indices(index)
        start = int(self._mask.any(0).long().argmax())  # first column some row still uses
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _row_cache(cache: DynamicCache, mask: torch.Tensor, i: int) -> DynamicCache:
    """Row i of a batch cache without its padding columns (mask (B, L) over the cache's L positions): a copy,
    one row, as if that row had run alone (its positions never counted the padding)."""
    columns = mask[i].nonzero().squeeze(1)
    out = DynamicCache()  # plain layers, made as `update` fills them (the decoder serves plain caches only)
    for n, layer in enumerate(cache.layers):
        out.update(layer.keys[i : i + 1, :, columns], layer.values[i : i + 1, :, columns], n)
    return out


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the sequence axis on the left to `length`: (B, L) masks or (B, h, L, d) keys/values."""
    missing = length - (x.shape[1] if x.dim() == 2 else x.shape[2])
    if missing == 0:
        return x
    pad = (missing, 0) if x.dim() == 2 else (0, 0, missing, 0)
    return F.pad(x, pad)
