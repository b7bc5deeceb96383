"""The digits recipe: scikit-learn's handwritten digits through Long-VITA's four stages on CPU.

Data. ``load_digits`` (1797 grey 8x8 images, values 0..16) is split per class into a training and a
held-out test set (20%, seeded). Each digit becomes a 28x28 RGB PNG (dark ink on white, bicubic
upsampling): with 14-px patches that is a 2x2 patch grid and ONE LLM token after the pixel shuffle,
so an image costs 3 tokens (``<img>``, ``<IMG_CONTEXT>``, ``</img>``) and 256 numbered frames ~1.6K.

Frames. N images are written each after its 3-digit number (``FRAME_LABEL``):
"001<image>002<image>...N<image>\\n". Fixed-width numbers keep every frame 6 tokens long, so the frame
before a frame is always 6 tokens back (see benchmarks/RESULTS.md: with numbers of 1-3 digits, or any
spacing other than a constant one, the small model did not learn to read in our budget). Questions
are unchanged: "Read the digits in order." -> the N digits ("7302..."); "Which frame shows a 3?" ->
the frame's number as a plain integer ("12"). This numbering is the digits model's own: its
``processor_config.json`` (``PROCESSOR_CONFIG``) makes ``LongVITAProcessor`` write the same numbers
before the frames of a video, so ``vita-ext generate --video DIGITS.mp4 --prompt "Read the digits in
order."`` sees what the model was trained on; Long-VITA's checkpoints have no such file and keep the
release's video layout.

Stages (``stage_records``; ``Mix`` and ``Phase`` say how many records of each kind, and in which order):
- stage 0, text only, the LLM trainable. Long-VITA starts from a pretrained Qwen2.5; no pretrained LLM
  exists at this size, so this stage gives ours what stage 1 relies on. (a) Which word names which
  digit: "seven\\nWhich digit is this?" -> "7", "seven\\nDescribe the image." -> "a handwritten 7".
  (b) Reading and searching long text, as a pretrained LLM can: the frame layout above with each
  digit's word in brackets for its image ("001[seven]002[three]...\\n" + the two questions), N
  growing over the stage (a curriculum: the model learns to read short lists first; the shipped
  recipe stops at 64, see scripts/train_digits.py STAGES).
- stage 1, captions:       "<image>\\nDescribe the image."           -> "a handwritten 7"
- stage 2, single images:  "<image>\\nWhich digit is this?" (and rephrasings) -> "7", with captions and
  a share of stage 0's word sequences (the paper's stage 2 mixes text data too), so the LLM keeps them.
- stages 3-4, frames: the two questions on N numbered held-in images, N growing over stage 3 up to
  256, stage 4 on 2-256 (scripts/train_digits.py STAGES); a share in the video layout ("<video>Read the
  digits in order." with a folder of frames, as the CLI builds it). Stage-2 questions are mixed in at the
  paper's ratio of 0.1, which we read as 10% of the supervised tokens (the loss is a per-supervised-
  token average; 10% of the records would be ~1% of the signal next to 258-token answers); 30% of
  those records are captions, so "Describe the image." keeps naming the digit.
Records are written in curriculum order and the stages train with ``shuffle: false``; each ``Phase``
is sized by replaying the trainer's packing (greedy next-fit in file order) so it fills its number of
optimizer steps.

Evaluation (``evaluate``): greedy generation with the same processor and ``generate`` as the CLI, on
the held-out images: single-image accuracy, and for N in {16, 64, 256} the per-digit accuracy of
"read the digits in order" and the exact-match accuracy of "which frame shows a d?".
scikit-learn is needed here only (``pip install vita_ext[test]``).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 28
PATCH_SIZE = 14
FRAME_LABEL = "{:03d}"  # the number written before frame k (1-based) of a sequence or video
PROCESSOR_CONFIG = {"max_tiles": 1, "max_frames": 256, "video_frame_label": FRAME_LABEL}
QUESTIONS = ("Which digit is this?", "What digit is shown?", "What number is written here?", "Which digit do you see?")
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Write a caption for this image.")
READ_QUESTION = "Read the digits in order."
FIND_QUESTION = "Which frame shows a {digit}?"
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                     "do_sample": False, "temperature": 0.0, "repetition_penalty": 1.0, "top_k": 0, "top_p": 1.0,
                     "max_new_tokens": 300}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_config():
    """The shipped model: the real Qwen2.5 vocabulary (152064 rows) tied between embedding and head,
    hidden HIDDEN, LAYERS decoder layers, and a small ViT on 28-px tiles (one LLM token per image)."""
    from vita_ext.model.config import LongVITAConfig, TextConfig, VisionConfig
    from vita_ext.model.presets import QWEN2_VOCAB

    return LongVITAConfig(
        text=TextConfig(vocab_size=QWEN2_VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                        tie_word_embeddings=True),
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE))


HIDDEN, LAYERS = 64, 4


@dataclass
class Split:
    images: np.ndarray  # [n, 8, 8] uint8 in 0..16
    labels: np.ndarray  # [n] int
    ids: np.ndarray     # [n] indices into load_digits()


def load_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """(train, test): a per-class seeded split of sklearn's digits (test: ~20% of each class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(int)
    rng = np.random.default_rng(seed)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test += rng.permutation(idx)[:round(test_fraction * len(idx))].tolist()
    test_ids = np.array(sorted(test))
    train_ids = np.setdiff1d(np.arange(len(labels)), test_ids)
    return (Split(images[train_ids], labels[train_ids], train_ids), Split(images[test_ids], labels[test_ids], test_ids))


