"""Fuzzing the processor and the CLI's input paths (issue 11): random bytes and mutated real files as
images, videos, config.json, the shard index, generation_config.json and training JSONL, random sizes
and flags. Every case must end within a time bound with a correct result or one clear error -- never a
traceback, a hang or a crash. The cases run in a separate worker process (_fuzz_worker.py) so that a
crash or a hang is caught and named, not fatal to pytest.

Example counts: VITA_EXT_FUZZ_EXAMPLES scales them (default 1 = the CI budget; e.g. 20 for a long run);
inputs are derandomized (reproducible in CI) unless VITA_EXT_FUZZ_RANDOM=1.
"""
import io
import json
import os
import select
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _utils import two_shard_checkpoint
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("VITA_EXT_FUZZ_EXAMPLES", "1"))
CASE_SECONDS = 60  # per case: far above what any case needs, far below a hang
RUN = {"count": 0}


def _settings(n, shrink=True):
    """n examples (times SCALE); shrink=False for slow cases (a failure is reported as drawn)."""
    phases = [p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, phases=phases,
                    derandomize=os.environ.get("VITA_EXT_FUZZ_RANDOM") != "1",
                    suppress_health_check=list(HealthCheck))


class Worker:
    def __init__(self):
        self.proc = None

    def start(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "_fuzz_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)

    def run(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_SECONDS)
        if not ready:
            self.proc.kill()
            self.proc = None
            raise AssertionError(f"hang: no answer within {CASE_SECONDS} s to {request}")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            raise AssertionError(f"crash: the worker died (status {code}) on {request}")
        RUN["count"] += 1
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()
    print(f"\n[fuzz] {RUN['count']} cases ran")


# ---------------------------------------------------------------------------------- file makers
IMAGE_MODES = ["RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "LA"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP",
         b"\x00\x00\x00\x18ftypmp42", b"\x1aE\xdf\xa3", b"RIFF\x00\x00\x00\x00AVI "]


def _image_bytes(mode, w, h, fmt, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (h, w), np.uint16))
    for f in (fmt, "TIFF", "PNG"):  # the first format that can store this mode
        buf = io.BytesIO()
        try:
            (image if f != "PNG" else image.convert("RGB")).save(buf, format=f)
            return buf.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    raise AssertionError(mode)


