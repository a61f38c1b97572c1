import sys
from pathlib import Path

# tests/harness.py is imported by name from the test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_sessionfinish(session, exitstatus):
    """No relay or node outlives the run, whatever a test left behind."""
    from harness import Process

    for process in Process.started:
        process.kill()
