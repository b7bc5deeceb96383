"""Training under faults and hostile files (issue 11): checkpoints are never unpickled, a kill at any
step of a checkpoint save or a metrics append loses nothing (the resumed run equals an uninterrupted
one, loss curve and final weights), torn metrics files are tolerated, a non-UTF-8 data line is one
bad record, and skipped checkpoints are reported. Kills are real SIGKILLs of forked processes
(``_faults.run_to_kill``), at every file-system step, counted."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from _faults import in_parallel, run_to_kill
from vita_ext.model.checkpoint import write_random_checkpoint
from vita_ext.model.long_vita import LongVITAForCausalLM
from vita_ext.model.presets import tiny
from vita_ext.train import BadRecordWarning, JsonlDataset, Trainer, latest_checkpoint, resolve_config, validate
from vita_ext.train import checkpoint as ckpt
from vita_ext.train.plot import MetricsWarning, read_metrics

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill harness forks")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny(image_size=56, layers=1, hidden=32)
    cfg.text.tie_word_embeddings = True
    write_random_checkpoint(root / "model", cfg, dtype=torch.float32, seed=0)
    (root / "img").mkdir()
    records = []
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()).convert("RGB").resize(
            (56, 56), Image.NEAREST).save(root / "img" / f"{i}.png")
        records.append({"messages": [{"role": "user", "content": "<image>\nWhich digit is this?"},
                                     {"role": "assistant", "content": str(i)}], "images": [f"img/{i}.png"]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _cfg(workdir, out, **kw):
    base = dict(stage=1, data=str(workdir / "data.jsonl"), model=str(workdir / "model"), out=str(out), seq_len=80,
                max_steps=3, save_every=2, keep_last=1, dtype="fp32", lr=3e-3, warmup_ratio=0.0, progress=False)
    base.update(kw)
    return resolve_config(base)


def _losses(out):
    return [r["loss"] for r in read_metrics(str(out))]


def _weights(path):
    return LongVITAForCausalLM.from_pretrained(str(path)).state_dict()


# ------------------------------------------------------------------------ item 1: no unpickling
class _Payload:
    """Unpickling this creates a directory: harmless, and visible if it ever ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "trainer_state.pt"])
