"""Long-VITA input processing: Qwen2.5 tokenizer + Long-VITA tokens, InternVL dynamic image tiles,
video frame sampling, ChatML prompts and <image>/<video> expansion -> input_ids, pixel_values,
context_positions (and labels for training). Pure Python (tokenizers, Pillow, PyAV, numpy, torch)."""
from .image import (IMAGENET_MEAN, IMAGENET_STD, MEAN_FILL, candidate_grids, closest_grid, dynamic_tiles,
                    expand_to_square, image_to_tensor, load_image, normalize)
from .processor import LongVITAProcessor
from .prompt import (IGNORE_INDEX, MediaSpec, apply_chat_template, expand_media_tokens, insert_media_tags,
                     tokens_per_tile)
from .tokenizer import LONG_VITA_TOKENS, LongVITATokenizer, StreamingDetokenizer, default_tokenizer_path
from .video import (VideoSource, load_video_frames, sample_indices, video_frames_to_tensor,
                    video_to_tensor)

__all__ = [
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "LONG_VITA_TOKENS", "MEAN_FILL", "LongVITAProcessor",
    "LongVITATokenizer", "MediaSpec", "StreamingDetokenizer", "VideoSource", "apply_chat_template",
    "candidate_grids", "closest_grid", "default_tokenizer_path", "dynamic_tiles", "expand_media_tokens",
    "expand_to_square", "image_to_tensor", "insert_media_tags", "load_image", "load_video_frames",
    "normalize", "sample_indices", "tokens_per_tile", "video_frames_to_tensor", "video_to_tensor",
]