def to_image(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 values in 0..16 -> a size x size RGB image, dark ink on white."""
    grey = (255 - pixels.astype(np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")


def write_images(split: Split, directory: str, prefix: str) -> list[str]:
    """Write each image once as PNG; returns the paths (relative to the parent of ``directory``)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, (pixels, sid) in enumerate(zip(split.images, split.ids)):
        name = f"{prefix}_{int(sid):04d}.png"
        full = os.path.join(directory, name)
        if not os.path.exists(full):
            to_image(pixels).save(full)
        paths.append(os.path.join(os.path.basename(directory), name))
    return paths


def write_digits_video(path: str, images: list[np.ndarray], seconds_per_frame: int = 1, size: int = IMAGE_SIZE) -> str:
    """An MP4 video of 8x8 digits (values 0..16), one per frame, each shown ``seconds_per_frame``
    seconds (so Long-VITA's 1-fps sampling takes every frame), frames ``size`` px as ``to_image``
    draws them. H.264 lossless (crf 0, 4:4:4) when PyAV has libx264, else MPEG-4 at its best quality."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        stream.options = {"crf": "0"} if codec == "libx264" else {"qscale": "1"}
        for pixels in images:
            frame = av.VideoFrame.from_ndarray(np.asarray(to_image(pixels, size)), format="rgb24")
            for _ in range(seconds_per_frame):
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ----------------------------------------------------------------------------------- records
def _record(user: str, answer: str, images: list[str], videos: list[str] | None = None) -> dict:
    record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
              "images": images}
    if videos:
        record["videos"] = videos
    return record


def frames_prompt(n: int, start: int = 1) -> str:
    """The frames of an N-image question: each <image> after its number (FRAME_LABEL; the first is
    ``start``, 1 as in every evaluation and video), then a newline."""
    return "".join(f"{FRAME_LABEL.format(start + k)}<image>" for k in range(n)) + "\n"


def words_prompt(digits: list[int], start: int = 1) -> str:
    """Stage 0's stand-in for frames_prompt: each digit's word in brackets where its image would be."""
    return "".join(f"{FRAME_LABEL.format(start + k)}[{WORDS[d]}]" for k, d in enumerate(digits)) + "\n"


def text_record(digit: int, rng: random.Random) -> dict:
    """Stage 0: the digit named by its word where stage 1-2 records have the image."""
    if rng.random() < 0.5:
        return _record(f"{WORDS[digit]}\n{rng.choice(CAPTION_PROMPTS)}", f"a handwritten {digit}", [])
    return _record(f"{WORDS[digit]}\n{rng.choice(QUESTIONS)}", str(digit), [])


def caption_record(path: str, digit: int, rng: random.Random) -> dict:
    return _record(f"<image>\n{rng.choice(CAPTION_PROMPTS)}", f"a handwritten {digit}", [path])


def qa_record(path: str, digit: int, rng: random.Random) -> dict:
    return _record(f"<image>\n{rng.choice(QUESTIONS)}", str(digit), [path])


def read_sequence(labels: np.ndarray, n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(len(labels)) for _ in range(n)]


def find_sequence(labels: np.ndarray, n: int, rng: random.Random) -> tuple[list[int], int, int]:
    """(indices, queried digit, 1-based frame): exactly one frame shows the queried digit."""
    digit = rng.randrange(10)
    target = [i for i in range(len(labels)) if labels[i] == digit]
    others = [i for i in range(len(labels)) if labels[i] != digit]
    frames = [rng.choice(others) for _ in range(n)]
    k = rng.randrange(n)
    frames[k] = rng.choice(target)
    return frames, digit, k + 1


def read_record(paths: list[str], labels: np.ndarray, frames: list[int]) -> dict:
    return _record(frames_prompt(len(frames)) + READ_QUESTION, "".join(str(labels[i]) for i in frames),
                   [paths[i] for i in frames])


def find_record(paths: list[str], frames: list[int], digit: int, k: int) -> dict:
    return _record(frames_prompt(len(frames)) + FIND_QUESTION.format(digit=digit), str(k), [paths[i] for i in frames])


def words_read_record(digits: list[int], start: int = 1) -> dict:
    return _record(words_prompt(digits, start) + READ_QUESTION, "".join(map(str, digits)), [])


def words_find_record(digits: list[int], digit: int, k: int, start: int = 1) -> dict:
    """k: the 1-based position of the word; the answer is its number as written (start + k - 1)."""
    return _record(words_prompt(digits, start) + FIND_QUESTION.format(digit=digit), str(start + k - 1), [])


def video_record(video: str, question: str, answer: str) -> dict:
    """A question about a video (a folder of frames) as ``vita-ext generate --video V --prompt Q`` lays
    it out: "<video>" + question (the processor numbers the frames, see PROCESSOR_CONFIG)."""
    return _record(f"<video>{question}", answer, [], [video])


def write_video_folder(directory: str, frame_paths: list[str]) -> str:
    """A video as a folder of frames: symbolic links 0001.png ... to the (absolute) image paths."""
    os.makedirs(directory, exist_ok=True)
    for k, path in enumerate(frame_paths):
        link = os.path.join(directory, f"{k + 1:04d}.png")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(path), link)
    return directory


@dataclass(frozen=True)
class Phase:
    """A block of sequence records with N uniform in [n_min, n_max], enough to fill ``steps`` packed
    rows (optimizer steps) of the stage's sequence length."""
    n_min: int
    n_max: int
    steps: int


@dataclass(frozen=True)
class Mix:
    """What a stage's JSONL holds. repeats: passes over the training images (stage 0: their words;
    1: captions; 2: questions, plus captions of 20% of them). phases: sequence records in curriculum
    order (stage 0: words; 2: words, retention; 3-4: images). find_share: share of "which frame"
    records among sequences; video_share: share in the video layout (stages 3-4); single_share:
    share of supervised tokens from single-image questions (stages 3-4, the paper's 0.1); max_label:
    0 numbers every sequence from 001, M > 0 numbers word and image sequences (not videos, which the
    processor numbers from 001) from a random start s with s + N - 1 <= M, so that frame numbers up to M occur in
    short sequences too (a model that learned to read 64 frames numbered 001-064 could not read 64
    frames numbered 101-164; benchmarks/RESULTS.md 9b).
    The single records (words, captions, questions) of stages 0-2 are spread evenly over the phases."""
    repeats: int = 0
    phases: tuple[Phase, ...] = ()
    find_share: float = 0.5
    video_share: float = 0.0
    single_share: float = 0.0
    max_label: int = 0

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)


