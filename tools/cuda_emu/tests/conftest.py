"""The emulator's own tests need the emulation library: $VITA_EXT_CUDA_EMU (run.py sets it) or the
default plain build. Without it they skip."""
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent.parent / "python_tests"))

import cuda_emu  # noqa: E402

COMPARISONS = {"side_by_side": 0}


@pytest.fixture(scope="session")
def emu():
    path = cuda_emu.library_path()
    if not path.exists():
        pytest.skip(f"no emulation library at {path} (python tools/cuda_emu/build.py)")
    cuda_emu.load(path)
    return cuda_emu


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("VITA_EXT_TEST_SEED", "0")))
    yield


def pytest_terminal_summary(terminalreporter):
    if COMPARISONS["side_by_side"]:
        terminalreporter.write_line(f"cuda_emu: {COMPARISONS['side_by_side']} side-by-side comparisons")
    report = os.environ.get("VITA_EXT_CUDA_EMU_REPORT")
    if report:
        import json

        with open(report, "w") as f:
            json.dump({"comparisons": dict(COMPARISONS), "stats": cuda_emu.stats() if cuda_emu._loaded else {}}, f)
