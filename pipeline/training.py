"""The framework-neutral parts of a training run: header, epoch lines, output files, resume state.

pipeline/torch_train.py and pipeline/keras_train.py both write through these
helpers, so their logs, history.csv, metrics.json and curves.png have one format.
"""

import contextlib
import csv
import io
import json
import logging
import os
import platform
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import TrainError

logger = logging.getLogger(__name__)

HISTORY_NAME = "history.csv"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
STATE_NAME = "last.json"  # resume state of the last completed epoch; the weights file sits beside it
HISTORY_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second", "seconds",
)
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class RunState:
    """Progress of a run after its last completed epoch, stored as last.json for --resume."""

    architecture: str
    recipe: dict
    dataset_fingerprint: str
    epoch: int = 0  # last completed epoch, 1-based; 0 before the first
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    wall_seconds: float = 0.0  # training time summed over completed epochs, across resumes
    finished: bool = False
    history: list = field(default_factory=list)  # one dict per epoch with HISTORY_FIELDS

    def record_epoch(self, row):
        """Append one epoch's row and update the early-stopping counters; return True when it is the best."""
        self.history.append(row)
        self.epoch = row["epoch"]
        self.wall_seconds += row["seconds"]
        improved = row["val_accuracy"] > self.best_val_accuracy
        if improved:
            self.best_val_accuracy = row["val_accuracy"]
            self.best_epoch = row["epoch"]
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved


def write_state(run_dir, state):
    """Write last.json atomically; call after the framework's weights file, which it commits."""
    write_json(Path(run_dir) / STATE_NAME, state.__dict__)


def read_state(run_dir, framework):
    """Return the RunState of the interrupted run in `run_dir`; raise TrainError when there is none."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        raise TrainError(
            f"--resume: no interrupted {framework} run in {run_dir} ({STATE_NAME} not found): "
            "start a new run without --resume"
        )
    try:
        values = json.loads(path.read_text())
        state = RunState(**values)
    except (OSError, ValueError, TypeError) as error:
        raise TrainError(f"--resume: cannot read {path}: {error}; start a new run without --resume") from error
    if state.finished:
        raise TrainError(
            f"--resume: the {framework} run in {run_dir} already finished at epoch {state.epoch}: "
            "start a new run without --resume"
        )
    return state


def check_resume(state, architecture, recipe, dataset_fingerprint, run_dir):
    """Raise TrainError when a resumed run would change architecture, recipe or dataset."""
    if state.architecture != architecture:
        raise TrainError(
            f"--resume: the run in {run_dir} trains {state.architecture!r}, not {architecture!r}: "
            f"pass --arch {state.architecture} or start a new run without --resume"
        )
    if state.dataset_fingerprint != dataset_fingerprint:
        raise TrainError(
            f"--resume: the run in {run_dir} used dataset {state.dataset_fingerprint}, this one is "
            f"{dataset_fingerprint}: pass the same --data or start a new run without --resume"
        )
    changed = [
        f"{key} {state.recipe.get(key)!r} -> {value!r}"
        for key, value in recipe.to_dict().items()
        if state.recipe.get(key) != value
    ]
    if changed:
        raise TrainError(
            f"--resume continues the saved recipe, but these options differ: {', '.join(changed)}; "
            "drop them or start a new run without --resume"
        )


def log_header(framework, framework_version, device, architecture, parameter_count, dataset, sizes, recipe):
    """Log the run header: device, framework, architecture, parameter count, data and recipe."""
    logger.info(
        "train: %s %s on %s, architecture %s, %s trainable parameters",
        framework, framework_version, device, architecture, f"{parameter_count:,}",
    )
    logger.info(
        "data: %s, fingerprint %s, train %d, validation %d, test %d images",
        dataset.source, dataset.fingerprint, sizes["train"], sizes["validation"], sizes["test"],
    )
    logger.info("recipe: %s", recipe.describe())


def format_epoch(row, epochs):
    """Return the fixed-format line of one epoch (the fields of HISTORY_FIELDS, in order)."""
    return (
        f"epoch {row['epoch']:3d}/{epochs} train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f} val_loss {row['val_loss']:.4f} "
        f"val_acc {row['val_accuracy']:.4f} lr {row['lr']:.2e} "
        f"images/s {row['images_per_second']:6.0f} time {row['seconds']:6.1f}s"
    )


def epoch_row(epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr, images, seconds, train_seconds):
    """Return one history row with plain floats, rounded for the CSV."""
    return {
        "epoch": int(epoch),
        "train_loss": round(float(train_loss), 6),
        "train_accuracy": round(float(train_accuracy), 6),
        "val_loss": round(float(val_loss), 6),
        "val_accuracy": round(float(val_accuracy), 6),
        "lr": float(f"{lr:.6e}"),
        "images_per_second": round(images / max(train_seconds, 1e-9), 1),
        "seconds": round(float(seconds), 3),
    }


def write_history(run_dir, history):
    """Write history.csv (one row per completed epoch) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(Path(run_dir) / HISTORY_NAME, buffer.getvalue())


