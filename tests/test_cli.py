"""The command group: it starts without the frameworks and lists every stage."""

import subprocess
import sys


def test_group_lists_every_stage():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for command in ("data", "train", "export", "verify", "classify", "bench"):
        assert command in result.stdout


def test_group_imports_no_framework():
    code = (
        "import sys, pipeline.cli; "
        "heavy = [m for m in ('torch', 'tensorflow', 'onnxruntime', 'onnx') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
