"""The model ``vita-ext generate`` runs when no --model is given: offline, seeded, clearly labelled."""
from __future__ import annotations

import torch

DEFAULT_SEED = 0
RANDOM_LABEL = ("no --model given: running the embedded tiny default model with SEEDED RANDOM weights "
                "(real tokenizer and preprocessing, meaningless text)")


def default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, processor, generation_config, label) for the embedded default model."""
    from vita_ext.generation import GenerationConfig
    from vita_ext.model.long_vita import LongVITAForCausalLM
    from vita_ext.model.presets import tiny
    from vita_ext.processing import LongVITAProcessor, LongVITATokenizer

    config = tiny()
    model = LongVITAForCausalLM.random(config, seed=DEFAULT_SEED, dtype=dtype, device=device)
    processor = LongVITAProcessor(LongVITATokenizer.default(),
                                  image_size=config.vision.image_size, patch_size=config.vision.patch_size)
    return model, processor, GenerationConfig().updated(max_new_tokens=32), RANDOM_LABEL