def write_curves(run_dir, history, title, best_epoch, label_smoothing=0.0):
    """Plot loss and accuracy per epoch, train vs validation, to curves.png (fixed axes for comparison).

    With label smoothing the train loss is measured against the smoothed targets, so it
    stays above the validation loss, and the legend marks it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((loss_axis, "loss", "cross-entropy loss"), (accuracy_axis, "accuracy", "accuracy")):
        train_label = "train"
        if key == "loss" and label_smoothing:
            train_label = f"train (label smoothing {label_smoothing:g})"
        axis.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label=train_label)
        axis.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label="validation")
        axis.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        axis.set_xlim(0.5, max(epochs) + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    # The same accuracy axis in every run, so the two frameworks' plots compare at a glance.
    accuracy_axis.set_ylim(0.0, 1.0)
    loss_axis.set_ylim(bottom=0.0)
    figure.suptitle(title)
    figure.tight_layout()

    path = Path(run_dir) / CURVES_NAME
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def versions(**frameworks):
    """Return the versions that produced a run: python, numpy and the given framework packages."""
    return {"python": platform.python_version(), "numpy": np.__version__, **frameworks}


def write_json(path, values):
    """Write `values` as indented JSON to `path` atomically."""
    write_text(Path(path), json.dumps(values, indent=2) + "\n")


def write_text(path, text):
    """Write `text` to `path` through a temporary file and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@contextlib.contextmanager
def interrupts_raise():
    """Turn SIGTERM into KeyboardInterrupt (as Ctrl-C is) for the duration, so both stop a run the same way."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so a checkpoint and its state are written together."""
    received = []

    def remember(signum, frame):
        received.append(signum)

    previous = {signum: signal.signal(signum, remember) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}")


class EpochProgress:
    """The progress line inside one epoch: images done, rate and ETA on stderr."""

    def __init__(self, epoch, epochs, total):
        from pipeline.progress import Progress

        # On a terminal the line is redrawn in place; in a log it prints at each quarter of the epoch.
        self.progress = Progress(total, f"epoch {epoch}/{epochs}", unit="images")

    def update(self, images):
        self.progress.update(images)

    def clear(self):
        """Erase the redrawn line so the epoch line takes its place."""
        if self.progress.is_tty:
            self.progress.stream.write("\r\033[K")
            self.progress.stream.flush()


def finish_run(run_dir, state, metrics, title):
    """Write history.csv, metrics.json and curves.png, then mark the run finished in last.json."""
    write_history(run_dir, state.history)
    write_json(Path(run_dir) / METRICS_NAME, metrics)
    write_curves(run_dir, state.history, title, state.best_epoch, state.recipe.get("label_smoothing", 0.0))
    state.finished = True
    write_state(run_dir, state)
    logger.info(
        "done: test accuracy %.4f on %d images, best epoch %d (val_acc %.4f), %.1f s training; outputs in %s",
        metrics["test_accuracy"], metrics["test_images"], metrics["best_epoch"],
        metrics["best_val_accuracy"], metrics["wall_time_seconds"], run_dir,
    )


def base_metrics(framework, architecture, recipe, dataset, state, sizes, test_loss, test_accuracy, extra):
    """Return the metrics.json content shared by both frameworks."""
    rates = [row["images_per_second"] for row in state.history]
    return {
        "framework": framework,
        "architecture": architecture,
        "test_accuracy": round(float(test_accuracy), 6),
        "test_loss": round(float(test_loss), 6),
        "test_images": sizes["test"],
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy,
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < recipe.epochs,
        "wall_time_seconds": round(state.wall_seconds, 1),
        "images_per_second": round(float(np.mean(rates)), 1) if rates else 0.0,  # training only, mean of epochs
        "dataset_fingerprint": dataset.fingerprint,
        "dataset_source": str(dataset.source),
        "dataset_sizes": sizes,
        "class_names": list(dataset.class_names),
        "recipe": recipe.to_dict(),
        **extra,
    }


def interrupted_message(run_dir, state):
    """Return the one-line note printed when a run stops on Ctrl-C or SIGTERM."""
    if state.epoch == 0:
        return f"interrupted before the first epoch completed; nothing to resume in {run_dir}"
    return f"interrupted: kept epoch {state.epoch} in {run_dir}; continue with --resume"
