"""`cifar-onnx classify`: the folder walk, row formats, output file, exit codes and privacy.

Runs the command through click's CliRunner and as a real subprocess, on a folder of
awkward files and the colour-probe model.
"""

import csv
import io
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnx_models import build_color_probe
from serving.cli import classify
from serving.walk import collect_image_paths

# Rows of the awkward folder in sorted path order: (path, label or None, error or None).
EXPECTED_ROWS = [
    ("photos/Blue.JPG", "bird", None),
    ("photos/broken/cut.jpg", None, "image file is truncated"),
    ("photos/broken/empty.jpg", None, "empty file (0 bytes)"),
    ("photos/broken/notes.jpg", None, "not an image format that Pillow can decode"),
    ("photos/nested/deeper/green.jpeg", "automobile", None),
    ("photos/nested/white.PNG", "cat", None),
    ("photos/red.png", "airplane", None),
]
SUMMARY = "classified 4, failed 3, skipped 4 (2 hidden, 2 other)"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_color_probe(tmp_path_factory.mktemp("model") / "probe.onnx")


def make_awkward_folder(root):
    """Create root/photos with good, broken, hidden, non-image and looping entries."""
    photos = root / "photos"
    (photos / "nested" / "deeper").mkdir(parents=True)
    (photos / "broken").mkdir()
    (photos / ".git").mkdir()

    Image.new("RGB", (32, 32), (255, 0, 0)).save(photos / "red.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(photos / "Blue.JPG", format="JPEG", quality=100)
    Image.new("RGB", (64, 48), (0, 255, 0)).save(photos / "nested" / "deeper" / "green.jpeg", quality=100)
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(photos / "nested" / "white.PNG")  # transparent -> white

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "whole.jpg")
    data = (photos / "whole.jpg").read_bytes()
    (photos / "whole.jpg").unlink()
    (photos / "broken" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (photos / "broken" / "empty.jpg").write_bytes(b"")
    (photos / "broken" / "notes.jpg").write_text("not a picture\n")

    Image.new("RGB", (32, 32)).save(photos / ".hidden.png")
    Image.new("RGB", (32, 32)).save(photos / ".git" / "inside.png")
    (photos / "readme.txt").write_text("skipped\n")
    (photos / "nested" / "loop").symlink_to("..", target_is_directory=True)
    return photos


@pytest.fixture
def awkward(tmp_path, monkeypatch):
    make_awkward_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_classify(*args, env=None):
    return CliRunner().invoke(classify, [str(a) for a in args], env=env)


def parse_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_walk_sorts_skips_and_survives_loop(awkward):
    collected = collect_image_paths(["photos"])
    assert [str(p) for p in collected.images] == [row[0] for row in EXPECTED_ROWS]
    assert collected.skipped_hidden == 2
    assert collected.skipped_other == 2  # readme.txt and the loop back to photos/
    assert collected.unreadable == {}


def test_walk_without_recursion(awkward):
    collected = collect_image_paths(["photos"], recursive=False)
    assert [str(p) for p in collected.images] == ["photos/Blue.JPG", "photos/red.png"]
    assert collected.skipped_other == 3  # broken/, nested/ and readme.txt


def test_walk_keeps_named_files_and_rejects_special_files(awkward):
    shutil.copy("photos/red.png", "photo.data")
    os.mkfifo("pipe.jpg")
    collected = collect_image_paths(["photo.data", "pipe.jpg", "photos/red.png", "photos/red.png"])
    assert [str(p) for p in collected.images] == ["photo.data", "photos/red.png"]
    assert collected.unreadable == {Path("pipe.jpg"): "not a regular file"}


def test_csv_rows_for_awkward_folder(awkward, model_path):
    result = run_classify("photos", "--model", model_path, "--format", "csv")
    assert result.exit_code == 1, result.output
    rows = parse_csv(result.stdout)
    assert [row["path"] for row in rows] == [path for path, _, _ in EXPECTED_ROWS]
    for row, (path, label, error) in zip(rows, EXPECTED_ROWS):
        if label is not None:
            assert row["label"] == label, path
            assert row["error"] == ""
            assert 0.0 < float(row["probability"]) <= 1.0
        else:
            assert row["label"] == row["probability"] == row["index"] == ""
            assert row["error"].startswith(error), path
    assert SUMMARY in result.stderr
    assert "CPUExecutionProvider" in result.stderr


def test_jsonl_rows_carry_top_k(awkward, model_path):
    result = run_classify("photos", "--model", model_path, "--format", "jsonl", "--top-k", "3")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(EXPECTED_ROWS)
    red = rows[-1]
    assert red["path"] == "photos/red.png"
    assert red["label"] == "airplane"
    assert red["index"] == 0
    assert [entry["label"] for entry in red["top_k"]][0] == "airplane"
    assert len(red["top_k"]) == 3
    assert rows[2] == {"path": "photos/broken/empty.jpg", "error": "empty file (0 bytes)"}


def test_csv_top_k_columns(awkward, model_path):
    result = run_classify("photos/red.png", "--model", model_path, "--format", "csv", "--top-k", "2")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    assert header == "path,label,index,probability,label_2,probability_2,error"
    (row,) = parse_csv(result.stdout)
    assert row["label"] == "airplane"
    assert row["label_2"] == "cat"


def test_table_format(awkward, model_path):
    result = run_classify("photos", "--model", model_path, "--top-k", "2")
    lines = result.stdout.splitlines()
    width = len("photos/nested/deeper/green.jpeg")
    assert lines[0].split() == ["path", "label", "probability", "top-2"]
    assert lines[3] == f"{'photos/broken/empty.jpg':<{width}}  error: empty file (0 bytes)"
    assert lines[-1].startswith(f"{'photos/red.png':<{width}}  airplane ")
    assert len(lines) == 1 + len(EXPECTED_ROWS)


def test_all_readable_exits_zero(awkward, model_path):
    result = run_classify("photos/nested/deeper", "photos/red.png", "--model", model_path, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert [row["label"] for row in parse_csv(result.stdout)] == ["automobile", "airplane"]


def test_small_batches_keep_row_order(awkward, model_path):
    result = run_classify("photos", "--model", model_path, "--format", "csv", "--batch-size", "2")
    assert [row["path"] for row in parse_csv(result.stdout)] == [path for path, _, _ in EXPECTED_ROWS]


def test_special_file_gets_error_row(awkward, model_path):
    os.mkfifo("pipe.jpg")
    result = run_classify("pipe.jpg", "photos/red.png", "--model", model_path, "--format", "csv")
    assert result.exit_code == 1
    rows = parse_csv(result.stdout)
    assert [(row["path"], row["error"]) for row in rows] == [("photos/red.png", ""), ("pipe.jpg", "not a regular file")]


def test_model_from_environment(awkward, model_path):
    result = run_classify("photos/red.png", env={"CIFAR_ONNX_MODEL": str(model_path)})
    assert result.exit_code == 0, result.output
    assert "airplane" in result.stdout


def test_output_written_atomically(awkward, model_path):
    result = run_classify("photos", "--model", model_path, "--format", "csv", "--output", "rows.csv")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "wrote rows.csv" in result.stderr
    assert len(parse_csv(Path("rows.csv").read_text())) == len(EXPECTED_ROWS)
    assert sorted(p.name for p in awkward.iterdir()) == ["photos", "rows.csv"]


def test_existing_output_needs_force(awkward, model_path):
    Path("rows.csv").write_text("keep me\n")
    refused = run_classify("photos/red.png", "--model", model_path, "--output", "rows.csv")
    assert refused.exit_code == 2
    assert "rows.csv exists; pass --force to overwrite it" in refused.stderr
    assert Path("rows.csv").read_text() == "keep me\n"

    forced = run_classify("photos/red.png", "--model", model_path, "--output", "rows.csv", "--force")
    assert forced.exit_code == 0, forced.output
    assert "airplane" in Path("rows.csv").read_text()


def test_failed_model_leaves_no_output(awkward):
    Path("bad.onnx").write_text("not a model")
    result = run_classify("photos", "--model", "bad.onnx", "--output", "rows.csv")
    assert result.exit_code != 0
    assert sorted(p.name for p in awkward.iterdir()) == ["bad.onnx", "photos"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["photos"], "Missing option '--model'"),
        (["missing.jpg", "--model", "{model}"], "'missing.jpg' does not exist"),
        (["photos", "--model", "{model}", "--top-k", "11"], "11 is more than the model's 10 classes"),
        (["photos", "--model", "{model}", "--top-k", "0"], "0 is not in the range x>=1"),
        (["photos", "--model", "{model}", "--format", "xml"], "'xml' is not one of 'table', 'csv', 'jsonl'"),
        (["photos", "--model", "{model}", "--provider", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["photos", "--model", "{model}", "--output", "no/such/rows.csv"], "does not exist"),
        (["--model", "{model}"], "Missing argument 'PATHS...'"),
    ],
    ids=["no-model", "missing-path", "top-k-too-big", "top-k-zero", "format", "provider", "output-folder", "no-paths"],
)
def test_usage_errors_exit_2(awkward, model_path, args, message):
    result = run_classify(*[a.format(model=model_path) for a in args], env={"CIFAR_ONNX_MODEL": None})
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def run_cli(*args, cwd, env=None):
    """Run `cifar-onnx` as the installed console entry point would, in a subprocess."""
    command = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_subprocess_run_matches_rows(awkward, model_path):
    result = run_cli("classify", "photos", "--model", model_path, "--format", "csv", cwd=awkward)
    assert result.returncode == 1, result.stderr
    rows = parse_csv(result.stdout)
    assert [(row["path"], row["label"] or None) for row in rows] == [(p, label) for p, label, _ in EXPECTED_ROWS]
    assert SUMMARY in result.stderr


def test_subprocess_cuda_request_fails_in_one_line(awkward, model_path):
    probe = run_cli("classify", "photos/red.png", "--model", model_path, "--provider", "auto", cwd=awkward)
    if "CUDAExecutionProvider" in probe.stderr.splitlines()[-1]:
        pytest.skip("CUDA works on this machine")
    result = run_cli("classify", "photos/red.png", "--model", model_path, "--provider", "cuda", cwd=awkward)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: CUDA was requested but onnxruntime could not initialise CUDAExecutionProvider")


def test_progress_bar_on_terminal(awkward, model_path):
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "pipeline.cli", "classify", "photos", "--model", str(model_path)]
    process = subprocess.run(command, cwd=awkward, stdout=subprocess.PIPE, stderr=terminal, timeout=300)
    os.close(terminal)
    written = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # Linux raises EIO once the terminal side is closed and drained
            break
        if not chunk:
            break
        written += chunk
    os.close(controller)
    assert process.returncode == 1
    stderr = written.decode()
    assert "\rclassifying: 7/7 images" in stderr
    assert "images/s" in stderr


