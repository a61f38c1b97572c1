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


def test_the_wheel_carries_every_file_the_product_reads(tmp_path):
    """Besides modules: the playground's page, the kernels' C source, the models' config files."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "relay/playground/index.html",
        "relay/playground/playground.js",
        "relay/playground/playground.css",
        "local_node/kernels/cpu_kernels.c",
        "local_node/testing/qwen_files/configs/Qwen3-TTS-12Hz-0.6B-Base.json",
        "local_node/testing/qwen_files/common/vocab.json",
    ):
        assert needed in names, needed