def test_checkpoint_never_unpickles(workdir, tmp_path, name, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(workdir, out, max_steps=1)).train()
    path = out / "checkpoint-1"
    marker = str(tmp_path / "payload-ran")
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path / name)
    manifest = json.loads((path / "trainer_state.json").read_text())
    manifest["files"][name] = os.path.getsize(path / name)  # a consistent, crafted checkpoint
    (path / "trainer_state.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="refused, because loading it could run code"):
        Trainer(_cfg(workdir, out, max_steps=1, resume="auto")).train()
    assert not os.path.exists(marker)
    from vita_ext.cli import main

    assert main(["train", "--stage", "1", "--data", str(workdir / "data.jsonl"), "--model", str(workdir / "model"),
                 "--out", str(out), "--max-steps", "1", "--resume", "auto", "--no-progress", "--seq-len", "80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vita-ext: error: checkpoint file") and name in err[-1]
    assert not os.path.exists(marker)


def test_rng_state_round_trips_without_pickle():
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    state = ckpt.rng_state()
    want = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    ckpt.set_rng_state(state)
    assert (torch.equal(torch.rand(3), want[0]) and random.random() == want[1] and np.random.rand() == want[2]
            and np.random.randn() == want[3])


# ----------------------------------------------------------------- item 5: the save protocol
def test_resave_killed_between_the_two_renames_keeps_the_checkpoint(workdir, tmp_path):
    """The report: checkpoint-N saved again, killed after it was moved aside and before the new one
    moved in. Both copies used to be deleted at the next start (and with keep_last 1, all progress)."""
    out = tmp_path / "run"
    trainer = Trainer(_cfg(workdir, out, max_steps=1, keep_last=1))
    trainer.train()
    before = (out / "checkpoint-1" / "optimizer.pt").read_bytes()
    _, steps = run_to_kill(lambda: trainer.save(), str(out))  # a complete re-save, to count its steps
    at = steps.index("rename checkpoint-1")  # the second rename: the new copy moves in
    assert steps[at - 1].startswith("rename .checkpoint-1.") and steps[at - 1].endswith(".old/c")
    killed, _ = run_to_kill(lambda: trainer.save(), str(out), kill_at=at + 1)
    assert killed and not (out / "checkpoint-1").exists()  # killed between the renames
    with pytest.warns(ckpt.CheckpointWarning, match="restored"):
        restored, _ = ckpt.recover(str(out))
    assert restored == ["checkpoint-1"] and validate(str(out / "checkpoint-1"))["step"] == 1
    assert len(before) == len((out / "checkpoint-1" / "optimizer.pt").read_bytes())
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


def test_save_protocol_kill_at_every_step(workdir, tmp_path):
    """save_checkpoint over an existing checkpoint-N (plus pruning with keep_last 1), SIGKILLed before
    each of its steps and with each written file torn in half: after recovery there is always a
    complete checkpoint-N, the old or the new one, and never a leftover."""
    out = tmp_path / "run"
    trainer = Trainer(_cfg(workdir, out, max_steps=2, save_every=1, keep_last=0))
    trainer.train()  # checkpoint-1 and checkpoint-2 exist
    trainer.cfg.keep_last = 1
    trainer.step = 2
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    _, steps = run_to_kill(lambda: trainer.save(), str(out))
    kinds = {"rename", "rmtree", "mkdtemp", "replace"}
    cases = [(k, False) for k in range(1, len(steps) + 1)]
    cases += [(k, True) for k, s in enumerate(steps, 1) if s.split()[0] not in kinds]
    for kill_at, torn in cases:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        killed, _ = run_to_kill(lambda: trainer.save(), str(out), kill_at=kill_at, torn=torn)
        assert killed, (kill_at, torn)
        ckpt.recover(str(out))
        assert validate(str(out / "checkpoint-2"))["step"] == 2, (kill_at, torn, steps[kill_at - 1])
        assert latest_checkpoint(str(out)).endswith("checkpoint-2")
        assert [n for n in os.listdir(out) if n.startswith(".")] == [], (kill_at, torn)
    assert len(cases) >= 20  # every step was reached: what was measured


# ------------------------------------------------------------------------ item 6: metrics files
def test_torn_metrics_line_and_fresh_start(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(workdir, out, max_steps=2, save_every=1)).train()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    # a run killed while appending step 3's row: a torn last line, which used to stop --resume auto
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n" + rows[-1][:17])
    resumed = Trainer(_cfg(workdir, out, max_steps=3, save_every=1, resume="auto"))
    resumed.train()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    # --resume auto with nothing to resume starts the curve again (rows used to appear twice)
    shutil.rmtree(out / "checkpoint-3")
    shutil.rmtree(out / "checkpoint-2") if (out / "checkpoint-2").exists() else None
    Trainer(_cfg(workdir, out, max_steps=2, save_every=0, resume="auto")).train()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]] == [1, 2]
    # a bad line in the middle is dropped with a warning naming the file and the line
    text = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(text[0] + "\n{broken\n" + text[1] + "\n")
    with pytest.warns(MetricsWarning, match="metrics.jsonl line 2"):
        assert [r["step"] for r in read_metrics(str(out))] == [1, 2]


