"""Tiny random BLIP-2 checkpoints built in code: transformers models saved to a folder with tokenizers.

No network: tokenizers are word-level ones built with `tokenizers` from a small word list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

WORDS = (
    "a an the photo of red green blue circle square triangle cat dog on is what color shape this it yes no "
    "question answer short : ? . , picture small big two one there are and with in"
).split()
VOCAB = 64
IMAGE_SIZE = 30


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """kind 'opt' (BOS </s>=2 first, like OPT), 'llama' (<s>=1 first), 't5' (ends with </s>=1), 'bert'
    ([CLS] ... [SEP], plus [DEC])."""
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    elif kind == "t5":
        specials = ["<pad>", "</s>", "<unk>", "<image>"]
    elif kind == "llama":
        specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if kind != "bert" else pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", bos_token="[DEC]", do_lower_case=True,
        )
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    bos = "</s>" if kind == "opt" else "<s>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token=bos, eos_token="</s>"
    )


def vision_config() -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=6, initializer_range=0.02,
    )


def qformer_config(layers: int = 2, cross_freq: int = 2, text: bool = False) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37, vocab_size=VOCAB,
        encoder_hidden_size=32, cross_attention_frequency=cross_freq, use_qformer_text_input=text,
        max_position_embeddings=64,
    )


def text_config(kind: str):
    if kind == "opt":
        return OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37, vocab_size=VOCAB,
            max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        )
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
            vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    if kind == "t5":
        return T5Config(
            d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
            dense_act_fn="gelu", is_gated_act=True, feed_forward_proj="gated-gelu", bos_token_id=1,
            eos_token_id=1, pad_token_id=0, decoder_start_token_id=0, tie_word_embeddings=False,
        )
    raise ValueError(kind)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (HF's init leaves query tokens at zero and the ViT near zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name.lower() or "layernorm" in name.lower() or name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def image_token_index(kind: str) -> int:
    return 3 if kind == "t5" else 4


def save_generation_model(folder: Path, kind: str = "opt", num_queries: int = 4, cross_freq: int = 2,
                          qformer_layers: int = 2, seed: int = 0) -> Blip2ForConditionalGeneration:
    cfg = Blip2Config(
        vision_config=vision_config().to_dict(),
        qformer_config=qformer_config(qformer_layers, cross_freq).to_dict(),
        text_config=text_config(kind).to_dict(),
        num_query_tokens=num_queries,
        image_token_index=image_token_index(kind),
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    word_tokenizer(kind).save_pretrained(folder)
    _write_image_processor(folder)
    return model


def _write_image_processor(folder: Path) -> None:
    """BLIP-2's image processor settings (CLIP mean/std, bicubic) at the tiny image size."""
    (folder / "preprocessor_config.json").write_text(
        '{"image_processor_type": "BlipImageProcessor", "size": {"height": %d, "width": %d}, "resample": 3,'
        ' "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}'
        % (IMAGE_SIZE, IMAGE_SIZE)
    )


def save_instructblip_model(folder: Path, kind: str = "opt", num_queries: int = 4, cross_freq: int = 2,
                            qformer_layers: int = 2, seed: int = 0) -> InstructBlipForConditionalGeneration:
    """A tiny random transformers InstructBLIP checkpoint, laid out as the Salesforce/instructblip-* folders:
    config.json + safetensors, the LLM tokenizer, `qformer_tokenizer/` (BERT) and the image processor."""
    qformer = qformer_config(qformer_layers, cross_freq).to_dict()
    qformer.pop("use_qformer_text_input")  # InstructBLIP's Q-Former always has its text side
    cfg = InstructBlipConfig(
        vision_config=vision_config().to_dict(), qformer_config=qformer, text_config=text_config(kind).to_dict(),
        num_query_tokens=num_queries, image_token_index=image_token_index(kind),
    )
    model = InstructBlipForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    word_tokenizer(kind).save_pretrained(folder)
    word_tokenizer("bert").save_pretrained(folder / "qformer_tokenizer")
    _write_image_processor(folder)
    return model


def save_retrieval_model(folder: Path, num_queries: int = 4, cross_freq: int = 2, seed: int = 0) -> Blip2ForImageTextRetrieval:
    cfg = Blip2Config(
        vision_config=vision_config().to_dict(),
        qformer_config=qformer_config(2, cross_freq, text=True).to_dict(),
        text_config=text_config("opt").to_dict(),
        num_query_tokens=num_queries,
        image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    word_tokenizer("bert").save_pretrained(folder)
    return model


def images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    """Synthetic RGB images: smooth gradients plus noise, different per index."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.linspace(0, 255, size)[None, :, None] * (i + 1) / (n + 1)
        arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


def our_config(language: str | None = None, num_queries: int = 4, cross_freq: int = 2, layers: int = 2):
    """Our own typed config of a tiny model: stage 1 (language=None, all stage-1 heads) or stage 2."""
    from blip2.models.config import Blip2Config as Ours, LanguageConfig, QFormerConfig, VisionConfig
    from blip2.models.config import ImageConfig

    return Ours(
        vision=VisionConfig(kind="blip2", hf_config=vision_config().to_dict(), image=ImageConfig(size=IMAGE_SIZE)),
        qformer=QFormerConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37, vocab_size=VOCAB,
            encoder_hidden_size=32, cross_attention_frequency=cross_freq, max_position_embeddings=64,
            use_text_input=language is None,
        ),
        language=LanguageConfig(hf_config=text_config(language).to_dict()) if language else None,
        num_query_tokens=num_queries,
        image_text_hidden_size=16,
        stage1_heads=language is None,
        itg_head=language is None,
    )


def record_passes(model):
    """A forward pre-hook recording (rows, positions) of every pass of `model`; returns (list, handle)."""
    passes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        passes.append(tuple(x.shape[:2]))

    return passes, model.register_forward_pre_hook(record, with_kwargs=True)