QA_SUPERVISED = 3  # "7" + "<|im_end|>" + "\n"


def supervised_tokens(record: dict) -> int:
    """Supervised tokens of a digits record: its answer (one token per digit here; the captions'
    words are single tokens too) plus "<|im_end|>" and "\\n"."""
    answer = record["messages"][-1]["content"]
    return (len(answer) if answer.isdigit() else len(answer.split()) + 1) + 2


class TokenCounter:
    """Exact token count of a record after the processor's expansion (chat template, T tokens + 2 per
    image, frame labels + T + 2 per video frame), from text only (no image is read)."""

    def __init__(self, frames_of_video: dict[str, int] | None = None):
        from vita_ext.processing import LongVITATokenizer, tokens_per_tile
        from vita_ext.processing.prompt import apply_chat_template

        self.tok, self.template = LongVITATokenizer.default(), apply_chat_template
        self.tile = tokens_per_tile(IMAGE_SIZE, PATCH_SIZE)
        self.label = len(self.tok.encode(FRAME_LABEL.format(1)))
        self.frames_of_video = frames_of_video if frames_of_video is not None else {}

    def __call__(self, record: dict) -> int:
        ids = self.tok.encode(self.template(record["messages"], add_generation_prompt=False))
        n = len(ids) + len(record["images"]) * (self.tile + 1)
        for v in record.get("videos", []):
            n += self.frames_of_video[v] * (self.label + self.tile + 2) - 1
        return n


