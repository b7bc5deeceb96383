"""Shared fixtures. Nothing here touches a GPU at import time: CUDA availability is asked only when a
test that wants the "cuda" device runs, and such tests skip cleanly without one.

CUDA emulation mode (tools/cuda_emu, set up by `python tools/cuda_emu/run.py`): with VITA_EXT_CUDA_EMU
naming the emulation library, the "cuda" instances of the `device` fixture run on CPU tensors served by
the real CUDA kernels (csrc/cuda compiled for the host), and only those run (tools/cuda_emu/selection.py).
"""
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_EMU_LIB = os.environ.get("VITA_EXT_CUDA_EMU")
_emu = None
if _EMU_LIB:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cuda_emu"))
    import _utils
    import cuda_emu as _emu
    import selection as _emu_selection

    _emu.load(_EMU_LIB)
    # attention_lse would serve CPU tensors with PyTorch's flash kernels; the emulation is there to run
    # vita_ext's own CUDA kernels, so every attention call without an explicit backend goes to them.
    os.environ["VITA_EXT_ATTENTION_BACKEND"] = "vita"
    _COMPARISONS = {"assert_2x_rule": 0, "assert_close": 0}

    def _counted(name, fn):
        def wrapper(*args, **kwargs):
            _COMPARISONS[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    # Count the comparisons the emulated kernels face (the test modules import these after this runs).
    _utils.assert_2x_rule = _counted("assert_2x_rule", _utils.assert_2x_rule)
    torch.testing.assert_close = _counted("assert_close", torch.testing.assert_close)

    def pytest_collection_modifyitems(config, items):
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            (keep if _emu_selection.wanted(item.nodeid, params)[0] else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_terminal_summary(terminalreporter):
        st = _emu.stats()
        total = sum(_COMPARISONS.values())
        lines = [f"cuda_emu: {total} comparisons ({_COMPARISONS['assert_2x_rule']} assert_2x_rule, "
                 f"{_COMPARISONS['assert_close']} assert_close) over {sum(st['ops'].values())} emulated op calls; "
                 f"{st['launches']} launches ({st['launch_errors']} rejected) of {len(st['kernels'])} kernel "
                 f"instantiations, {st['blocks']} blocks, {st['threads']} threads, {st['switches']} fiber switches, "
                 f"{st['gemms']} GEMMs"]
        terminalreporter.write_sep("-", "CUDA emulation")
        for line in lines:
            terminalreporter.write_line(line)
        report = os.environ.get("VITA_EXT_CUDA_EMU_REPORT")
        if report:
            import json

            with open(report, "w") as f:
                json.dump({"comparisons": dict(_COMPARISONS), "stats": st}, f, indent=1)


def emulating() -> bool:
    """Whether this run serves the "cuda" tests with the emulated CUDA kernels (tools/cuda_emu)."""
    return _emu is not None


def cuda_ok() -> bool:
    import vita_ext

    return bool(vita_ext.build_info()["cuda"]) and torch.cuda.is_available()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and _emu is not None:
        order, seed = _emu.order_for(request.node.nodeid)
        with _emu.serving(order=order, seed=seed):  # CPU tensors, served by the emulated CUDA kernels
            yield torch.device("cpu")
        return
    if request.param == "cuda" and not cuda_ok():
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    yield torch.device(request.param)


@pytest.fixture
def cuda_device():
    if _emu is not None:
        pytest.skip("mixes CPU and CUDA tensors: CUDA emulation has a single (CPU) device")
    if not cuda_ok():
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs, replayable failures.
    # crc32, not hash(): hash() is salted per process. VITA_EXT_TEST_SEED draws another set of inputs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("VITA_EXT_TEST_SEED", "0")))
    yield
