"""`cifar-onnx train` end to end: outputs, falling loss, resume after SIGTERM, and every bad input.

Each run is a subprocess of the real CLI on a small JPEG folder cut from the shared
tarball, so torch and tensorflow never load into the pytest process.
"""

import csv
import json
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.recipe import Recipe, learning_rate_at, steps_per_epoch
from serving.contract import CIFAR10_CLASSES

REPOSITORY = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]
TRAIN_PER_CLASS = 60  # 600 training images: enough for --limit 512
TEST_PER_CLASS = 20
OUTPUTS = {"torch": ("model.pt", "history.csv", "metrics.json", "curves.png"),
           "keras": ("model.keras", "model.json", "history.csv", "metrics.json", "curves.png")}


@pytest.fixture(scope="session")
def tiny_cifar(shared_tarball, tmp_path_factory):
    """A folder train/<class>/*.jpg, test/<class>/*.jpg with the first images of each class in the tarball."""
    root = tmp_path_factory.mktemp("tiny-cifar")
    quota = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
    taken = {}
    with tarfile.open(shared_tarball) as archive:
        for member in archive:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4 or parts[1] not in quota:
                continue
            key = parts[1:3]
            if taken.get(key, 0) >= quota[parts[1]]:
                continue
            taken[key] = taken.get(key, 0) + 1
            target = root / Path(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            if len(taken) == 2 * len(CIFAR10_CLASSES) and all(
                count >= quota[split] for (split, _), count in taken.items()
            ):
                break
    return root


def _train(*arguments, out, data=None, check=False):
    command = [*CLI, "train", *arguments, "--out", str(out)]
    if data is not None:
        command += ["--data", str(data)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as file:
        return list(csv.DictReader(file))


def _error_line(result):
    """Return the `error: ...` line of stderr (the group prints exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("architecture", ["cnn-3block", "cnn-2block"])
def test_smoke_run_writes_outputs(framework, architecture, tiny_cifar, tmp_path):
    result = _train("--framework", framework, "--arch", architecture, "--limit", "512", "--epochs", "2",
                    out=tmp_path, data=tiny_cifar, check=True)
    run_dir = tmp_path / framework
    for name in OUTPUTS[framework]:
        assert (run_dir / name).is_file(), name

    history = _history(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2]
    assert float(history[1]["train_loss"]) < float(history[0]["train_loss"])

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["framework"] == framework
    assert metrics["architecture"] == architecture
    assert metrics["dataset_sizes"] == {"train": 461, "validation": 51, "test": 200}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["recipe"]["limit"] == 512
    assert metrics["class_names"] == list(CIFAR10_CLASSES)
    assert f"{metrics['parameter_count']:,} trainable parameters" in result.stderr
    assert "epoch   2/2 train_loss" in result.stderr
    assert "test accuracy" in result.stdout


@pytest.mark.slow
def test_torch_checkpoint_loads_weights_only(tiny_cifar, tmp_path):
    _train("--framework", "torch", "--limit", "100", "--epochs", "1", "--batch-size", "32",
           out=tmp_path, data=tiny_cifar, check=True)
    code = textwrap.dedent(f"""
        import torch
        checkpoint = torch.load({str(tmp_path / 'torch' / 'model.pt')!r}, weights_only=True)
        from pipeline.torch_model import load_checkpoint
        net, info = load_checkpoint({str(tmp_path / 'torch' / 'model.pt')!r}, "cnn-3block")
        print(sorted(checkpoint)[:3], info["architecture"], info["test_accuracy"] >= 0)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    assert "cnn-3block True" in result.stdout


def _interrupt_after_first_epoch(framework, data, out):
    """Start a 3-epoch run, send SIGTERM once the epoch 1 line appears; return (returncode, stderr)."""
    command = [*CLI, "train", "--framework", framework, "--limit", "512", "--epochs", "3",
               "--data", str(data), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               cwd=REPOSITORY)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stderr:
        lines.append(line)
        if line.startswith("epoch   1/3"):
            process.send_signal(signal.SIGTERM)
            break
        if time.monotonic() > deadline:
            break
    lines.extend(process.stderr)
    return process.wait(timeout=120), "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_resume_continues_after_sigterm(framework, tiny_cifar, tmp_path):
    returncode, stderr = _interrupt_after_first_epoch(framework, tiny_cifar, tmp_path)
    run_dir = tmp_path / framework
    assert returncode == 130, stderr
    kept = json.loads((run_dir / "last.json").read_text())["epoch"]
    assert kept in (1, 2)  # SIGTERM lands during epoch 2, or right after it on a slow machine
    assert f"interrupted: kept epoch {kept}" in stderr
    assert [int(row["epoch"]) for row in _history(run_dir)] == list(range(1, kept + 1))

    other = _train("--framework", framework, "--resume", "--arch", "cnn-2block", out=tmp_path, data=tiny_cifar)
    assert other.returncode == 1
    assert "trains 'cnn-3block', not 'cnn-2block'" in _error_line(other)

    resumed = _train("--framework", framework, "--resume", out=tmp_path, data=tiny_cifar, check=True)
    assert f"resume: continuing {run_dir} after epoch {kept}" in resumed.stderr
    assert f"epoch {kept + 1:3d}/3" in resumed.stderr
    assert "epoch   1/3" not in resumed.stderr
    history = _history(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3

    # The schedule resumed at the right step: each epoch's last batch used the rate of that step.
    recipe = Recipe(epochs=3, limit=512)
    steps = steps_per_epoch(metrics["dataset_sizes"]["train"], recipe.batch_size)
    for row in history:
        expected = learning_rate_at(int(row["epoch"]) * steps - 1, recipe.epochs * steps, recipe)
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-5), row["epoch"]


def test_unknown_architecture_exits_2(tmp_path):
    result = _train("--framework", "torch", "--arch", "resnet", out=tmp_path)
    assert result.returncode == 2
    assert "'cnn-3block', 'cnn-2block'" in result.stderr


def test_unknown_framework_exits_2(tmp_path):
    result = _train("--framework", "jax", out=tmp_path)
    assert result.returncode == 2
    assert "'torch', 'keras'" in result.stderr


def test_missing_framework_names_extra(tmp_path):
    # Hide torch from importlib's finder, as a machine without the [torch] extra would.
    code = textwrap.dedent("""
        import importlib.util, sys
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *rest: None if name == "torch" else find_spec(name, *rest)
        from pipeline.cli import main
        main()
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "--framework", "torch", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPOSITORY,
    )
    assert result.returncode == 1
    assert "pip install 'cifar-onnx[torch]'" in _error_line(result)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_resume_without_checkpoint(framework, tmp_path):
    result = _train("--framework", framework, "--resume", out=tmp_path)
    assert result.returncode == 1
    assert f"no interrupted {framework} run in {tmp_path / framework}" in _error_line(result)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_batch_larger_than_training_set(framework, tiny_cifar, tmp_path):
    result = _train("--framework", framework, "--limit", "100", "--batch-size", "128", out=tmp_path,
                    data=tiny_cifar)
    assert result.returncode == 1
    assert "--batch-size 128 is larger than the 90 training images" in _error_line(result)
    assert not (tmp_path / framework).exists()


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_mixed_precision_on_cpu_rejected(framework, tiny_cifar, tmp_path):
    result = _train("--framework", framework, "--device", "cpu", "--mixed-precision", "--limit", "100",
                    out=tmp_path, data=tiny_cifar)
    assert result.returncode == 1
    assert "--mixed-precision needs a GPU" in _error_line(result)


def test_mps_rejected_for_keras(tiny_cifar, tmp_path):
    result = _train("--framework", "keras", "--device", "mps", "--limit", "100", out=tmp_path, data=tiny_cifar)
    assert result.returncode == 1
    assert "--device mps is available for --framework torch only" in _error_line(result)


def test_train_help_shows_recipe_defaults():
    result = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # click wraps long help lines
    assert "Images per optimizer step. [default: 64;" in text
    assert "[default: cnn-3block]" in text
    assert "[default: crop-flip]" in text
    assert "--label-smoothing" in text
    assert "[default: 0.02; x>=0]" in text  # --weight-decay
    assert "[default: reflect]" in text  # --crop-fill


AUGMENT_SCRIPT = """
import json, sys
import numpy as np
from pipeline.recipe import Recipe

framework = sys.argv[1]
images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
if framework == "torch":
    from pipeline.torch_train import augment, torch
    torch.manual_seed(0)
    run = lambda recipe: augment(torch.from_numpy(images), recipe).numpy()
else:
    from pipeline.keras_train import Augmentation
    run = lambda recipe: Augmentation(recipe)(images, training=True).numpy()

def is_window(image, padded):
    windows = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    return any(np.array_equal(image, w) or np.array_equal(image, w[:, ::-1]) for w in windows)

def is_image_or_mirror(image, original):
    return np.allclose(image, original, atol=0.01) or np.allclose(image, original[:, ::-1], atol=0.01)

reflected = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
black = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
cropped = run(Recipe())
black_cropped = run(Recipe(crop_fill="black"))
still = Recipe(augment="flip-affine", rotation=0.0, zoom=0.0, translation=0.0)
unjittered = Recipe(augment="crop-flip-jitter", crop_padding=0, brightness=0.0, contrast=0.0)
print(json.dumps({
    "dtype": str(cropped.dtype),
    "shape": list(cropped.shape),
    "windows": all(is_window(cropped[i], reflected[i]) for i in range(16)),
    "black_windows": all(is_window(black_cropped[i], black[i]) for i in range(16)),
    "fills_differ": not all(is_window(cropped[i], black[i]) for i in range(16)),
    "moved": sum(not np.array_equal(cropped[i], images[i]) for i in range(16)),
    "affine_identity": all(is_image_or_mirror(out, image) for out, image in zip(run(still), images)),
    "jitter_identity": all(is_image_or_mirror(out, image) for out, image in zip(run(unjittered), images)),
    "affine_in_range": bool(np.all((run(Recipe(augment="flip-affine")) >= 0) & (run(Recipe(augment="flip-affine")) <= 255))),
}))
"""


def _script_result(script, framework):
    """Run `script` with `framework` as its argument in a fresh interpreter and parse its last line as JSON."""
    result = subprocess.run([sys.executable, "-c", script, framework], capture_output=True, text=True,
                            cwd=REPOSITORY, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_augmentation_policies(framework):
    checks = _script_result(AUGMENT_SCRIPT, framework)
    assert checks["dtype"] == "float32"
    assert checks["shape"] == [16, 32, 32, 3]
    assert checks["windows"]  # every crop-flip output is a 32x32 window of the reflect-padded image, maybe mirrored
    assert checks["black_windows"]  # the same with crop_fill="black" and a zero-padded image
    assert checks["fills_differ"]  # some default crop shows mirrored pixels, not black ones
    assert checks["moved"] >= 8  # offsets are random: most of 16 images move or flip
    assert checks["affine_identity"]  # zero rotation, zoom and shift leave the image (or its mirror)
    assert checks["jitter_identity"]  # zero brightness and contrast change nothing
    assert checks["affine_in_range"]


OPTIMIZER_SCRIPT = """
import json, sys
import numpy as np
from pipeline.recipe import Recipe

framework, total = sys.argv[1], 40
recipe = Recipe()
gradients = np.random.default_rng(0).normal(size=(total, 12)).astype(np.float32)
values = []
if framework == "torch":
    from pipeline.torch_train import make_optimizer, torch
    kernel = torch.nn.Parameter(torch.ones(2, 3))
    bias = torch.nn.Parameter(torch.ones(6))
    optimizer, scheduler = make_optimizer([kernel, bias], total, recipe)
    for gradient in gradients:
        kernel.grad = torch.from_numpy(gradient[:6].reshape(2, 3))
        bias.grad = torch.from_numpy(gradient[6:])
        optimizer.step()
        scheduler.step()
        values.append(kernel.detach().numpy().ravel().tolist() + bias.detach().numpy().tolist())
else:
    from pipeline.keras_train import keras, make_optimizer, tf
    kernel = keras.Variable(np.ones((2, 3), np.float32))
    bias = keras.Variable(np.ones(6, np.float32))
    optimizer = make_optimizer([kernel, bias], total, recipe)
    step = tf.function(lambda gradient: optimizer.apply_gradients(
        [(tf.reshape(gradient[:6], (2, 3)), kernel), (gradient[6:], bias)]))  # traced once
    for gradient in gradients:
        step(tf.constant(gradient))
        values.append(kernel.numpy().ravel().tolist() + bias.numpy().tolist())
print(json.dumps({"gradients": gradients.tolist(), "weights": values}))
"""


def _adam_reference(gradients, learning_rates, decay, beta1=0.9, beta2=0.999):
    """Return the weights after each step of Adam with decoupled weight decay, written out in numpy.

    All weights start at 1. `decay` gives each weight's decay rate: before each step the
    weight is multiplied by 1 - lr * decay, then Adam's update is applied.
    """
    weight = np.ones(gradients.shape[1])
    first = np.zeros_like(weight)
    second = np.zeros_like(weight)
    weights = []
    for step, (gradient, lr) in enumerate(zip(gradients, learning_rates), start=1):
        weight = weight * (1 - lr * decay)
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient**2
        weight = weight - lr * (first / (1 - beta1**step)) / np.sqrt(second / (1 - beta2**step))
        weights.append(weight)
    return np.array(weights)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_optimizer_follows_step_schedule(framework):
    run = _script_result(OPTIMIZER_SCRIPT, framework)
    gradients = np.array(run["gradients"])
    total = len(gradients)
    recipe = Recipe()
    learning_rates = [learning_rate_at(step, total, recipe) for step in range(total)]
    decay = np.array([recipe.weight_decay] * 6 + [0.0] * 6)  # the 2x3 kernel decays, the bias does not
    expected = _adam_reference(gradients, learning_rates, decay)
    weights = np.array(run["weights"])
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    # The check can tell: the schedule one step late, a rate frozen at its first value,
    # no decay, or decay on the bias too, each end elsewhere.
    deviation = np.abs(weights - expected).max()
    late = _adam_reference(gradients, [learning_rates[0], *learning_rates[:-1]], decay)
    frozen = _adam_reference(gradients, [learning_rates[0]] * total, decay)
    undecayed = _adam_reference(gradients, learning_rates, 0.0)
    all_decayed = _adam_reference(gradients, learning_rates, recipe.weight_decay)
    for wrong in (late, frozen, undecayed, all_decayed):
        assert np.abs(wrong - expected).max() > 100 * deviation


LOSS_SCRIPT = """
import json, sys
import numpy as np
from pipeline.recipe import Recipe

framework = sys.argv[1]
rng = np.random.default_rng(0)
logits = (rng.normal(size=(32, 10)) * 3).astype(np.float32)
labels = rng.integers(0, 10, 32)
losses = {}
for smoothing in (0.0, 0.1, 0.3):
    if framework == "torch":
        from pipeline.torch_train import torch, training_loss
        loss = training_loss(torch.from_numpy(logits), torch.from_numpy(labels), Recipe(label_smoothing=smoothing))
    else:
        from pipeline.keras_train import keras, smoothed_cross_entropy
        loss = keras.ops.mean(smoothed_cross_entropy(smoothing, 10)(labels, logits))
    losses[str(smoothing)] = float(loss)
print(json.dumps({"logits": logits.tolist(), "labels": labels.tolist(), "losses": losses}))
"""


def _smoothed_cross_entropy(logits, labels, smoothing):
    """Return the mean cross-entropy against (1 - smoothing) * one-hot + smoothing / classes, in numpy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    targets = np.full(logits.shape, smoothing / logits.shape[1])
    targets[np.arange(len(labels)), labels] += 1 - smoothing
    return float(-(targets * log_probabilities).sum(axis=1).mean())


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_training_loss_smooths_labels(framework):
    run = _script_result(LOSS_SCRIPT, framework)
    logits = np.array(run["logits"])
    labels = np.array(run["labels"])
    for smoothing, loss in run["losses"].items():
        expected = _smoothed_cross_entropy(logits, labels, float(smoothing))
        assert loss == pytest.approx(expected, rel=1e-5), smoothing
    # The check can tell: the default smoothing and none differ by far more than the tolerance.
    assert abs(run["losses"]["0.1"] - run["losses"]["0.0"]) > 1e-2
