"""The predictor installs and runs without any framework: a fresh virtualenv with the [cpu] extra only.

Builds the package from a copy of this working tree (so the build writes nothing into
the repository) with pip's usual configuration, then runs `cifar-onnx classify` and
the embedding example there.
"""

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from onnx_models import build_color_probe

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
# Build outputs, environments and caches that must not travel into the copy.
NOT_COPIED = (".git", ".venv", "artifacts", "build", "data", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory):
    """Return the bin folder of a new virtualenv holding cifar-onnx[cpu] and nothing else."""
    root = tmp_path_factory.mktemp("serving-venv")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{source}[cpu]"],
        capture_output=True, text=True, timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv / "bin"


@pytest.fixture
def clean_env(tmp_path):
    """Environment for the venv's processes: its own HOME, no cache override, no project on PYTHONPATH."""
    home = tmp_path / "home"
    home.mkdir()
    drop = ("XDG_CACHE_HOME", "PYTHONPATH", "VIRTUAL_ENV", "ORT_DISABLE_TELEMETRY")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env["HOME"] = str(home)
    return env


def run_in(bin_folder, args, cwd, env):
    return subprocess.run([str(bin_folder / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_frameworks_are_absent(serving_venv, tmp_path, clean_env):
    for module in ("torch", "tensorflow", "onnx"):
        result = run_in(serving_venv, ["python", "-c", f"import {module}"], tmp_path, clean_env)
        assert result.returncode != 0, f"{module} is importable in the serving venv"
        assert "ModuleNotFoundError" in result.stderr
    code = "import importlib.metadata as m; print(m.version('onnxruntime'))"
    result = run_in(serving_venv, ["python", "-c", code], tmp_path, clean_env)
    assert result.stdout.strip() == "1.31.1", result.stderr


def test_classify_in_serving_venv(serving_venv, tmp_path, clean_env):
    model = build_color_probe(tmp_path / "model.onnx")
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (300, 200), (0, 0, 255)).save(images / "more" / "blue.JPG", quality=95)
    (images / "broken.jpg").write_bytes(b"")

    result = run_in(serving_venv, ["cifar-onnx", "classify", "images", "--model", str(model), "--format", "csv"],
                    tmp_path, clean_env)
    assert result.returncode == 1, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["path"], row["label"], row["error"]) for row in rows] == [
        ("images/broken.jpg", "", "empty file (0 bytes)"),
        ("images/more/blue.JPG", "bird", ""),
        ("images/red.png", "airplane", ""),
    ]
    assert "classified 2, failed 1" in result.stderr
    assert "CPUExecutionProvider" in result.stderr
    assert list(Path(clean_env["HOME"]).iterdir()) == []


def test_cuda_request_fails_with_cpu_runtime(serving_venv, tmp_path, clean_env):
    model = build_color_probe(tmp_path / "model.onnx")
    Image.new("RGB", (32, 32)).save(tmp_path / "black.png")
    result = run_in(serving_venv, ["cifar-onnx", "classify", "black.png", "--model", str(model), "--provider", "cuda"],
                    tmp_path, clean_env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: CUDA was requested but this onnxruntime build has no CUDAExecutionProvider")


def test_embedding_example_runs(serving_venv, tmp_path, clean_env):
    model = build_color_probe(tmp_path / "model.onnx")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "green.png")
    code = (
        "from serving import Predictor\n"
        f"predictor = Predictor({str(model)!r})\n"
        "for prediction in predictor.predict(['green.png'], top_k=3):\n"
        "    print(prediction.label, round(prediction.probability, 3), len(prediction.top_k))\n"
    )
    result = run_in(serving_venv, ["python", "-c", code], tmp_path, clean_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "automobile"
    assert result.stdout.split()[2] == "3"
