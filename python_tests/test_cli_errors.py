"""Every error a user can cause is one line naming the problem (and the file), exit status 2 -- never a
traceback (issue 11, item 9); the context length and --prompt-file (item 7); silent wrong input is
reported (item 10)."""
import io
import json
import os
import shutil
import struct
import zlib

import pytest
import torch

from _utils import two_shard_checkpoint
from vita_ext.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny checkpoint of two shards (56-px tiles) with only 96 positions, so context limits are cheap."""
    path = two_shard_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", max_positions=96)
    assert os.path.exists(path / "model.safetensors.index.json")
    return path


def _one_line_error(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("vita-ext: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _broken(model, tmp_path, change):
    path = tmp_path / "broken"
    shutil.copytree(model, path)
    change(path)
    return path


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _shard(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


BROKEN_MODELS = {
    "shard truncated by half": (lambda p: _truncate(p / _shard(p)), ["checkpoint shard", "model-00001-of-", "truncated"]),
    "config.json is a list": (lambda p: (p / "config.json").write_text("[1, 2]"), ["config.json: expected a JSON object"]),
    "hidden_size is a string": (lambda p: _edit_config(p, hidden_size="64"),
                                ["config.json: field 'hidden_size' must be an integer, got '64'"]),
    "num_attention_heads 0": (lambda p: _edit_config(p, num_attention_heads=0),
                              ["config.json: field 'num_attention_heads' must be positive, got 0"]),
    "unknown architecture": (lambda p: _edit_config(p, architectures=["LlamaForCausalLM"]),
                             ["field 'architectures' must be ['LongVITAForCausalLM'], got ['LlamaForCausalLM']"]),
    "index without weight_map": (lambda p: (p / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                                 ["model.safetensors.index.json: expected an object with a 'weight_map'"]),
    "index escapes the directory": (lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}})), ["is not a file name inside the checkpoint"]),
    "config.json not UTF-8": (lambda p: (p / "config.json").write_bytes(b'{"\xff": 1}'), ["config.json: not valid JSON"]),
    "processor_config.json not UTF-8": (lambda p: (p / "processor_config.json").write_bytes(b'{"\xff": 1}'),
                                        ["processor_config.json: not valid JSON"]),
    "generation_config.json not UTF-8": (lambda p: (p / "generation_config.json").write_bytes(b'{"\xff": 1}'),
                                         ["generation_config.json: not valid JSON"]),
    "vocab.json garbage": (lambda p: (p / "vocab.json").write_text('{"a": "b"}'), ["cannot load the tokenizer files"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_broken_checkpoint_is_one_line(model, tmp_path, capsys, case):
    change, needles = BROKEN_MODELS[case]
    path = _broken(model, tmp_path, change)
    line = _one_line_error(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "1"], capsys,
                           *needles)
    assert str(path) in line  # the file (or directory) is named


def _bomb(path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)) +
                     chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_user_errors_of_generate(model, tmp_path, capsys):
    _bomb(tmp_path / "bomb.png")
    base = ["generate", "--model", str(model), "--max-new-tokens", "1"]
    _one_line_error([*base, "--image", str(tmp_path / "bomb.png"), "--prompt", "x"], capsys, "bomb.png",
                    "exceeds limit")
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # argv of a Latin-1 terminal
    _one_line_error([*base, "--prompt", bad], capsys, "--prompt is not valid UTF-8", "\\xe9")
    _one_line_error([*base, "--prompt", "x", "--device", "tpu"], capsys, "--device must be cpu, cuda or cuda:N", "tpu")
    _one_line_error([*base, "--prompt", "x", "--max-tiles", "100000"], capsys, "--max-tiles must be in [1, 4096]")
    _one_line_error([*base, "--prompt", "x", "--max-frames", "1000000000"], capsys, "--max-frames must be in [1, 262144]")
    _one_line_error([*base, "--prompt", "x", "--top-p", "nan"], capsys, "'top_p' must be in (0, 1]")
    _one_line_error([*base, "--prompt", "x", "--seed", str(2**70)], capsys, "--seed must be in")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    _one_line_error([*base, "--prompt-file", str(tmp_path / "latin1.txt")], capsys, "latin1.txt: not valid UTF-8")
    _one_line_error([*base, "--prompt-file", str(tmp_path / "absent.txt")], capsys, "--prompt-file", "absent.txt")
    gen = json.loads((model / "generation_config.json").read_text())
    broken = _broken(model, tmp_path, lambda p: (p / "generation_config.json").write_text(json.dumps(dict(gen, top_k="20"))))
    _one_line_error(["generate", "--model", str(broken), "--prompt", "x"], capsys, "generation_config.json",
                    "'top_k' must be int")


def test_user_errors_of_other_commands(model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line_error(["random-checkpoint", str(tmp_path / "file")], capsys, "exists and is not a directory")
    _one_line_error(["random-checkpoint", str(tmp_path / "r"), "--layers", "100000000"], capsys,
                    "--layers must be in [1, 1024]")
    (tmp_path / "d.jsonl").write_text("{}\n")
    _one_line_error(["train", "--data", str(tmp_path / "d.jsonl"), "--model", str(model), "--out", str(tmp_path / "file")],
                    capsys, "--out", "exists and is not a directory")
    _one_line_error(["train", "--data", str(tmp_path / "d.jsonl"), "--model", str(model), "--out", str(tmp_path / "o"),
                     "--device", "tpu"], capsys, "'device' must be cpu, cuda or cuda:N")
    _one_line_error(["train", "--data", str(tmp_path / "d.jsonl"), "--model", str(model), "--out", str(tmp_path / "o"),
                     "--seq-len", "100000"], capsys, "'seq_len' 100000 exceeds the model's max_position_embeddings 96")


# ----------------------------------------------------------------- item 7: context and prompt-file
def test_context_length(model, tmp_path, capsys):
    long_text = "seven " * 120  # ~120 tokens: more than the model's 96 positions
    _one_line_error(["generate", "--model", str(model), "--prompt", long_text], capsys,
                    "more than the limit of 96 (the model's max_position_embeddings)")
    prompt = "one two three four five six seven eight"  # ~20 tokens with the chat template
    _one_line_error(["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", "90"], capsys,
                    "exceeds the model's max_position_embeddings 96", "use --max-new-tokens")
    # without --max-new-tokens the checkpoint's default (1024) is lowered to what fits, with a note
    assert main(["generate", "--model", str(model), "--prompt", prompt, "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "note: max_new_tokens lowered from 1024 to" in err and "of the model's 96 positions" in err


def test_prompt_file_and_stdin(model, tmp_path, capsys, monkeypatch):
    text = "Describe it.\n" * 20000  # 260k characters: more than one command-line argument may hold
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    _one_line_error(["generate", "--model", str(model), "--prompt-file", str(tmp_path / "p.txt")], capsys,
                    "the input would be", "more than the limit of 96")  # it was read: now it is too long
    (tmp_path / "short.txt").write_bytes("\ufeffWhich digit?".encode("utf-8"))  # a BOM is dropped
    common = ["generate", "--model", str(model), "--max-new-tokens", "3", "--temperature", "0"]
    assert main([*common, "--prompt-file", str(tmp_path / "short.txt")]) == 0
    from_file = capsys.readouterr().out
    assert main([*common, "--prompt", "Which digit?"]) == 0
    assert capsys.readouterr().out == from_file
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Which digit?")))
    assert main([*common, "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == from_file
    with pytest.raises(SystemExit):  # argparse: --prompt and --prompt-file exclude each other
        main([*common, "--prompt", "a", "--prompt-file", "-"])


def test_library_generate_checks_the_context(model):
    from vita_ext.generation import generate
    from vita_ext.model.long_vita import LongVITAForCausalLM

    m = LongVITAForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"the prompt \(90 tokens\) \+ max_new_tokens \(7\) exceed .* \(96\)"):
        generate(m, torch.ones(1, 90, dtype=torch.long), max_new_tokens=7)
