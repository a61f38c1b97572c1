"""The relay installs and runs without the node's heavy dependencies."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_ONLY = {"torch", "av", "numpy", "transformers", "qwen_tts", "yaml"}


def test_relay_imports_none_of_the_node_dependencies():
    code = f"import sys, relay.__main__; loaded = {NODE_ONLY!r} & set(sys.modules); assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_base_install_requires_none_of_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_") for dep in project["dependencies"]}
    assert not names & NODE_ONLY
    assert {"torch", "qwen_tts", "av", "pyyaml"} <= {
        d.split(">")[0].split("=")[0].strip().replace("-", "_") for d in project["optional-dependencies"]["node"]
    }
