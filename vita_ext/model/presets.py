"""Named configurations: the real Long-VITA-14B shapes and tiny ones for tests, examples and the CLI default."""
from __future__ import annotations

from vita_ext.model.config import LongVITAConfig, TextConfig, VisionConfig

QWEN2_VOCAB = 152064  # rows of embed_tokens / lm_head in Qwen2.5 (the tokenizer uses 151682 of them)


def long_vita_14b() -> LongVITAConfig:
    """Long-VITA-14B: InternViT-300M (448 px, 24 layers) + Qwen2.5-14B (48 layers, 40/8 heads)."""
    return LongVITAConfig()


def tiny(image_size: int = 448, vocab_size: int = QWEN2_VOCAB, layers: int = 2, hidden: int = 64) -> LongVITAConfig:
    """A few-million-parameter model with the real geometry (448-px tiles -> 256 tokens by default) and the
    real Qwen2.5 vocabulary, so it runs the true preprocessing and prompt layout on a CPU in seconds."""
    return LongVITAConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=1310720),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            image_size=image_size, patch_size=14),
    )


PRESETS = {"long-vita-14b": long_vita_14b, "tiny": tiny}
