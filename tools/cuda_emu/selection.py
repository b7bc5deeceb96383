"""Which tests run through the CUDA emulation tier -- the one place to update.

In emulation mode (``VITA_EXT_CUDA_EMU=<library>``, set by run.py) python_tests/conftest.py keeps, from
the files below, every test instance that takes the ``device`` fixture with ``device == "cuda"``: exactly
what would run on a GPU. That instance gets a CPU device with the emulated CUDA kernels serving it. New
tests that use the ``device`` fixture are picked up with no change here; a new op's test file is added to
TEST_FILES. Tests that cannot run emulated are listed in EXCLUDE with the reason.
"""
from __future__ import annotations

# The project's tests whose "cuda" instances run the CUDA kernels (all five ops and the simulated ring).
TEST_FILES = [
    "python_tests/test_attention_lse.py",
    "python_tests/test_merge_attention.py",
    "python_tests/test_masked_lm_head.py",
    "python_tests/test_masked_linear_cross_entropy.py",
    "python_tests/test_pixel_shuffle_projector.py",
    "python_tests/test_parallel.py",
]

# The emulator's own tests (run with the same library, not filtered by the device rule).
EMULATOR_TESTS = [
    "tools/cuda_emu/tests/test_emulator.py",
    "tools/cuda_emu/tests/test_side_by_side.py",
]

# nodeid substring -> why it cannot run emulated. (The cuda_device fixture's tests -- a CPU and a CUDA
# tensor in one call -- skip by themselves: emulation has one device.)
EXCLUDE: dict[str, str] = {}


def wanted(nodeid: str, params: dict) -> tuple[bool, str]:
    """(keep, reason if not) for one collected test in emulation mode."""
    path = nodeid.split("::", 1)[0]
    if any(path.endswith(f.split("/", 1)[1]) or path == f for f in EMULATOR_TESTS):
        return True, ""
    for pattern, why in EXCLUDE.items():
        if pattern in nodeid:
            return False, why
    if params.get("device") != "cuda":
        return False, "not a CUDA instance"
    return True, ""