def test_no_files_outside_output_and_no_connections(tmp_path, model_path):
    """With telemetry off, classify touches neither HOME nor the working folder."""
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    make_awkward_folder(work)
    shutil.copy(model_path, work / "model.onnx")
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    env = {key: value for key, value in os.environ.items() if key not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    env["HOME"] = str(home)
    work.chmod(0o555)
    try:
        command = [sys.executable, "-m", "pipeline.cli", "classify", "photos", "--model", "model.onnx"]
        trace = tmp_path / "trace.txt"
        if shutil.which("strace"):
            command = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=300)
    finally:
        work.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "airplane" in result.stdout
    assert list(home.iterdir()) == []
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before
    if trace.exists():
        connects = [line for line in trace.read_text().splitlines() if "connect(" in line]
        assert [line for line in connects if "AF_UNIX" not in line] == []


def test_odd_names_links_and_formats(tmp_path, model_path, monkeypatch):
    odd = tmp_path / "odd"
    (odd / "folder.jpg").mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 255, 0)).save(odd / "folder.jpg" / "inside.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(odd / "png_inside.jpg", format="PNG")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(odd / "b.bmp")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(odd / 'naïve, "quoted".webp')
    (odd / "dangling.png").symlink_to("missing.png")
    (odd / "vector.png").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>\n')
    monkeypatch.chdir(tmp_path)

    result = run_classify("odd", "--model", model_path, "--format", "csv")
    assert result.exit_code == 1, result.output
    rows = [(row["path"], row["label"], row["error"]) for row in parse_csv(result.stdout)]
    assert rows == [
        ("odd/b.bmp", "bird", ""),
        ("odd/dangling.png", "", "file not found"),
        ("odd/folder.jpg/inside.png", "automobile", ""),
        ('odd/naïve, "quoted".webp', "airplane", ""),
        ("odd/png_inside.jpg", "automobile", ""),
        ("odd/vector.png", "", "not an image format that Pillow can decode"),
    ]
