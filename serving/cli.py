"""The `cifar-onnx classify` command: image files and folders in, one row per image out.

Kept light: onnxruntime is imported when the command runs, through serving.predictor.
"""

import contextlib
import csv
import json
import os
import secrets
import sys
import time

import click

from serving.predictor import DEFAULT_BATCH_SIZE, PROVIDER_CHOICES

FORMATS = ("table", "csv", "jsonl")
MODEL_ENVVAR = "CIFAR_ONNX_MODEL"
_REDRAW_INTERVAL = 0.2  # seconds between progress redraws on a terminal


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", required=True, envvar=MODEL_ENVVAR, show_envvar=True,
              type=click.Path(exists=True, dir_okay=False),
              help="ONNX export to classify with (cifar-onnx export writes OUT/<framework>/model.onnx).")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1),
              help="Number of best classes reported per image.")
@click.option("--format", "output_format", default=FORMATS[0], show_default=True, type=click.Choice(FORMATS),
              help="Row format: an aligned table, CSV with a header, or one JSON object per line.")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Write the rows to this file (atomically) instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Images per onnxruntime run.")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Walk subfolders of the folders given.")
@click.option("--provider", default=PROVIDER_CHOICES[0], show_default=True, type=click.Choice(PROVIDER_CHOICES),
              help="Execution provider: auto takes CUDA when it works, cuda fails without it.")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime intra-op threads [default: one per physical core].")
def classify(paths, model, top_k, output_format, output, force, batch_size, recursive, provider, threads):
    """Classify image files and folders with an ONNX export.

    Folders are walked in sorted order; hidden files and files without an image
    extension are skipped and counted. Every image gets a row with its label and
    probability; a file that cannot be read gets an error row and the run goes on.
    Rows go to stdout (or --output), the summary to stderr. Exits 0 when every image
    was classified and 1 when some could not be read.

    \b
    Example:
      cifar-onnx classify photos/ --model artifacts/torch/model.onnx --format csv
    """
    from serving.batch import classify_files
    from serving.predictor import Predictor
    from serving.walk import collect_image_paths

    if output is not None:
        _check_output_path(output, force)
    predictor = Predictor(model, providers=provider, threads=threads)
    if top_k > len(predictor.class_names):
        raise click.BadParameter(
            f"{top_k} is more than the model's {len(predictor.class_names)} classes", param_hint="'--top-k'"
        )

    collected = collect_image_paths(paths, recursive=recursive)
    all_paths = sorted([*collected.images, *collected.unreadable])
    if not collected.images:
        click.echo(f"warning: no image files found in {', '.join(paths)}", err=True)

    start = time.monotonic()
    # Rows printed to the same terminal would interleave with a redrawn progress line,
    # and they show the progress themselves.
    rows_on_terminal = output is None and sys.stdout.isatty()
    progress = _Progress(len(collected.images), enabled=sys.stderr.isatty() and not rows_on_terminal)
    classified = failed = 0
    with _open_output(output, force) as stream:
        writer = _make_writer(output_format, stream, top_k, all_paths)
        results = classify_files(predictor, collected.images, top_k=top_k, batch_size=batch_size)
        for path in all_paths:
            if path in collected.unreadable:
                writer.write_error(path, collected.unreadable[path])
                failed += 1
                continue
            result = next(results)
            if result.error is None:
                writer.write_prediction(path, result.prediction)
                classified += 1
            else:
                writer.write_error(path, result.error)
                failed += 1
            progress.update(classified + failed)
        writer.close()
    progress.close()

    elapsed = time.monotonic() - start
    rate = (classified + failed) / elapsed if elapsed > 0 else 0.0
    click.echo(
        f"classified {classified}, failed {failed}, skipped {collected.skipped} "
        f"({collected.skipped_hidden} hidden, {collected.skipped_other} other) in {elapsed:.1f} s, "
        f"{rate:.0f} images/s, {', '.join(predictor.providers)}",
        err=True,
    )
    if output is not None:
        click.echo(f"wrote {output}", err=True)
    if failed:
        sys.exit(1)


def _check_output_path(output, force):
    if os.path.exists(output) and not force:
        raise click.BadParameter(f"{output} exists; pass --force to overwrite it", param_hint="'--output'")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise click.BadParameter(f"folder {directory} does not exist", param_hint="'--output'")


