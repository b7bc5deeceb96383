"""ChatML prompts and Long-VITA's expansion of <image>/<video> tags into vision tokens, on token ids.

Source: Long-VITA inference (get_external_inputs) and training data code. An image with tiles
[thumbnail, t_1 .. t_{cols*rows}] becomes
    <img> T x <IMG_CONTEXT> </img>  then, only if there is more than one tile, for each grid row:
    "\\n" (token 198), then per tile <patch> T x <PATCH_CONTEXT> </patch>
and a video of F frames becomes F x (<vid> T x <VID_CONTEXT> </vid>). T = tokens per tile (256 for
448-px tiles, 14-px patches and the 2x2 pixel shuffle). Tags are expanded in text order. A model may
add its own text label before each video frame (``frame_label_ids``; the packaged digits model numbers
its frames "001", "002", ...); Long-VITA's checkpoints use none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
ROLES = ("system", "user", "assistant")


def tokens_per_tile(image_size: int = 448, patch_size: int = 14) -> int:
    """LLM tokens per tile: (image_size / patch_size)^2 / 4 (2x2 pixel shuffle). 448/14 -> 256, 56/14 -> 4.
    Raises ValueError unless image_size is a multiple of patch_size with an even patch grid."""
    if patch_size < 1 or image_size < 1 or image_size % patch_size or (image_size // patch_size) % 2:
        raise ValueError(f"image_size/patch_size: expected an even number of patches per side, received "
                         f"{image_size}/{patch_size}")
    return (image_size // patch_size) ** 2 // 4


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    for k, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{k}]['role']: expected one of {ROLES}, received {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{k}]['content']: expected str, received {type(m.get('content')).__name__}")


def apply_chat_template(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML text of messages [{"role": system|user|assistant, "content": str}, ...]:
    "<|im_start|>{role}\\n{content}<|im_end|>\\n" each, no default system prompt, then
    "<|im_start|>assistant\\n" if add_generation_prompt. Raises ValueError on a bad role/content."""
    _check_messages(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chat_segments(messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """apply_chat_template cut into (text, supervised) pieces whose concatenation is the full text:
    header "<|im_start|>{role}\\n" (never supervised), content, and "<|im_end|>\\n" (supervised only
    for assistant messages, like the content)."""
    _check_messages(messages)
    segments = []
    for m in messages:
        train = m["role"] == "assistant"
        segments += [(f"<|im_start|>{m['role']}\n", False), (m["content"], train), ("<|im_end|>\n", train)]
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return [(t, s) for t, s in segments if t]


def insert_media_tags(prompt: str, n_images: int, n_videos: int) -> str:
    """If `prompt` has no <image>/<video> tag, prepend "<image>\\n" per image then "<video>" per video
    (Long-VITA's evaluation layout); otherwise return it unchanged."""
    if IMAGE_TAG in prompt or VIDEO_TAG in prompt:
        return prompt
    return (IMAGE_TAG + "\n") * n_images + VIDEO_TAG * n_videos + prompt


@dataclass(frozen=True)
class MediaSpec:
    """What one tag expands to: kind "image" with grid (cols, rows) and n_tiles (1 or cols*rows + 1),
    or kind "video" with n_tiles = number of frames (grid None)."""
    kind: str
    n_tiles: int
    grid: tuple[int, int] | None = None


@dataclass
class Expanded:
    """Result of expand_media_tokens: input_ids (list[int]), context_positions (list[int], ascending,
    T per tile in pixel_values order) and labels (list[int] or None)."""
    input_ids: list[int]
    context_positions: list[int]
    labels: list[int] | None


def find_media_tags(ids: Sequence[int], image_token_id: int, video_token_id: int) -> list[str]:
    """Kinds ("image"/"video") of the tag tokens in `ids`, in text order."""
    return ["image" if t == image_token_id else "video" for t in ids if t in (image_token_id, video_token_id)]


def check_tag_counts(kinds: Sequence[str], n_images: int, n_videos: int) -> None:
    """Raise ValueError naming both counts if the tags in the text do not match the media given."""
    tags_i, tags_v = kinds.count("image"), kinds.count("video")
    if tags_i != n_images:
        raise ValueError(f"the text has {tags_i} <image> tag(s) but {n_images} image(s) were given")
    if tags_v != n_videos:
        raise ValueError(f"the text has {tags_v} <video> tag(s) but {n_videos} video(s) were given")


def check_no_vision_tokens(ids: Iterable[int], tokenizer) -> None:
    """Raise ValueError if the text already holds vision tokens (<img>, <IMG_CONTEXT>, <patch>, ...):
    they are produced only by expansion, and stray CONTEXT tokens would receive no features."""
    t = tokenizer
    reserved = {t.img_start_id, t.img_end_id, t.img_context_id, t.vid_start_id, t.vid_end_id,
                t.vid_context_id, t.patch_start_id, t.patch_end_id, t.patch_context_id}
    bad = reserved.intersection(ids)
    if bad:
        names = sorted(t.id_to_token(i) for i in bad)
        raise ValueError(f"the text contains reserved vision token(s) {names}; write <image>/<video> instead")


def expand_media_tokens(ids: Sequence[int], media: Sequence[MediaSpec], tokenizer, tokens_per_tile: int,
                        labels: Sequence[int] | None = None,
                        frame_label_ids: Callable[[int], Sequence[int]] | None = None) -> Expanded:
    """Replace each <image>/<video> token in `ids` by its vision tokens (layout in the module docstring).

    media: one MediaSpec per tag, in text order (kinds must match the tags). tokenizer: provides the
    special ids (LongVITATokenizer). labels: optional, same length as ids; vision tokens get -100.
    frame_label_ids: None (Long-VITA's layout) or a function of the 1-based frame index returning the
    token ids written before that video frame's <vid> (a model's own frame numbering, e.g. the digits
    model's "001"); they are unsupervised (-100) like the frame.
    Returns Expanded(input_ids, context_positions, labels). Raises ValueError when tags and media do not
    match, or when the text itself holds a CONTEXT/start/end vision token (they are reserved)."""
    t = tokenizer
    check_no_vision_tokens(ids, t)
    kinds = find_media_tags(ids, t.image_token_id, t.video_token_id)
    if [m.kind for m in media] != kinds:
        raise ValueError(f"media kinds {[m.kind for m in media]} do not match the tags in the text {kinds}")
    if labels is not None and len(labels) != len(ids):
        raise ValueError(f"labels: expected length {len(ids)}, received {len(labels)}")
    T = tokens_per_tile
    out_ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    positions: list[int] = []

    def _block(start: int, context: int, end: int) -> None:
        out_ids.append(start)
        positions.extend(range(len(out_ids), len(out_ids) + T))
        out_ids.extend([context] * T)
        out_ids.append(end)

    k = 0
    for n, tok in enumerate(ids):
        if tok != t.image_token_id and tok != t.video_token_id:
            out_ids.append(tok)
            if out_labels is not None:
                out_labels.append(labels[n])
            continue
        spec, before = media[k], len(out_ids)
        k += 1
        if spec.kind == "image":
            _block(t.img_start_id, t.img_context_id, t.img_end_id)
            if spec.n_tiles > 1:
                cols, rows = spec.grid
                if spec.n_tiles != cols * rows + 1:
                    raise ValueError(f"image: expected {cols * rows + 1} tiles for grid {spec.grid}, "
                                     f"received {spec.n_tiles}")
                for _ in range(rows):
                    out_ids.append(t.newline_id)
                    for _ in range(cols):
                        _block(t.patch_start_id, t.patch_context_id, t.patch_end_id)
        else:
            for f in range(spec.n_tiles):
                if frame_label_ids is not None:
                    out_ids.extend(frame_label_ids(f + 1))
                _block(t.vid_start_id, t.vid_context_id, t.vid_end_id)
        if out_labels is not None:
            out_labels.extend([IGNORE_INDEX] * (len(out_ids) - before))
    return Expanded(out_ids, positions, out_labels)


def expanded_length(ids: Iterable[int], media: Sequence[MediaSpec], tokens_per_tile: int,
                    image_token_id: int, video_token_id: int,
                    frame_label_len: Callable[[int], int] | None = None) -> int:
    """Length of the expanded sequence without building it (for budgeting long videos).
    frame_label_len: tokens of the label before 1-based video frame k (see expand_media_tokens)."""
    n = sum(1 for t in ids if t not in (image_token_id, video_token_id))
    for m in media:
        if m.kind == "video":
            n += m.n_tiles * (tokens_per_tile + 2)
            if frame_label_len is not None:
                n += sum(frame_label_len(k + 1) for k in range(m.n_tiles))
        else:
            n += tokens_per_tile + 2 + ((m.grid[1] + (m.n_tiles - 1) * (tokens_per_tile + 2)) if m.n_tiles > 1 else 0)
    return n