@st.composite
def mutated(draw, data: bytes):
    """Flip, cut, splice or repeat bytes of real file data."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 64)):] if draw(st.booleans()) else data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=32))
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 200))] * draw(st.integers(1, 4))
    return bytes(data)


@st.composite
def image_file(draw):
    kind = draw(st.sampled_from(["valid", "mutated", "random"]))
    if kind == "random":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=400))
    size = draw(st.sampled_from([(1, 1), (3, 700), (700, 2), (56, 56), (97, 61), (300, 200)]))
    data = _image_bytes(draw(st.sampled_from(IMAGE_MODES)), *size, draw(st.sampled_from(FORMATS)),
                        draw(st.integers(0, 99)))
    return data if kind == "valid" else draw(mutated(data))


def _video_bytes(kind, frames, w, h):
    import av

    rng = np.random.default_rng(frames * 7 + w)
    buf = io.BytesIO()
    if kind == "gif":
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for _ in range(frames)]
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=[50, 0, 300][frames % 3])
        return buf.getvalue()
    fmt = {"mp4": "mp4", "avi": "avi", "mkv": "matroska"}[kind]
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=[1, 10, 30][frames % 3])
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@st.composite
def video_file(draw):
    kind = draw(st.sampled_from(["valid", "mutated", "random"]))
    if kind == "random":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=600))
    data = _video_bytes(draw(st.sampled_from(["mp4", "avi", "mkv", "gif"])), draw(st.integers(1, 12)),
                        draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 48])))
    return data if kind == "valid" else draw(mutated(data))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=12)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------------- checks
def _ok_result(r, req):
    """A result is correct: pixels finite and of the tile size, one context position per context token,
    every position on a context token, T per tile, tiles within the limits."""
    t = r["tokens_per_tile"]
    assert r["pixel_shape"] == [3, 56, 56] and r["finite"], r
    assert r["positions"] == r["context_tokens"] == r["tiles"] * t and r["positions_ok"], r
    per_image = (req.get("max_tiles") or 12) + 1
    per_video = req.get("max_frames") or 128
    assert r["tiles"] <= per_image * len(req.get("images", [])) + per_video * len(req.get("videos", [])), r
    if req.get("max_length") is not None:
        assert r["length"] <= req["max_length"], r


def _one_error(answer, req, *allowed):
    assert "escaped" not in answer, f"traceback on {req}:\n{answer['escaped']}"
    if "error" in answer:
        assert "\n" not in answer["error"].strip(), answer["error"]
        if allowed:
            assert any(a in answer["error"] for a in allowed), (answer["error"], req)
    return "error" in answer


def _cli_ok(answer, req):
    assert "escaped" not in answer, f"traceback escaped main() on {req['argv']}:\n{answer['escaped']}"
    err = answer["stderr"]
    assert "Traceback" not in err, f"traceback on {req['argv']}:\n{err}"
    assert answer["rc"] in (0, 2), (answer["rc"], req["argv"], err)
    if answer["rc"] == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, (req["argv"], err)
    others = [line for line in err.splitlines() if line.strip() and not line.startswith(
        ("vita-ext: error:", "vita-ext: warning:", "[vita-ext", "usage:", "vita-ext ", "  ", "encoding tiles",
         "video frames"))]  # the last two: progress bars of many tiles / frames
    assert not others, (req["argv"], err)


# --------------------------------------------------------------------------------- the fuzzers
@_settings(150)
@given(images=st.lists(image_file(), max_size=2), videos=st.lists(video_file(), max_size=1),
       max_tiles=st.one_of(st.none(), st.integers(-3, 40), st.just(10**6)),
       max_frames=st.one_of(st.none(), st.integers(-2, 20), st.just(10**9)),
       max_length=st.one_of(st.none(), st.integers(0, 3000)), tags=st.booleans(),
       text=st.text(max_size=30))
def test_fuzz_processor(worker, tmp_path_factory, images, videos, max_tiles, max_frames, max_length, tags, text):
    root = tmp_path_factory.mktemp("p")
    req = {"kind": "processor", "images": [_write(root / f"i{k}", d) for k, d in enumerate(images)],
           "videos": [_write(root / f"v{k}", d) for k, d in enumerate(videos)], "max_tiles": max_tiles,
           "max_frames": max_frames, "max_length": max_length,
           "text": ("<image>" * len(images) + "<video>" * len(videos) if tags else "") + text}
    answer = worker.run(req)
    if not _one_error(answer, req):
        _ok_result(answer["result"], req)
    shutil.rmtree(root)


@_settings(60)
@given(lines=st.lists(st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot"]),
         "content": st.one_of(st.text(max_size=20), st.just("<image>\n7"), st.just("<video>"), json_values)}),
        max_size=3), "images": st.one_of(st.lists(st.sampled_from(["a.png", "b.png", "../x", "/etc/passwd"]),
                                                  max_size=2), json_values)}).map(lambda r: json.dumps(r).encode())),
    max_size=8), image=image_file())
def test_fuzz_training_data(worker, tmp_path_factory, lines, image):
    root = tmp_path_factory.mktemp("d")
    _write(root / "a.png", image)
    Image.new("RGB", (56, 56), (3, 4, 5)).save(root / "b.png")
    _write(root / "d.jsonl", b"\n".join(lines) + b"\n")
    req = {"kind": "data", "path": str(root / "d.jsonl")}
    answer = worker.run(req)
    assert "escaped" not in answer and "error" not in answer, (lines, answer.get("escaped") or answer.get("error"))
    r = answer["result"]
    assert r["good"] + r["bad"] == r["records"], r  # every record is either usable or counted
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return two_shard_checkpoint(tmp_path_factory.mktemp("base") / "m", max_positions=4096)


CHECKPOINT_FILES = ["config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer_config.json",
                    "vocab.json", "first shard", "last shard"]


@_settings(30, shrink=False)
@given(target=st.sampled_from(CHECKPOINT_FILES), how=st.sampled_from(["random", "mutated", "json", "field"]),
       data=st.data(), flags=st.lists(st.sampled_from([
           ("--max-tiles", st.integers(-2, 5000)), ("--max-frames", st.integers(-2, 300000)),
           ("--temperature", st.floats(allow_nan=True)), ("--top-p", st.floats(-1, 2)), ("--top-k", st.integers(-5, 50)),
           ("--repetition-penalty", st.floats(-2, 3)), ("--max-new-tokens", st.integers(-3, 4)),
           ("--dtype", st.sampled_from(["bf16", "fp64", "float16", "x"])), ("--seed", st.integers(-5, 2**70))]),
           max_size=3, unique_by=lambda f: f[0]), image=st.one_of(st.none(), image_file()))
def test_fuzz_cli_generate(worker, base_model, tmp_path_factory, target, how, data, flags, image):
    root = tmp_path_factory.mktemp("c")
    model = root / "m"
    model.mkdir()
    if target.endswith("shard"):
        shards = sorted(n for n in os.listdir(base_model) if n.endswith(".safetensors"))
        target = shards[0] if target.startswith("first") else shards[-1]
    for name in os.listdir(base_model):
        if name != target:
            os.symlink(base_model / name, model / name)
    original = (base_model / target).read_bytes()
    if how == "random":
        new = data.draw(st.binary(max_size=300))
    elif how == "mutated":
        new = data.draw(mutated(original))
    elif how == "json":
        new = json.dumps(data.draw(json_values)).encode()
    else:  # one field of a JSON file replaced by any JSON value (the shard: a header field)
        try:
            content = json.loads(original)
            key = data.draw(st.sampled_from(sorted(content))) if isinstance(content, dict) and content else None
            if key is not None:
                content[key] = data.draw(json_values)
            new = json.dumps(content).encode()
        except ValueError:
            new = data.draw(mutated(original[:2000])) + original[2000:]
    _write(model / target, new)
    argv = ["generate", "--model", str(model), "--prompt", "Which digit?", "--max-new-tokens", "2"]
    if image is not None:
        argv += ["--image", _write(root / "x.png", image)]
    for flag, strategy in flags:
        argv += [flag, str(data.draw(strategy))]
    req = {"kind": "cli", "argv": argv}
    _cli_ok(worker.run(req), req)
    shutil.rmtree(root)


@_settings(8, shrink=False)
@given(lines=st.lists(st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode())),
                      max_size=4),
       flags=st.lists(st.sampled_from(["--seq-len=1", "--seq-len=64", "--max-frames=0", "--max-tiles=99999",
                                       "--grad-accum=0", "--epochs=1e9", "--lr=-1", "--keep-last=-2",
                                       "--save-dtype=fp8", "--resume=auto", "--device=tpu"]), max_size=2),
       metrics=st.binary(max_size=200))
def test_fuzz_cli_train_and_plot(worker, base_model, tmp_path_factory, lines, flags, metrics):
    root = tmp_path_factory.mktemp("t")
    good = {"messages": [{"role": "user", "content": "Which digit?"}, {"role": "assistant", "content": "7"}]}
    _write(root / "d.jsonl", b"\n".join([json.dumps(good).encode(), *lines]) + b"\n")
    (root / "out").mkdir()
    _write(root / "out" / "metrics.jsonl", metrics)
    req = {"kind": "cli", "argv": ["train", "--stage", "1", "--data", str(root / "d.jsonl"), "--model", str(base_model),
                                   "--out", str(root / "out"), "--max-steps", "1", "--seq-len", "48", "--no-progress",
                                   "--dtype", "fp32", *flags]}
    _cli_ok(worker.run(req), req)
    req = {"kind": "cli", "argv": ["plot-train", str(root / "out"), "--out", str(root / "loss.png")]}
    _cli_ok(worker.run(req), req)
    shutil.rmtree(root)


def test_fuzz_prompt_bytes(worker):
    """Any bytes on stdin as --prompt-file -: a result or one line."""
    for data in [b"\xff\xfe", "é".encode("latin-1") * 10, b"\x00" * 5, "<image>".encode(), b"<video><video>",
                 "<|im_start|><IMG_CONTEXT>".encode(), "\u2028\ufeff ok".encode()]:
        req = {"kind": "cli", "argv": ["generate", "--prompt-file", "-", "--max-new-tokens", "1"],
               "stdin": data.decode("utf-8", "surrogateescape")}
        _cli_ok(worker.run(req), req)
