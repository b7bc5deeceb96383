"""The model ``vita-ext generate`` runs when no --model is given: offline and clearly labelled.

It is the packaged digits model (``vita_ext/assets/digits_model``): a 10M-parameter Long-VITA (real
Qwen2.5 vocabulary, 28-px tiles) trained by ``scripts/train_digits.py`` through the four training
stages on scikit-learn's handwritten digits. It answers "Which digit is this?" about a digit image and
reads short videos of digits ("Read the digits in order.", frames numbered by its processor_config.json;
about half the digits of a 16-frame video), and nothing else. If the asset is missing (a stripped
install), a tiny model with SEEDED RANDOM weights runs instead, and says so.
"""
from __future__ import annotations

import os

import torch

DEFAULT_SEED = 0
DIGITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits_model")
DIGITS_LABEL = ("no --model given: running the embedded default model, a tiny Long-VITA trained on handwritten "
                "digits (scikit-learn's digits; ask e.g. \"Which digit is this?\" about a digit image, or \"Read the "
                "digits in order.\" about a short video of digits; it knows nothing else)")
RANDOM_LABEL = ("no --model given: running the embedded tiny default model with SEEDED RANDOM weights "
                "(real tokenizer and preprocessing, meaningless text)")


def digits_model_path() -> str | None:
    """The packaged digits checkpoint directory, or None when it is not installed."""
    ok = all(os.path.isfile(os.path.join(DIGITS_DIR, f)) for f in ("config.json", "model.safetensors"))
    return DIGITS_DIR if ok else None


def default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, processor, generation_config, label) for the embedded default model."""
    from vita_ext.generation import GenerationConfig
    from vita_ext.model.long_vita import LongVITAForCausalLM
    from vita_ext.model.presets import tiny
    from vita_ext.processing import LongVITAProcessor, LongVITATokenizer

    path = digits_model_path()
    if path is not None:
        model = LongVITAForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return model, LongVITAProcessor.from_pretrained(path), GenerationConfig.from_pretrained(path), DIGITS_LABEL
    config = tiny()
    model = LongVITAForCausalLM.random(config, seed=DEFAULT_SEED, dtype=dtype, device=device)
    processor = LongVITAProcessor(LongVITATokenizer.default(),
                                  image_size=config.vision.image_size, patch_size=config.vision.patch_size)
    label = RANDOM_LABEL + " -- the trained digits model is missing from this install"
    return model, processor, GenerationConfig().updated(max_new_tokens=32), label