@contextlib.contextmanager
def _open_output(output, force):
    """Yield stdout, or a temporary file next to `output` that replaces it only on success."""
    if output is None:
        yield sys.stdout
        return
    directory, name = os.path.split(os.path.abspath(output))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "w", encoding="utf-8", newline="") as stream:
            yield stream
        _move_into_place(temporary, output, force)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _move_into_place(temporary, output, force):
    if force:
        os.replace(temporary, output)
        return
    # A hard link fails when `output` appeared meanwhile, so nothing is overwritten.
    try:
        os.link(temporary, output)
    except FileExistsError as error:
        raise click.ClickException(f"{output} appeared while classifying, so nothing was written; rerun with --force to overwrite it") from error
    except OSError:
        # Filesystems without hard links: the window between the check and the rename is small.
        if os.path.exists(output):
            raise click.ClickException(f"{output} appeared while classifying, so nothing was written; rerun with --force to overwrite it")
        os.replace(temporary, output)


def _make_writer(output_format, stream, top_k, paths):
    if output_format == "csv":
        return _CsvWriter(stream, top_k)
    if output_format == "jsonl":
        return _JsonLinesWriter(stream)
    return _TableWriter(stream, top_k, max((len(display_path(p)) for p in paths), default=4))


def display_path(path):
    """Return `path` as printable text: bytes that are not valid UTF-8 become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


class _TableWriter:
    def __init__(self, stream, top_k, path_width):
        self.stream = stream
        self.top_k = top_k
        self.path_width = max(path_width, 4)
        header = f"{'path':<{self.path_width}}  {'label':<12} {'probability':>11}"
        if top_k > 1:
            header += f"  top-{top_k}"
        self._line(header)

    def write_prediction(self, path, prediction):
        line = f"{display_path(path):<{self.path_width}}  {prediction.label:<12} {prediction.probability:>11.4f}"
        if self.top_k > 1:
            line += "  " + ", ".join(f"{label} {p:.4f}" for label, p in prediction.top_k)
        self._line(line)

    def write_error(self, path, reason):
        self._line(f"{display_path(path):<{self.path_width}}  error: {reason}")

    def close(self):
        self.stream.flush()

    def _line(self, text):
        self.stream.write(text.rstrip() + "\n")


class _CsvWriter:
    def __init__(self, stream, top_k):
        self.stream = stream
        self.top_k = top_k
        self.writer = csv.writer(stream, lineterminator="\n")
        ranks = [column for rank in range(2, top_k + 1) for column in (f"label_{rank}", f"probability_{rank}")]
        self.writer.writerow(["path", "label", "index", "probability", *ranks, "error"])

    def write_prediction(self, path, prediction):
        ranks = [value for label, p in prediction.top_k[1:] for value in (label, f"{p:.6f}")]
        self.writer.writerow([display_path(path), prediction.label, prediction.index, f"{prediction.probability:.6f}",
                              *ranks, ""])

    def write_error(self, path, reason):
        self.writer.writerow([display_path(path), "", "", "", *[""] * (2 * (self.top_k - 1)), reason])

    def close(self):
        self.stream.flush()


class _JsonLinesWriter:
    """One JSON object per row, probabilities rounded to 6 decimals as in the CSV."""

    def __init__(self, stream):
        self.stream = stream

    def write_prediction(self, path, prediction):
        row = {"path": display_path(path), **prediction.as_dict()}
        row["probability"] = round(row["probability"], 6)
        for entry in row["top_k"]:
            entry["probability"] = round(entry["probability"], 6)
        self.stream.write(json.dumps(row) + "\n")

    def write_error(self, path, reason):
        self.stream.write(json.dumps({"path": display_path(path), "error": reason}) + "\n")

    def close(self):
        self.stream.flush()


class _Progress:
    """A progress line with rate and ETA, redrawn in place on stderr when it is a terminal."""

    def __init__(self, total, enabled):
        self.total = total
        self.enabled = enabled and total > 0
        self.start = time.monotonic()
        self.last_draw = 0.0

    def update(self, done):
        now = time.monotonic()
        if not self.enabled or (now - self.last_draw < _REDRAW_INTERVAL and done < self.total):
            return
        self.last_draw = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\rclassifying: {done}/{self.total} images, {rate:.0f} images/s, ETA {eta:.0f} s ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
