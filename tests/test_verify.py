"""Verify: passes on honest exports and fails, naming the check, on every planted fault.

A verification that cannot fail is worthless. Each fault below is a real defect
(a tampered weight, wrong normalisation, swapped channels, dropout left on, a
transfer that skips a transpose), and each must turn a passing report into a
failing one that names the check it broke.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import faults
from conftest import run_cli

pytestmark = pytest.mark.slow
SAMPLES = 200  # test images per verify run; enough for the faults, short on 2 cores


@pytest.fixture(scope="module")
def exported_out(trained_out):
    """Out folder with both frameworks of cnn-3block trained briefly and exported."""
    out = trained_out("torch", "cnn-3block")
    assert trained_out("keras", "cnn-3block") == out
    for framework in ("torch", "keras"):
        result = run_cli("export", "--framework", framework, "--out", out)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def copied_out(exported_out, tmp_path):
    """A private copy of the exported folder that a test may damage."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").symlink_to((exported_out / "data").resolve(), target_is_directory=True)
    for framework in ("torch", "keras"):
        shutil.copytree(exported_out / framework, out / framework)
    return out


def _verify(shared_tarball, out, *options, env=None):
    return run_cli("verify", "--data", shared_tarball, "--out", out, "--samples", SAMPLES, *options, env=env)


def _report(out):
    return json.loads((out / "verify.json").read_text())


def _failed(out):
    return _report(out)["failed"]


def test_verify_passes_on_honest_exports(shared_tarball, copied_out):
    result = _verify(shared_tarball, copied_out)

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = _report(copied_out)
    assert report["passed"] is True
    assert report["failed"] == []
    names = [check["name"] for check in report["checks"]]
    for expected in ("torch: export contract", "keras: export contract",
                     f"torch: logits, {SAMPLES} test images", f"keras: probabilities, {SAMPLES} test images",
                     "torch: logits, 7 edge inputs, batch 7 and 1", "keras: top-1 agreement, test images",
                     "torch: test accuracy, export vs framework",
                     f"transfer torch -> keras: logits, {SAMPLES} test + 7 edge images",
                     f"transfer keras -> torch: logits, {SAMPLES} test + 7 edge images"):
        assert expected in names
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(report["checks"])
    assert all(line.startswith("PASS") for line in lines)
    markdown = (copied_out / "verify.md").read_text()
    assert "PASSED" in markdown
    assert "onnxruntime" in report["environment"]
    assert len(report["files_sha256"]) == 4


def _assert_fails_naming(result, out, check_name):
    assert result.returncode == 1, result.stdout
    failed = _failed(out)
    assert check_name in failed, failed
    assert f"FAIL  {check_name}" in result.stdout
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error:")
    assert check_name in last


def test_verify_catches_perturbed_weight(shared_tarball, copied_out):
    faults.perturb_first_conv_weight(str(copied_out / "keras" / "model.onnx"))

    result = _verify(shared_tarball, copied_out, "--framework", "keras")

    _assert_fails_naming(result, copied_out, f"keras: logits, {SAMPLES} test images")


def test_verify_catches_changed_normalisation(shared_tarball, copied_out):
    faults.change_normalisation_mean(str(copied_out / "torch" / "model.onnx"))

    result = _verify(shared_tarball, copied_out, "--framework", "torch")

    _assert_fails_naming(result, copied_out, f"torch: logits, {SAMPLES} test images")
    _assert_fails_naming(result, copied_out, f"transfer torch -> keras: logits, {SAMPLES} test + 7 edge images")


def test_verify_catches_bgr_channels(shared_tarball, copied_out):
    faults.swap_channels_to_bgr(str(copied_out / "keras" / "model.onnx"))

    result = _verify(shared_tarball, copied_out, "--framework", "keras")

    _assert_fails_naming(result, copied_out, f"keras: logits, {SAMPLES} test images")


def test_verify_catches_training_mode_export(shared_tarball, copied_out):
    # Re-export in training mode (dropout active) without the exporter's own check.
    code = ("from exporters import torch_onnx; "
            f"torch_onnx.export_onnx({str(copied_out / 'torch' / 'model.pt')!r}, "
            f"{str(copied_out / 'torch' / 'model.onnx')!r}, training=True, check=False)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

    result = _verify(shared_tarball, copied_out, "--framework", "torch")

    # onnxruntime's inference build runs Dropout and BatchNormalization as in
    # inference whatever their training_mode, so the outputs may still match: the
    # graph check is what catches this fault.
    _assert_fails_naming(result, copied_out, "torch: export contract")
    contract = next(c for c in _report(copied_out)["checks"] if c["name"] == "torch: export contract")
    assert "Dropout" in contract["detail"]


def test_verify_catches_transfer_without_dense_transpose(shared_tarball, copied_out, tmp_path):
    # sitecustomize runs in every Python process started with this PYTHONPATH, so the
    # verify workers load a transfer that leaves the square 128x128 dense kernel
    # untransposed: the shapes still fit, only the numbers are wrong.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        from pipeline import transfer
        _transpose = transfer.dense_kernel_to_keras
        transfer.dense_kernel_to_keras = lambda kernel: kernel if kernel.shape[0] == kernel.shape[1] else _transpose(kernel)
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}

    result = _verify(shared_tarball, copied_out, "--framework", "torch", env=env)

    _assert_fails_naming(result, copied_out, f"transfer torch -> keras: logits, {SAMPLES} test + 7 edge images")
    assert f"torch: logits, {SAMPLES} test images" not in _failed(copied_out)


def test_verify_without_exports_names_the_fix(shared_tarball, tmp_path):
    result = run_cli("verify", "--data", shared_tarball, "--out", tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: nothing to verify")
    assert "cifar-onnx export" in result.stderr


def test_verify_reports_unreadable_export(shared_tarball, copied_out):
    (copied_out / "torch" / "model.onnx").write_text("not an ONNX file")

    result = _verify(shared_tarball, copied_out, "--framework", "torch")

    assert "Traceback" not in result.stderr
    _assert_fails_naming(result, copied_out, "torch: export contract")
    _assert_fails_naming(result, copied_out, "transfer torch -> keras: both exports run")


def test_verify_rejects_other_dataset(copied_out, tmp_path):
    from PIL import Image

    # A two-class dataset the model was not trained on.
    for split in ("train", "test"):
        for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            folder = tmp_path / "other" / split / name
            folder.mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")

    result = run_cli("verify", "--data", tmp_path / "other", "--out", copied_out, "--framework", "torch")

    _assert_fails_naming(result, copied_out, "torch: class names of the data = export's")
    _assert_fails_naming(result, copied_out, "torch: data fingerprint = training's")