def _pack_rows(lengths: list[int], seq_len: int) -> int:
    """Rows the trainer's packer (greedy next-fit in order, shuffle off) makes of these lengths."""
    rows, used = 0, 0
    for n in lengths:
        if n > seq_len:
            continue  # skipped as too_long by the trainer
        if used and used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows + (1 if used else 0)


def _single_records(stage: int, paths: list[str], labels: np.ndarray, repeats: int, rng: random.Random) -> list[dict]:
    out: list[dict] = []
    for _ in range(repeats):
        if stage == 0:
            out += [text_record(int(d), rng) for d in labels]
        elif stage == 1:
            out += [caption_record(p, int(d), rng) for p, d in zip(paths, labels)]
        elif stage == 2:
            out += [qa_record(p, int(d), rng) for p, d in zip(paths, labels)]
            out += [caption_record(p, int(d), rng) for p, d in zip(paths, labels) if rng.random() < 0.2]
    rng.shuffle(out)
    return out


class _Sequences:
    """Draws the sequence records of a stage: word sequences (stages 0, 2) or numbered image
    sequences, some in the video layout (stages 3-4)."""

    def __init__(self, stage: int, paths: list[str], labels: np.ndarray, mix: Mix, rng: random.Random,
                 root: str | None, counter: TokenCounter):
        self.stage, self.paths, self.labels, self.mix, self.rng = stage, paths, labels, mix, rng
        self.root, self.counter, self.videos = root, counter, 0

    def draw(self, phase: Phase) -> dict:
        rng, n = self.rng, self.rng.randint(phase.n_min, phase.n_max)
        find = rng.random() < self.mix.find_share
        start = rng.randint(1, self.mix.max_label - n + 1) if self.mix.max_label > n else 1
        if self.stage in (0, 2):
            if find:
                digit = rng.randrange(10)
                digits = [rng.choice([x for x in range(10) if x != digit]) for _ in range(n)]
                k = rng.randrange(n)
                digits[k] = digit
                return words_find_record(digits, digit, k + 1, start)
            return words_read_record([rng.randrange(10) for _ in range(n)], start)
        if find:
            frames, digit, k = find_sequence(self.labels, n, rng)
            question = FIND_QUESTION.format(digit=digit)
        else:
            frames = read_sequence(self.labels, n, rng)
            question, answer = READ_QUESTION, "".join(str(self.labels[i]) for i in frames)
        video = self.root is not None and rng.random() < self.mix.video_share
        if video:
            start = 1  # the processor numbers a video's frames from 001
        if find:
            answer = str(start + k - 1)  # the frame's number as written
        if video:
            rel = os.path.join("videos", f"stage{self.stage}_{self.videos:06d}")
            self.videos += 1
            write_video_folder(os.path.join(self.root, rel), [os.path.join(self.root, self.paths[i]) for i in frames])
            self.counter.frames_of_video[rel] = n
            return video_record(rel, question, answer)
        return _record(frames_prompt(n, start) + question, answer, [self.paths[i] for i in frames])


