"""The digits recipe: scikit-learn's handwritten digits through Long-VITA's four stages on CPU.

Data. ``load_digits`` (1797 grey 8x8 images, values 0..16) is split per class into a training and a
held-out test set (20%, seeded). Each digit becomes a 56x56 RGB PNG (dark ink on white, bicubic
upsampling): with 14-px patches that is a 4x4 patch grid and 4 LLM tokens after the pixel shuffle,
so one image costs 6 tokens (``<img>``, 4 x ``<IMG_CONTEXT>``, ``</img>``).

Tasks (all in the release JSONL format, media paths relative to the file):
- stage 0, text only:      "seven\\nDescribe the image." -> "a handwritten 7", "seven\\nWhich digit
  is this?" -> "7". Long-VITA starts from a pretrained Qwen2.5 and aligns the projector to it in
  stage 1; no pretrained LLM exists at this size, so this short language stage gives ours the
  knowledge stage 1 aligns to (which word names which digit, how to caption and answer). It trains
  the LLM only; no image is involved.
- stage 1, captions:       "<image>\\nDescribe the image."           -> "a handwritten 7"
- stage 2, single images:  "<image>\\nWhich digit is this?" (and rephrasings) -> "7"
- stages 3-4, frames: N images, each after its 1-based number: "1<image>2<image>...N<image>\\n" then
  "Read the digits in order." -> the N digits ("7302..."), or
  "Which frame shows a 3?" -> "12" (exactly one frame shows that digit).
  Stage 3 uses N in {2, 4, 16, 64}, stage 4 N in {16, 64, 256}. Stage-2 data (single-image questions)
  is mixed in at the paper's ratio of 0.1, which we read as 10% of the supervised tokens (the loss
  is a per-supervised-token average, so that is 10% of the training signal; 10% of the records
  would be ~1% of it, since a 256-frame answer has 258 supervised tokens and a single-image one 3).

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

IMAGE_SIZE = 56
QUESTIONS = ("Which digit is this?", "What digit is shown?", "What number is written here?", "Which digit do you see?")
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Write a caption for this image.")
READ_QUESTION = "Read the digits in order."
FIND_QUESTION = "Which frame shows a {digit}?"
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                     "do_sample": False, "temperature": 0.0, "repetition_penalty": 1.0, "top_k": 0, "top_p": 1.0,
                     "max_new_tokens": 300}


def digits_config():
    """The shipped model: the real Qwen2.5 vocabulary (152064 rows) tied between embedding and head,
    hidden 32, 4 decoder layers (4 query / 2 KV heads of dim 16), a 2-layer 32-wide ViT on 56-px tiles.
    The tied embedding is ~4.9M of its ~5.0M parameters (~9.8 MB in bf16)."""
    from vita_ext.model.config import LongVITAConfig, TextConfig, VisionConfig
    from vita_ext.model.presets import QWEN2_VOCAB

    return LongVITAConfig(
        text=TextConfig(vocab_size=QWEN2_VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True),
        vision=VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=IMAGE_SIZE, patch_size=14))


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


def to_image(pixels: np.ndarray) -> Image.Image:
    """8x8 values in 0..16 -> a 56x56 RGB image, dark ink on white."""
    grey = (255 - pixels.astype(np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")


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


# ----------------------------------------------------------------------------------- records
def _record(user: str, answer: str, images: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": images}


def frames_prompt(n: int) -> str:
    return "".join(f"{k + 1}<image>" for k in range(n)) + "\n"


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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


def stage_records(stage: int, paths: list[str], labels: np.ndarray, sizes: dict[int, int], seed: int = 0,
                  stage2_ratio: float = 0.1) -> list[dict]:
    """Training records of a stage. sizes: for stages 3-4, {N frames: records per task}; for stages
    0-2, {0: repeats of the training images}. stage2_ratio: share of the supervised tokens of stages
    3-4 that come from single-image questions."""
    rng = random.Random(seed * 1000 + stage)
    records: list[dict] = []
    if stage == 0:
        for _ in range(sizes.get(0, 1)):
            records += [text_record(int(d), rng) for d in labels]
    elif stage == 1:
        for _ in range(sizes.get(0, 1)):
            records += [caption_record(p, int(d), rng) for p, d in zip(paths, labels)]
    elif stage == 2:
        for _ in range(sizes.get(0, 1)):
            records += [qa_record(p, int(d), rng) for p, d in zip(paths, labels)]
        records += [caption_record(p, int(d), rng) for p, d in zip(paths, labels) if rng.random() < 0.2]
    else:
        for n, count in sizes.items():
            for _ in range(count):
                records.append(read_record(paths, labels, read_sequence(labels, n, rng)))
                frames, digit, k = find_sequence(labels, n, rng)
                records.append(find_record(paths, frames, digit, k))
        long_tokens = sum(supervised_tokens(r) for r in records)
        extra = round(stage2_ratio / (1 - stage2_ratio) * long_tokens / QA_SUPERVISED)
        for _ in range(extra):
            i = rng.randrange(len(paths))
            records.append(qa_record(paths[i], int(labels[i]), rng))
    rng.shuffle(records)
    return records


QA_SUPERVISED = 3  # "7" + "<|im_end|>" + "\n"


def supervised_tokens(record: dict) -> int:
    """Supervised tokens of a digits record: its answer (one token per digit here; the captions'
    words are single tokens too) plus "<|im_end|>" and "\n"."""
    answer = record["messages"][-1]["content"]
    return (len(answer) if answer.isdigit() else len(answer.split()) + 1) + 2


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
