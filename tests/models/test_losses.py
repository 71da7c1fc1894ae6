"""Loss and mask semantics of stage 1 and stage 2 (REFERENCE §2, §3)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
import tiny_models as tm

from blip2.models import losses
from blip2.models.blip2 import Blip2Model
from blip2.nn import masks
from blip2.nn.distributed import gather_no_grad, gather_with_grad


@pytest.fixture(scope="module")
def stage1() -> Blip2Model:
    torch.manual_seed(0)
    model = Blip2Model(tm.our_config(None, num_queries=4, cross_freq=1))
    tm._randomize(model, 1)
    with torch.no_grad():
        model.temp.fill_(0.07)
    return model.eval()


def _text(batch: int = 3, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, tm.VOCAB, (batch, length), generator=gen)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    ids[0, -2:] = 0
    return ids, mask


def test_itc_equals_hand_computation():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 5, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(3, 5, generator=gen), dim=-1)
    temp = torch.tensor(0.07)
    loss, sim_i2t, sim_t2i = losses.itc_loss(img, txt, temp)

    sim = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            sim[i, j] = max(float(img[i, q] @ txt[j]) for q in range(4)) / 0.07

    def smoothed_ce(logits: torch.Tensor) -> float:
        total = 0.0
        for i in range(3):
            logp = logits[i].log_softmax(0)
            total += -(0.9 * logp[i] + 0.1 * logp.mean())  # label smoothing 0.1 over 3 classes
        return total / 3

    expected = (smoothed_ce(sim) + smoothed_ce(sim.t())) / 2
    assert torch.allclose(sim_i2t, sim, atol=1e-5)
    assert torch.allclose(sim_t2i, sim.t(), atol=1e-5)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_itc_soft_targets_equal_label_smoothing_with_unique_ids():
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 3, 5, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    hard, _, _ = losses.itc_loss(img, txt, torch.tensor(0.1))
    soft, _, _ = losses.itc_loss(img, txt, torch.tensor(0.1), image_ids=torch.arange(4))
    assert torch.allclose(hard, soft, atol=1e-6)


def test_hard_negatives_are_never_the_positive():
    gen = torch.Generator().manual_seed(0)
    # Positives get by far the highest similarity: a sampler that ignored the mask would pick them.
    sim = torch.randn(5, 5, generator=gen) + torch.eye(5) * 50
    positives = losses.positive_mask(5, 5, 0, device="cpu")
    for _ in range(200):
        neg = losses.sample_hard_negatives(sim, positives, gen)
        assert not bool((neg == torch.arange(5)).any())
    # With image ids, every item of the same image is a positive too.
    ids = torch.tensor([0, 0, 1, 1, 2])
    positives = losses.positive_mask(5, 5, 0, ids, ids, "cpu")
    for _ in range(200):
        neg = losses.sample_hard_negatives(sim, positives, gen)
        assert not bool((ids[neg] == ids).any())


def test_hard_negatives_need_two_images():
    with pytest.raises(ValueError, match="at least two different images"):
        losses.sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_temperature_is_learnable_and_unclamped(stage1):
    assert isinstance(stage1.temp, torch.nn.Parameter) and stage1.temp.requires_grad
    assert math.isclose(float(Blip2Model(tm.our_config(None)).temp.detach()), 0.07, rel_tol=1e-6)
    img = F.normalize(torch.randn(2, 3, 4), dim=-1)
    txt = F.normalize(torch.randn(2, 4), dim=-1)
    temp = torch.nn.Parameter(torch.tensor(1e-4))  # far below LAVIS BLIP-1's clamp at 0.001: used as is
    loss, sim, _ = losses.itc_loss(img, txt, temp)
    loss.backward()
    assert temp.grad is not None and torch.allclose(sim, losses.max_over_queries(img, txt) / 1e-4)


def test_no_grad_gather_is_detached_at_world_size_one():
    x = torch.randn(2, 3, requires_grad=True)
    gathered = gather_no_grad(x, 1)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert gather_with_grad(x, 1).requires_grad


# Parameters only one ITC tower reaches; the shared self-attention, the Q-Former's layernorm and temp are both.
_TEXT_ONLY = re.compile(r"embeddings\.|text_projection\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
_IMAGE_ONLY = re.compile(r"query_tokens|vision_projection\.|vision_model\.|.*\.crossattention\.|.*_query\.")


def _itc_term_grads(model: Blip2Model, term: str, gather_grad: bool) -> dict[str, torch.Tensor]:
    """Gradients of one ITC term ("i2t", "t2i" or the whole "itc" loss) on a fixed batch of 3 pairs."""
    model.zero_grad()
    pixels = torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    ids, mask = _text()
    image = model.image_itc_features(model.query(model.encode_image(pixels)).hidden)
    text = model.text_itc_features(model.encode_text(ids, mask))
    loss, sim_i2t, sim_t2i = losses.itc_loss(image, text, model.temp, gather_grad=gather_grad)
    target = torch.arange(3)
    terms = {"itc": loss, "i2t": F.cross_entropy(sim_i2t, target, label_smoothing=0.1),
             "t2i": F.cross_entropy(sim_t2i, target, label_smoothing=0.1)}
    terms[term].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _moved(grads: dict[str, torch.Tensor], side: re.Pattern) -> set[str]:
    return {n for n, g in grads.items() if side.match(n) and g.abs().sum() > 0}


def test_no_grad_gather_trains_each_tower_from_its_own_itc_term(stage1):
    """LAVIS's semantics at world size 1: image->text trains only the image side, text->image only the text
    side, and the ITC loss is their mean."""
    i2t, t2i, itc = (_itc_term_grads(stage1, term, gather_grad=False) for term in ("i2t", "t2i", "itc"))
    assert not _moved(i2t, _TEXT_ONLY)
    assert {"query_tokens", "vision_projection.weight"} <= _moved(i2t, _IMAGE_ONLY)
    assert not _moved(t2i, _IMAGE_ONLY)
    assert {"embeddings.word_embeddings.weight", "text_projection.weight"} <= _moved(t2i, _TEXT_ONLY)
    for name, grad in itc.items():
        half = i2t if _IMAGE_ONLY.match(name) else t2i if _TEXT_ONLY.match(name) else None
        if half is not None:
            assert torch.allclose(grad, half[name] / 2, atol=1e-7), name


def test_gather_with_grad_trains_both_towers_from_each_itc_term(stage1):
    i2t, t2i = (_itc_term_grads(stage1, term, gather_grad=True) for term in ("i2t", "t2i"))
    assert "text_projection.weight" in _moved(i2t, _TEXT_ONLY)
    assert "query_tokens" in _moved(t2i, _IMAGE_ONLY)


def test_itg_label_smoothing():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                               label_smoothing=0.1)
    assert torch.allclose(losses.itg_loss(logits, labels), expected)


def test_itg_is_causal(stage1):
    feats = stage1.encode_image(torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    ids, mask = _text()
    ids[:, 0] = 5  # [DEC]
    with torch.no_grad():
        query = stage1.query(feats)
        before = stage1.itg_logits(query, ids, mask)
        changed = ids.clone()
        changed[:, 4] = (changed[:, 4] + 1) % tm.VOCAB
        after = stage1.itg_logits(query, changed, mask)
    assert torch.equal(before[:, :4], after[:, :4])  # positions before the change see nothing of it
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_itg_cache_equals_full_multimodal_causal_pass(stage1):
    """Reusing the query pass's keys/values equals one pass over [queries; text] under the ITG mask."""
    feats = stage1.encode_image(torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    ids, mask = _text()
    with torch.no_grad():
        cached = stage1.itg_logits(stage1.query(feats), ids, mask)
        queries = stage1.query_tokens.expand(3, -1, -1)
        embeds = torch.cat([queries, stage1.embeddings(ids)], dim=1)
        full_mask = masks.multimodal_causal_mask(4, mask)
        hidden, _ = stage1.qformer(embeds, 4, image=feats, mask=full_mask)
        full = stage1.qformer_lm_head(hidden[:, 4:], stage1.embeddings.word_embeddings.weight)
    real = mask.bool()
    assert (cached - full)[real].abs().max() < 1e-5


def _query_outputs(model, feats, ids, mask, build_mask):
    queries = model.query_tokens.expand(ids.shape[0], -1, -1)
    embeds = torch.cat([queries, model.embeddings(ids)], dim=1)
    hidden, _ = model.qformer(embeds, 4, image=feats, mask=build_mask(mask))
    return hidden[:, :4]


def test_queries_never_see_text_under_itc_itg_masks_but_do_under_itm(stage1):
    feats = stage1.encode_image(torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    ids, mask = _text()
    other = ids.clone()
    other[:, 1:] = (other[:, 1:] + 3) % tm.VOCAB
    itg = lambda m: masks.multimodal_causal_mask(4, m)  # noqa: E731
    itm = lambda m: masks.bidirectional_mask(4, m)  # noqa: E731
    with torch.no_grad():
        alone = stage1.query(feats).hidden  # the ITC image pass: queries only
        a = _query_outputs(stage1, feats, ids, mask, itg)
        b = _query_outputs(stage1, feats, other, mask, itg)
        c = _query_outputs(stage1, feats, ids, mask, itm)
        d = _query_outputs(stage1, feats, other, mask, itm)
    assert torch.allclose(a, alone, atol=1e-5) and torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(c, d, atol=1e-3)


def test_itm_text_sees_image_through_queries(stage1):
    feats = stage1.encode_image(torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    ids, mask = _text()
    with torch.no_grad():
        a = stage1.itm_logits(feats, ids, mask)
        b = stage1.itm_logits(feats.flip(0), ids, mask)
    assert a.shape == (3, 2) and not torch.allclose(a, b)


def test_padding_is_invisible_to_itc_text(stage1):
    ids, mask = _text()
    with torch.no_grad():
        a = stage1.encode_text(ids, mask)
        ids2 = ids.clone()
        ids2[0, -2:] = 9  # change only padded positions
        b = stage1.encode_text(ids2, mask)
    assert torch.allclose(a[0, :-2], b[0, :-2], atol=1e-6)


def test_stage1_losses_train_only_the_bridge(stage1):
    stage1.train()
    pixels = torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    ids, mask = _text()
    out = stage1.stage1_losses(stage1.encode_image(pixels), ids, mask, dec_token_id=5,
                               generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "itc", "itm", "itg"}
    assert torch.allclose(out["loss"], out["itc"] + out["itm"] + out["itg"])
    out["loss"].backward()
    grads = {n for n, p in stage1.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"temp", "query_tokens", "vision_model.post_layernorm.weight", "itm_head.weight",
            "qformer_lm_head.bias"} <= grads
    assert not any(n.startswith("vision_model.encoder") or n.startswith("vision_model.embeddings") for n in grads)
    assert not stage1.vision_model.training  # frozen tower stays in eval mode
    stage1.zero_grad()
    stage1.eval()


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_loss(kind):
    torch.manual_seed(0)
    model = Blip2Model(tm.our_config(kind))
    tm._randomize(model, 2)
    model.eval()
    feats = model.encode_image(torch.randn(2, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    ids = torch.tensor([[2, 10, 11, 12, 13], [2, 14, 15, 1, 1]])
    mask = (ids != 1).long()
    if kind == "opt":
        labels = ids.masked_fill(mask == 0, -100)
        loss = model.lm_loss(feats, ids, mask, labels)
        logits = model.lm_logits(feats, ids, mask)  # (B, Q+T, V)
        # REFERENCE §3: the last query predicts the BOS; prompt/pad positions are ignored.
        shifted = logits[:, 3:-1]
        expected = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1), ignore_index=-100)
    else:
        target = torch.tensor([[10, 11, 1], [12, 1, 0]])
        labels = target.masked_fill(target == 0, -100)
        loss = model.lm_loss(feats, ids, mask, labels)
        decoder = model.language_model._shift_right(labels.masked_fill(labels == -100, 0))
        logits = model.lm_logits(feats, ids, mask, decoder_input_ids=decoder)
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert model.language_projection.weight.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(stage1):
    pixels = torch.randn(3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    ids, mask = _text()
    dropouts = [m for m in stage1.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    grads = []
    stage1.train()
    for m in dropouts:
        m.p = 0.0  # deterministic forward, so recomputation is exact
    from blip2.nn.attention import MultiHeadAttention

    attention = [m for m in stage1.modules() if isinstance(m, MultiHeadAttention)]
    for m in attention:
        m.dropout = 0.0
    for checkpointing in (False, True):
        stage1.zero_grad()
        stage1.qformer.encoder.gradient_checkpointing = checkpointing
        out = stage1.stage1_losses(stage1.encode_image(pixels), ids, mask, dec_token_id=5,
                                   generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append(stage1.query_tokens.grad.clone())
    stage1.qformer.encoder.gradient_checkpointing = False
    for m, p in zip(dropouts, saved):
        m.p = p
    for m in attention:
        m.dropout = 0.1
    stage1.zero_grad()
    stage1.eval()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_unfrozen_vit_checkpointing_gives_the_same_features_and_gradients(monkeypatch):
    """An unfrozen ViT (stage-1 `trainable` naming its layers) recomputes each layer in backward under
    `set_gradient_checkpointing(True)`: same features, same gradients, and the layers really are re-run."""
    torch.manual_seed(0)
    model = Blip2Model(tm.our_config(None))
    model.freeze_frozen_parts()
    tower = model.vision_model
    for p in tower.encoder.layers[-1].parameters():
        p.requires_grad_(True)
    pixels = torch.randn(2, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    from blip2.models.vision import hf

    calls = []
    run_layer = hf._layer_output
    monkeypatch.setattr(hf, "_layer_output", lambda layer, x: calls.append(layer) or run_layer(layer, x))
    results = []
    for on in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(on)
        calls.clear()
        feats = model.encode_image(pixels)
        feats.square().sum().backward()
        results.append((feats.detach(), tower.encoder.layers[-1].mlp.fc1.weight.grad.clone(), len(calls)))
    model.set_gradient_checkpointing(False)
    (plain, plain_grad, plain_calls), (ckpt, ckpt_grad, ckpt_calls) = results
    assert torch.equal(plain, ckpt)
    assert torch.allclose(plain_grad, ckpt_grad, atol=1e-6) and plain_grad.abs().sum() > 0
    # Without checkpointing the encoder runs its own loop; with it, every layer once in forward and the
    # trainable last one again in backward (the frozen first one needs no recomputation).
    assert (plain_calls, ckpt_calls) == (0, len(tower.encoder.layers) + 1)
    assert calls[-1] is tower.encoder.layers[-1]
    with torch.no_grad():  # inference never checkpoints
        model.set_gradient_checkpointing(True)
        calls.clear()
        assert torch.equal(model.encode_image(pixels), plain) and not calls
        model.set_gradient_checkpointing(False)