def stage_records(stage: int, paths: list[str], labels: np.ndarray, mix: Mix, seed: int = 0, seq_len: int = 1024,
                  root: str | None = None, counter: TokenCounter | None = None) -> list[dict]:
    """The training records of a stage, in training order (see the module doc and ``Mix``).

    paths: the training images (relative to ``root``, the directory of the JSONL file; video folders
    of stages 3-4 are written under root/videos, and without a root no video record is made);
    labels: their digits; seq_len: the stage's packed length (the phases are sized for it)."""
    rng = random.Random(seed * 1000 + stage)
    singles = _single_records(stage, paths, labels, mix.repeats, rng)
    if not mix.phases:
        return singles
    counter = counter or TokenCounter()
    draw = _Sequences(stage, paths, labels, mix, rng, root, counter)
    records: list[dict] = []
    rows, used, row_start = 0, 0, 0  # the trainer's next-fit packing, replayed
    total, done = mix.steps, 0
    spare = list(singles)
    for p, phase in enumerate(mix.phases):
        done += phase.steps
        share = spare[:round(len(singles) * phase.steps / total)] if p < len(mix.phases) - 1 else spare
        spare = spare[len(share):]
        seq_sup = single_sup = 0
        avg = 6 * (phase.n_min + phase.n_max) / 2 + 24
        while rows < done:
            if stage >= 3:
                take_single = single_sup < mix.single_share / (1 - mix.single_share) * seq_sup
            else:  # spread this phase's single records evenly between its sequences
                left_seq = max(1.0, (done - rows) * seq_len / avg - 1)
                take_single = bool(share) and rng.random() < len(share) / (len(share) + left_seq)
            if take_single:
                record = share.pop() if stage < 3 else _stage2_record(paths, labels, rng)
                single_sup += supervised_tokens(record)
            else:
                record = draw.draw(phase)
                seq_sup += supervised_tokens(record)
            n = counter(record)
            if n > seq_len:
                raise ValueError(f"stage {stage}: a {n}-token record does not fit seq_len {seq_len}")
            if used and used + n > seq_len:
                rows, used, row_start = rows + 1, 0, len(records)
            used += n
            records.append(record)
    return records[:row_start]  # the record that opened row `total` + 1 would not be trained on


CAPTION_SHARE = 0.3  # of the stage-2 records mixed into stages 3-4 (without them captions fade, RESULTS 9)


def _stage2_record(paths: list[str], labels: np.ndarray, rng: random.Random) -> dict:
    """A stage-2 record for the single-image share of stages 3-4: a question, or (CAPTION_SHARE) a caption."""
    make = caption_record if rng.random() < CAPTION_SHARE else qa_record
    return make(*_pick(paths, labels, rng), rng)


def _pick(paths: list[str], labels: np.ndarray, rng: random.Random) -> tuple[str, int]:
    i = rng.randrange(len(paths))
    return paths[i], int(labels[i])


def write_jsonl(records: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
# -------------------------------------------------------------------------------- evaluation
def _answer(model, processor, prompt: str, images: list, max_new_tokens: int) -> str:
    from vita_ext.generation import GenerationConfig, generate

    inputs = processor(prompt, images=images)
    cfg = GenerationConfig().updated(do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    out = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"],
                   generation_config=cfg)
    return processor.decode(out.sequences[0], skip_special_tokens=True)


def evaluate(model, processor, test: Split, image_dir: str, lengths=(16, 64, 256), sequences: dict | None = None,
             singles: int | None = None, seed: int = 1234) -> dict:
    """Held-out accuracy. sequences: {N: how many sequences per task} (default 20/8/4);
    singles: how many test images (default all). Returns {"single": acc, "read@N": per-digit acc,
    "find@N": exact-match acc, "n_*": sample counts}."""
    sequences = sequences or {16: 20, 64: 8, 256: 4}
    paths = [os.path.join(os.path.dirname(image_dir), p) for p in write_images(test, image_dir, "test")]
    rng = random.Random(seed)
    model.eval()
    result: dict = {}
    with torch.no_grad():
        order = list(range(len(test.labels)))[:singles] if singles else range(len(test.labels))
        hits = [re.findall(r"\d", _answer(model, processor, f"<image>\n{QUESTIONS[0]}", [paths[i]], 4))[:1]
                == [str(test.labels[i])] for i in order]
        result["single"], result["n_single"] = float(np.mean(hits)), len(hits)
        for n in lengths:
            count = sequences.get(n, 0)
            if not count:
                continue
            correct = total = 0
            found = []
            for _ in range(count):
                frames = read_sequence(test.labels, n, rng)
                truth = "".join(str(test.labels[i]) for i in frames)
                got = "".join(re.findall(r"\d", _answer(model, processor, frames_prompt(n) + READ_QUESTION,
                                                        [paths[i] for i in frames], n + 2)))
                correct += sum(a == b for a, b in zip(got, truth))
                total += n
                frames, digit, k = find_sequence(test.labels, n, rng)
                got = re.findall(r"\d+", _answer(model, processor, frames_prompt(n) + FIND_QUESTION.format(digit=digit),
                                                 [paths[i] for i in frames], 5))
                found.append(got[:1] == [str(k)])
            result[f"read@{n}"], result[f"find@{n}"] = correct / total, float(np.mean(found))
            result[f"n_seq@{n}"] = count
    return result
