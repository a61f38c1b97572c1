import sys
from pathlib import Path

import pytest

# tests/harness.py is imported by name from the test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Each test module's kind, for a quick loop (./test.sh -m unit): "system" modules start real relay
# and node processes (or an in-process uvicorn server), "model" modules load Qwen3-TTS checkpoints or
# build our kernels; the rest are "unit": pure functions and sans-I/O state, a few seconds in all.
SYSTEM = {
    "test_api_errors",
    "test_drain",
    "test_e2e_sdk",
    "test_flow_control",
    "test_fuzz_http",
    "test_fuzz_live",
    "test_fuzz_voices",
    "test_limits",
    "test_playground",
    "test_live",
    "test_liveness",
    "test_metrics",
    "test_packaging",
    "test_tunnel",
    "test_voice_store",
    "test_voices",
}
MODEL = {"test_codec_stream", "test_cpu_kernels", "test_generation", "test_int8", "test_tiny_model"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker("system" if module in SYSTEM else "model" if module in MODEL else "unit")


# Kernel tiers this run exercised or skipped, told at the end: an all-skipped kernel suite must show.
TIERS_RUN: set[str] = set()
TIERS_SKIPPED: dict[str, str] = {}


def kernel_tiers() -> list[str]:
    """Every tier with a build of its own on this architecture (amx runs avx512_bf16's build)."""
    from local_node.kernels import cpu_kernels

    return [t for t in cpu_kernels.machine_tiers() or ("avx2",) if t != "amx"]


@pytest.fixture(scope="session", params=kernel_tiers())
def kernels(request):
    """One tier's kernels; tests using it run once per tier and skip the tiers this CPU lacks."""
    from local_node.kernels import cpu_kernels

    found = cpu_kernels.kernels(request.param)
    if found is None:
        TIERS_SKIPPED[request.param] = "this CPU or compiler cannot run it"
        pytest.skip(f"the {request.param} kernels do not run here")
    TIERS_RUN.add(request.param)
    return found


def pytest_terminal_summary(terminalreporter):
    if TIERS_RUN or TIERS_SKIPPED:
        from local_node.kernels import cpu_kernels

        ran = ", ".join(sorted(TIERS_RUN)) or "NONE"
        skipped = "; ".join(f"{t} ({why})" for t, why in sorted(TIERS_SKIPPED.items())) or "none"
        terminalreporter.write_line(f"kernel tiers exercised: {ran}; skipped: {skipped}; the node's: {cpu_kernels.active_tier()}")


def pytest_sessionfinish(session, exitstatus):
    """No relay or node outlives the run, whatever a test left behind."""
    from harness import Process

    for process in Process.started:
        process.kill()