# ------------------------------------------------------------------- item 8: a non-UTF-8 line
def test_non_utf8_line_is_one_bad_record(workdir, tmp_path):
    lines = (workdir / "data.jsonl").read_bytes().splitlines()
    bad = lines[1].replace(b"Which", b"Wh\xffich")
    (tmp_path / "img").symlink_to(workdir / "img")
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join([lines[0], bad, b"", *lines[2:]]) + b"\n")
    from vita_ext.processing import LongVITAProcessor

    ds = JsonlDataset(tmp_path / "d.jsonl", LongVITAProcessor.from_pretrained(str(workdir / "model")))
    assert len(ds) == 5 and ds.encode(0) is not None  # the BOM does not break the first record
    with pytest.warns(BadRecordWarning, match=r"d.jsonl line 2, record 1: skipped \(invalid_utf8: byte \d+ \(b'\\xff'\)"):
        assert ds.encode(1) is None
    assert ds.report.counts() == {"invalid_utf8": 1} and ds.encode(2).index == 2
    assert ds.line_numbers == [1, 2, 4, 5, 6]
    with pytest.warns(BadRecordWarning):
        summary = Trainer(_cfg(workdir, tmp_path / "out", data=str(tmp_path / "d.jsonl"), max_steps=None)).train()
    assert summary["bad_records"] == {"invalid_utf8": 1}


# -------------------------------------------------------- item 10: skipped checkpoints are said
def test_corrupt_checkpoint_is_skipped_with_a_warning(workdir, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(workdir, out, max_steps=2, save_every=1, keep_last=0)).train()
    with open(out / "checkpoint-2" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.warns(ckpt.CheckpointWarning, match=r"skipping .*checkpoint-2: .* is corrupt: model.safetensors has 100"):
        assert latest_checkpoint(str(out)).endswith("checkpoint-1")


# ------------------------------------------------------ the fault test: kill at every step, resume
def every_step_scenario(workdir, tmp_path) -> dict:
    """The body of the test below, run in a fresh interpreter: forking a process that has already
    run autograd (as pytest has, by then) leaves the children unable to run backward."""
    from vita_ext.processing import LongVITATokenizer

    _ = LongVITATokenizer.default()._file_texts  # parsed and serialised once, inherited by every fork
    reference = tmp_path / "reference"
    fresh = Trainer(_cfg(workdir, reference))
    _, steps = run_to_kill(lambda: fresh.train(), str(reference))
    want_losses, want_weights = _losses(reference), _weights(reference / "final")
    cases = [(k, False) for k in range(1, len(steps) + 1)]
    cases += [(k, True) for k, s in enumerate(steps, 1) if s.startswith("append") or "trainer_state.json" in s]
    resume = Trainer(_cfg(workdir, tmp_path / "unused", resume="auto"))

    def case(kill_at, torn):
        def job():  # in its own process: kill a run, resume it in a fresh one, compare
            out = tmp_path / f"k{kill_at}{'t' if torn else ''}"
            fresh.cfg.out = resume.cfg.out = str(out)
            assert run_to_kill(lambda: fresh.train(), str(out), kill_at=kill_at, torn=torn)[0]
            run_to_kill(lambda: resume.train(), str(out))
            where = (kill_at, torn, steps[kill_at - 1])
            assert _losses(out) == want_losses, where
            got = _weights(out / "final")
            assert all(torch.equal(got[k], want_weights[k]) for k in want_weights), where
            assert latest_checkpoint(str(out)).endswith("checkpoint-3"), where
            shutil.rmtree(out)
        return job

    in_parallel(case(k, torn) for k, torn in cases)
    return {"steps": steps, "cases": len(cases), "torn": sum(t for _, t in cases)}


def test_training_killed_at_every_step_resumes_exactly(workdir, tmp_path):
    """A 3-step run (checkpoints at 2 and 3, keep_last 1, then final) SIGKILLed before every one of its
    file-system steps -- metrics appends, every file of every save, renames, pruning, the final model
    -- and torn in half at every metrics append and manifest; then `--resume auto` to the end. The
    loss curve and the final weights must equal the uninterrupted run's, bit for bit."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, __file__, str(workdir), str(tmp_path)], capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-5000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    kinds = {s.split()[0] for s in summary["steps"]}
    assert {"append", "mkdtemp", "safetensors", "replace", "write", "torch.save", "rename", "rmtree"} <= kinds
    assert len(summary["steps"]) >= 40 and summary["cases"] >= 50, summary


if __name__ == "__main__":  # the scenario above, in a fresh process (see every_step_scenario)
    import pathlib
    import sys

    print(json.dumps(every_step_scenario(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))))
