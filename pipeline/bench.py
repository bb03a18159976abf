"""The benchmark: the pipeline measured side by side with what a framework user would run instead.

Every figure is measured in one run on one machine: onnxruntime vs the framework's
own inference, FLOPs and the machine's matrix-multiply rate, cold start, folder
throughput, training throughput, install footprint, and a GPU section when CUDA is
present. This process imports neither framework: framework work runs in
`python -m pipeline.bench_worker` subprocesses, one framework per process, and
onnxruntime runs here. Each measurement warms up, repeats, and reports the median
with min and max.
"""

import dataclasses
import datetime
import glob
import getpass
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench_worker import TUTORIAL_AUGMENT, cyclic_batches, summarize, time_repeats
from pipeline.frameworks import FRAMEWORKS
from pipeline.training import write_text
from serving.contract import META_ARCHITECTURE
from serving.errors import CifarOnnxError

logger = logging.getLogger(__name__)

CHECKPOINT_NAMES = {"torch": "model.pt", "keras": "model.keras"}
BATCH_SIZES = (1, 64, 256)
TARGET_BATCH = 64  # the batch size the inference and GFLOP/s targets are stated at
FOLDER_TARGET = 3000.0  # images/s that classify must reach over a folder, end to end
JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"


class BenchmarkError(CifarOnnxError):
    """A benchmark that cannot start (no trained exports) or whose measurement step failed."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; `FULL` for the record, `QUICK` to keep the code from rotting."""

    inference_images: int  # real test images the inference batches are cut from
    inference_counts: tuple  # images per timed run, one per BATCH_SIZES entry
    warmup: int  # untimed runs before the timed ones of inference and matmul
    process_warmup: int  # untimed subprocess runs (cold start, folder) that fill the page cache
    repeats: int  # timed runs of inference and matmul
    matmul_sizes: tuple  # sides of the square float32 matrices multiplied
    cold_repeats: int  # timed cold starts per command
    folder_per_class: int | None  # test images per class for the folder run; None = all
    folder_repeats: int
    train_limit: int  # recipe --limit; a tenth is held out, the rest is one epoch
    train_epochs: int  # the first is warm-up


FULL = Sizes(inference_images=2048, inference_counts=(256, 2048, 2048), warmup=1, process_warmup=1, repeats=5,
             matmul_sizes=(256, 512, 1024), cold_repeats=5, folder_per_class=None, folder_repeats=3, train_limit=11_111,
             train_epochs=3)
QUICK = Sizes(inference_images=128, inference_counts=(16, 128, 256), warmup=1, process_warmup=0, repeats=2,
              matmul_sizes=(256,), cold_repeats=1, folder_per_class=20, folder_repeats=1, train_limit=256,
              train_epochs=2)


@dataclasses.dataclass
class Target:
    """One target of the benchmark: a measured value that must reach `required`."""

    name: str
    measured: float
    required: float
    unit: str  # "x" for ratios, "images/s", "%"

    @property
    def met(self):
        return self.measured >= self.required

    def describe(self):
        """Return 'met' or 'missed by <gap> (<percent> of the target)'."""
        if self.met:
            return "met"
        return (f"missed by {_format_value(self.required - self.measured, self.unit)} "
                f"({self.measured / self.required:.0%} of the target)")

    def as_dict(self):
        return {"name": self.name, "measured": self.measured, "required": self.required, "unit": self.unit,
                "met": self.met, "result": self.describe()}


def _format_value(value, unit):
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.0f}%"
    return f"{value:,.0f} {unit}"


class _Steps:
    """Numbered step lines with the elapsed time on stderr (through logging)."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def start(self, what):
        self.done += 1
        elapsed = time.monotonic() - self.started
        # The ETA assumes the remaining steps take as long as the finished ones on average.
        eta = elapsed / (self.done - 1) * (self.total - self.done + 1) if self.done > 1 else None
        logger.info("bench [%d/%d] %s (%.0f s elapsed%s)", self.done, self.total, what, elapsed,
                    f", ETA {eta:.0f} s" if eta is not None else "")


# ---------------------------------------------------------------- subprocesses


def _run(command, what, env=None):
    """Run a subprocess to completion and return its CompletedProcess.

    Raises BenchmarkError with the last line of its stderr when it fails.
    """
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        logger.debug("%s failed:\n%s", what, result.stderr)
        raise BenchmarkError(f"{what} failed: {lines[-1] if lines else f'exit status {result.returncode}'}")
    return result


def _worker(task, framework, output=None, **options):
    """Run one bench_worker task; return its JSON result when `output` is given."""
    command = [sys.executable, "-m", "pipeline.bench_worker", task, "--framework", framework]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            command += [f"--{key.replace('_', '-')}", str(value)]
    if output is not None:
        command += ["--output", str(output)]
    _run(command, f"{framework} {task}")
    return json.loads(Path(output).read_text()) if output is not None else None


def _classify_command():
    """Return the argv prefix that starts `cifar-onnx`: the installed script beside this Python, else -m."""
    script = Path(sys.executable).with_name("cifar-onnx")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


# ---------------------------------------------------------------- machine


def describe_machine():
    """Return CPU model, logical and physical cores, memory and platform of this machine."""
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "logical_cores": os.cpu_count(), "cpu_model": platform.processor() or "unknown"}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.MULTILINE)
        if models:
            machine["cpu_model"] = models[0].strip()
        cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", cpuinfo,
                               flags=re.MULTILINE | re.DOTALL))
        machine["physical_cores"] = len(cores) or None
        memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), flags=re.MULTILINE)
        machine["memory_gib"] = round(int(memory.group(1)) / 2**20, 1) if memory else None
    except OSError:
        logger.debug("no /proc: CPU model and memory not recorded")
    machine["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return machine


# ---------------------------------------------------------------- inference and FLOPs


def _predictor(export, providers="cpu"):
    from serving.predictor import Predictor

    return Predictor(export, providers=providers)


def measure_onnxruntime(export, images, sizes, providers="cpu"):
    """Return images/s per batch size of the serving Predictor's session on uint8 `images`."""
    predictor = _predictor(export, providers)
    results = {}
    for batch_size, count in zip(BATCH_SIZES, sizes.inference_counts):
        batches = cyclic_batches(images, batch_size, count)

        def run_all(batches=batches):
            for batch in batches:
                predictor.predict_probabilities(batch)

        seconds = time_repeats(run_all, sizes.warmup, sizes.repeats)
        results[str(batch_size)] = {"images": count, **summarize([count / s for s in seconds])}
    return results, predictor.providers


def profile_onnxruntime(export, images, batch_size, count, work):
    """Return each operator type's share of onnxruntime's kernel time over `count` images in batches of `batch_size`.

    Uses onnxruntime's own profiler (SessionOptions.enable_profiling), with the
    Predictor's session options otherwise. Returns {"kernel_ms", "share_by_operator"}.
    """
    from serving.contract import INPUT_NAME
    from serving.predictor import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(work) / f"ort-profile-{Path(export).parent.name}")
    session = ort.InferenceSession(str(export), options, providers=["CPUExecutionProvider"])
    for batch in cyclic_batches(images, batch_size, count):
        session.run(None, {INPUT_NAME: batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            operator = event.get("args", {}).get("op_name", "?")
            totals[operator] = totals.get(operator, 0) + event["dur"]  # microseconds
    total = sum(totals.values()) or 1
    shares = {op: duration / total for op, duration in sorted(totals.items(), key=lambda item: -item[1])}
    return {"kernel_ms": total / 1000, "share_by_operator": shares}


def count_flops(export):
    """Count the multiply-adds of Conv, Gemm and MatMul in an ONNX file for one image, as FLOPs (2 per multiply-add).

    Conv: 2 * Cout * Cin/groups * kh * kw * Hout * Wout; Gemm and MatMul: 2 * M * N * K.
    Shapes come from onnx shape inference with the batch dimension set to 1. Other
    operators (BatchNormalization, pooling, softmax) are not counted: at a few FLOPs
    per activation they add an estimated 0.1-0.5% for the cnn architectures.
    Returns {"per_image", "by_operator"}.
    """
    import onnx

    model = onnx.load(str(export))
    graph = model.graph
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    del graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(model).graph

    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in value.type.tensor_type.shape.dim]
    by_operator = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        output = shapes.get(node.output[0])
        first, second = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not output or not first or not second or None in output or None in first or None in second:
            raise BenchmarkError(f"{export}: shape inference left the shapes of {node.op_type} node "
                                 f"{node.name!r} unknown, so its FLOPs cannot be counted; re-export the model")
        if node.op_type == "Conv":
            flops = 2 * int(np.prod(output)) * int(np.prod(second[1:]))  # second: [Cout, Cin/groups, kh, kw]
        elif node.op_type == "Gemm":
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            flops = 2 * int(np.prod(output)) * (first[0] if transposed else first[1])
        else:
            flops = 2 * int(np.prod(output)) * first[-1]
        by_operator[node.op_type] = by_operator.get(node.op_type, 0) + flops
    return {"per_image": sum(by_operator.values()), "by_operator": by_operator}


def measure_matmul(sizes):
    """Return the float32 matrix-multiply GFLOP/s of numpy and of onnxruntime's MatMul on this machine.

    Each side of `sizes.matmul_sizes` is measured, because the fastest size differs by
    library and cache; the peak is the best median of any library at any size.
    """
    by_size = {str(n): _measure_matmul_size(n, sizes) for n in sizes.matmul_sizes}
    peak = max(max(rates["numpy_gflops"]["median"], rates["onnxruntime_gflops"]["median"])
               for rates in by_size.values())
    return {"by_size": by_size, "peak_gflops": peak}


def _measure_matmul_size(n, sizes):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from serving.predictor import import_onnxruntime

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3
    repeats = max(3, 2 * sizes.repeats)
    numpy_seconds = time_repeats(lambda: a @ b, sizes.warmup + 1, repeats)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # accepted by onnxruntime 1.31
    onnx.checker.check_model(model)
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Predictor's session
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ort_seconds = time_repeats(lambda: session.run(None, {"a": a}), sizes.warmup + 1, repeats)
    return {"numpy_gflops": summarize([flops / s / 1e9 for s in numpy_seconds]),
            "onnxruntime_gflops": summarize([flops / s / 1e9 for s in ort_seconds])}


# ---------------------------------------------------------------- cold start and folder throughput


def time_first_prediction(command, marker, env):
    """Start `command` and return the wall seconds until a stdout line containing `marker` appears."""
    with tempfile.TemporaryFile(mode="w+") as errors:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        seconds = None
        for line in process.stdout:
            if marker in line:
                seconds = time.perf_counter() - started
                break
        process.communicate()
        if seconds is None:
            errors.seek(0)
            lines = [line for line in errors.read().splitlines() if line.strip()]
            raise BenchmarkError(f"{' '.join(command[:4])} printed no prediction for {marker} "
                                 f"(exit status {process.returncode}): {lines[-1] if lines else 'no message'}")
    return seconds


def measure_cold_start(exports, checkpoints, image, sizes):
    """Return seconds to the first printed prediction: classify per export vs each framework's minimal script."""
    # Unbuffered stdout, so every command's line reaches the pipe when it is printed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = {}
    for framework, export in exports.items():
        commands[f"classify_{framework}_export"] = [*_classify_command(), "classify", str(image),
                                                    "--model", str(export)]
        commands[f"{framework}_script"] = [sys.executable, "-m", "pipeline.bench_worker", "first-prediction",
                                           "--framework", framework, "--checkpoint", str(checkpoints[framework]),
                                           "--image", str(image)]
    results = {}
    for name, command in commands.items():
        for _ in range(sizes.process_warmup):
            time_first_prediction(command, image.name, env)
        seconds = [time_first_prediction(command, image.name, env) for _ in range(sizes.cold_repeats)]
        results[name] = {"command": " ".join(command), **summarize(seconds)}
    return results


def prepare_test_folder(source, test_images, target, per_class):
    """Write the test split as image files under `target`/<class>/; return (image count, how they were made).

    A .tar/.tar.gz source or a folder source gives its own test/<class>/ files; any
    other source (the canonical binary archive) gives the decoded arrays as JPEG files
    at quality 95. `per_class` keeps only that many files of each class (None: all).
    """
    path = Path(source).expanduser()
    target = Path(target)
    counts = {}

    def keep(class_name, name):
        if not re.fullmatch(r"[\w.-]+", class_name) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            return None
        if per_class is not None and counts.get(class_name, 0) >= per_class:
            return None
        counts[class_name] = counts.get(class_name, 0) + 1
        (target / class_name).mkdir(parents=True, exist_ok=True)
        return target / class_name / name

    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 3 or parts[-3] != "test":
                    continue
                destination = keep(parts[-2], parts[-1])
                if destination is not None:
                    destination.write_bytes(tar.extractfile(member).read())
        origin = f"test/ files of {path.name}"
    elif path.is_dir() and [*path.glob("test"), *path.glob("*/test")]:
        test = [*path.glob("test"), *path.glob("*/test")][0]
        for class_folder in sorted(p for p in test.iterdir() if p.is_dir()):
            for file in sorted(class_folder.iterdir()):
                destination = keep(class_folder.name, file.name) if file.is_file() else None
                if destination is not None:
                    shutil.copyfile(file, destination)
        origin = f"files of {test}"
    else:
        from PIL import Image

        images, labels, class_names = test_images
        for index, (image, label) in enumerate(zip(images, labels)):
            destination = keep(class_names[label], f"{index:05d}.jpg")
            if destination is not None:
                Image.fromarray(image).save(destination, quality=95)
        origin = "test arrays of the dataset cache, written as JPEG quality 95"
    if not counts:
        raise BenchmarkError(f"no test images found in {source}: expected test/<class>/ image files")
    return sum(counts.values()), origin


def _csv_rows(path):
    with open(path, encoding="utf-8") as stream:
        return sum(1 for _ in stream) - 1  # minus the header


def measure_decoding(folder, sizes):
    """Return images/s of `serving.load_image` alone on one thread over every file under `folder`.

    With the inference images/s at batch 256 this bounds what classify can reach on
    this machine, because decoding and inference share the same cores.
    """
    from serving.images import load_image

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())

    def decode_all():
        for path in paths:
            load_image(path)

    seconds = time_repeats(decode_all, sizes.process_warmup, sizes.folder_repeats)
    return summarize([len(paths) / s for s in seconds])


def measure_folder(folder, count, export, torch_checkpoint, work, sizes):
    """Return images/s of `cifar-onnx classify` over `folder` to CSV vs the ImageFolder baseline, end to end."""
    results = {}
    classify_csv, baseline_csv = Path(work) / "classify.csv", Path(work) / "baseline.csv"
    runs = {"classify": [*_classify_command(), "classify", str(folder), "--model", str(export), "--format", "csv",
                         "--output", str(classify_csv), "--force"]}
    if torch_checkpoint is not None:
        runs["imagefolder_baseline"] = [sys.executable, "-m", "pipeline.bench_worker", "folder-baseline",
                                        "--checkpoint", str(torch_checkpoint), "--folder", str(folder),
                                        "--output", str(baseline_csv)]
    for name, command in runs.items():
        end_to_end, loop = [], []
        for attempt in range(sizes.process_warmup + sizes.folder_repeats):
            started = time.perf_counter()
            result = _run(command, f"{name} over {count} files")
            seconds = time.perf_counter() - started
            rows = _csv_rows(classify_csv if name == "classify" else baseline_csv)
            if rows != count:
                raise BenchmarkError(f"{name} wrote {rows} CSV rows for {count} images in {folder}")
            if attempt < sizes.process_warmup:
                continue
            end_to_end.append(count / seconds)
            if name == "classify":
                # classify's summary line: "classified N, ... in 3.2 s, 3100 images/s, CPUExecutionProvider"
                match = re.search(r"(\d+) images/s", result.stderr)
                if match is None:
                    raise BenchmarkError(f"classify printed no images/s summary: {result.stderr[-200:]!r}")
                loop.append(float(match.group(1)))
            else:
                images, loop_seconds = result.stderr.strip().splitlines()[-1].split()
                loop.append(int(images) / float(loop_seconds))
        results[name] = {"command": " ".join(command), "images_per_second": summarize(end_to_end),
                         "loop_images_per_second": summarize(loop)}
    return results


# ---------------------------------------------------------------- training


def measure_training(framework, data, out, architecture, work, sizes, device="cpu", mixed_precision=False,
                     styles=("ours", "tutorial", "model-step")):
    """Return training images/s (epochs after the first) of each style: our stage, the tutorial, the model step."""
    results = {}
    for style in styles:
        run_work = Path(work) / f"train-{framework}-{style}-{device}-{int(mixed_precision)}"
        run_work.mkdir(parents=True, exist_ok=True)
        result = _worker("train", framework, output=run_work / "result.json", style=style, data=data,
                         dataset_out=out, work=run_work, architecture=architecture, limit=sizes.train_limit,
                         epochs=sizes.train_epochs, device=device, mixed_precision=mixed_precision)
        rates = result["epoch_images_per_second"]
        results[style] = {"images": result["images"], "augment": result["augment"],
                          "batch_size": result["batch_size"], "first_epoch_images_per_second": rates[0],
                          "images_per_second": summarize(rates[1:] or rates), "environment": result["environment"]}
    return results


# ---------------------------------------------------------------- footprint


def find_predictor_venv():
    """Return the newest predictor-only virtualenv left by tests/test_serving_venv.py, or None.

    pytest keeps the temporary folders of its last three runs, so the virtualenv is
    found only after a recent test run.
    """
    pattern = os.path.join(tempfile.gettempdir(), f"pytest-of-{getpass.getuser()}", "pytest-*",
                           "serving-venv*", "venv")
    # pytest adds a "<name>current" link to the newest numbered folder, so links are resolved first.
    candidates = {Path(p).resolve() for p in glob.glob(pattern) if (Path(p) / "bin" / "python").exists()}
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def folder_bytes(folder):
    """Return the summed size of the regular files under `folder` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            status = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)):
                total += status.st_size
    return total


def dependency_closure_bytes(root):
    """Return {distribution: bytes} of `root` and every distribution it requires, recursively, in this environment.

    Requirements are followed with their markers evaluated for this platform and the
    extras the requiring side names; files are sized from each distribution's RECORD.
    """
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    extras_seen = {}
    pending = [(root, frozenset())]
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        extras_seen[key] = extras_seen.get(key, frozenset()) | extras
        for text in distribution.requires or []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            environments = [{"extra": extra} for extra in extras_seen[key]] or [{"extra": ""}]
            if requirement.marker and not any(requirement.marker.evaluate(e) for e in environments):
                continue
            pending.append((requirement.name, frozenset(requirement.extras)))

    sizes = {}
    for key in extras_seen:
        distribution = metadata.distribution(key)
        total = 0
        for file in distribution.files or []:
            located = Path(distribution.locate_file(file))
            if located.is_file() and not located.is_symlink():
                total += located.stat().st_size
        sizes[distribution.metadata["Name"]] = total
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def measure_footprint():
    """Return the predictor-only virtualenv's size and the torch and tensorflow dependency closures' sizes."""
    venv = find_predictor_venv()
    predictor = ({"path": str(venv), "bytes": folder_bytes(venv)} if venv is not None else
                 {"path": None, "bytes": None,
                  "note": "not measured: no predictor-only virtualenv from tests/test_serving_venv.py was found"})
    footprint = {"predictor_venv": predictor}
    try:
        for root in ("torch", "tensorflow"):
            packages = dependency_closure_bytes(root)
            footprint[root] = {"bytes": sum(packages.values()), "packages": packages}
    except ImportError:
        footprint["note"] = "packaging is not installed, so the dependency closures were not measured"
    return footprint


# ---------------------------------------------------------------- GPU


def run_gpu_section(exports, data, out, architecture, images, work, sizes, cuda_available):
    """Measure training with and without mixed precision and onnxruntime CUDA vs CPU; skip without CUDA."""
    if not cuda_available:
        return {"skipped": "no CUDA device visible to PyTorch or TensorFlow, so the GPU section was skipped"}
    # NOTE: this path has not run on a GPU yet; it was written and tested on a CPU-only machine.
    section = {"training": {}, "onnxruntime": {}}
    for framework in exports:
        for mixed_precision in (False, True):
            result = measure_training(framework, data, out, architecture, work, sizes, device="cuda",
                                      mixed_precision=mixed_precision, styles=("ours",))
            section["training"][f"{framework}{' mixed precision' if mixed_precision else ''}"] = result["ours"]
    for framework, export in exports.items():
        try:
            section["onnxruntime"][framework] = {
                provider: measure_onnxruntime(export, images, sizes, providers=provider)[0]
                for provider in ("cpu", "cuda")
            }
        except CifarOnnxError as error:
            # A GPU that PyTorch detects may still lack the CUDA libraries onnxruntime needs.
            logger.warning("onnxruntime on CUDA failed for the %s export: %s", framework, error)
            section["onnxruntime"][framework] = {"error": str(error)}
    return section


# ---------------------------------------------------------------- the run


def _ready_frameworks(out):
    return [fw for fw in FRAMEWORKS
            if (out / fw / CHECKPOINT_NAMES[fw]).is_file() and (out / fw / "model.onnx").is_file()]


def _architecture(export):
    from serving.predictor import parse_metadata

    import onnx

    model = onnx.load(str(export), load_external_data=False)
    return parse_metadata({p.key: p.value for p in model.metadata_props}, export)[META_ARCHITECTURE]


def recorded_data_source(out):
    """Return the dataset source that training recorded in OUT/<framework>/metrics.json, or None."""
    for framework in FRAMEWORKS:
        try:
            return json.loads((Path(out) / framework / "metrics.json").read_text())["dataset_source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def run_bench(data, out, quick=False):
    """Run every measurement for the checkpoints and exports under `out`; return the report dict.

    `data` None means the source training recorded in OUT/<framework>/metrics.json,
    else "cifar10". Raises BenchmarkError when no framework has both a checkpoint and
    an export, or when a measurement's subprocess fails.
    """
    from pipeline.data import load_dataset
    from serving.predictor import import_onnxruntime

    out = Path(out)
    sizes = QUICK if quick else FULL
    present = _ready_frameworks(out)
    if not present:
        raise BenchmarkError(
            f"nothing to benchmark under {out}: expected OUT/<framework>/ with a checkpoint (model.pt or "
            "model.keras) and model.onnx; run `cifar-onnx train` and `cifar-onnx export` first")
    if data is None:
        data = recorded_data_source(out) or "cifar10"
        logger.info("bench: data source %s", data)
    checkpoints = {fw: out / fw / CHECKPOINT_NAMES[fw] for fw in present}
    exports = {fw: out / fw / "model.onnx" for fw in present}
    architecture = _architecture(exports[present[0]])

    steps = _Steps(total=7 + 2 * len(present))
    steps.start("loading the dataset")
    dataset = load_dataset(data, out, progress=False)
    chosen = np.sort(np.random.default_rng(0).permutation(len(dataset.test_images))[:sizes.inference_images])
    images = np.ascontiguousarray(dataset.test_images[chosen])
    ort = import_onnxruntime()
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick, "data": str(data), "out": str(out), "architecture": architecture,
        "sizes": dataclasses.asdict(sizes), "machine": describe_machine(),
        "versions": {"numpy": np.__version__, "onnxruntime": ort.__version__},
        "threads": {"onnxruntime_intra_op": "default (one per physical core)",
                    "onnxruntime_allow_spinning": False},
        "inference": {}, "flops": {}, "training": {},
    }
    import onnx
    report["versions"]["onnx"] = onnx.__version__

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    try:
        images_path = work / "images.npy"
        np.save(images_path, images)
        environments = {}
        for framework in present:
            steps.start(f"{framework}: inference, onnxruntime vs the framework")
            ort_rates, providers = measure_onnxruntime(exports[framework], images, sizes)
            result = _worker("infer", framework, output=work / f"infer-{framework}.json",
                             checkpoint=checkpoints[framework], images=images_path,
                             batch_sizes=",".join(map(str, BATCH_SIZES)),
                             counts=",".join(map(str, sizes.inference_counts)),
                             warmup=sizes.warmup, repeats=sizes.repeats)
            environments[framework] = result["environment"]
            framework_rates = result["images_per_second"]
            report["inference"][framework] = {
                "onnxruntime_providers": providers, "onnxruntime": ort_rates, "framework": framework_rates,
                "ratio": {b: ort_rates[b]["median"] / framework_rates[b]["median"] for b in ort_rates},
            }
            report["flops"][framework] = count_flops(exports[framework])
            report["flops"][framework]["onnxruntime_profile_batch64"] = profile_onnxruntime(
                exports[framework], images, TARGET_BATCH, sizes.inference_counts[1], work)

        steps.start("float32 matrix multiply, numpy and onnxruntime")
        report["matmul"] = measure_matmul(sizes)
        for framework in present:
            flops = report["flops"][framework]
            rate = report["inference"][framework]["onnxruntime"][str(TARGET_BATCH)]["median"]
            achieved = flops["per_image"] * rate / 1e9
            flops["onnxruntime_gflops_batch64"] = achieved
            flops["fraction_of_matmul_peak"] = achieved / report["matmul"]["peak_gflops"]

        steps.start("writing the test split as image files")
        folder = work / "test-images"
        test = (dataset.test_images, dataset.test_labels, list(dataset.class_names))
        count, origin = prepare_test_folder(data, test, folder, sizes.folder_per_class)
        first_image = next(p for p in sorted(folder.rglob("*")) if p.is_file())

        steps.start("cold start to the first prediction")
        report["cold_start"] = measure_cold_start(exports, checkpoints, first_image, sizes)

        steps.start(f"folder throughput over {count:,} files")
        folder_export = exports.get("torch", exports[present[0]])
        report["folder"] = {"images": count, "origin": origin, "export": str(folder_export),
                            **measure_folder(folder, count, folder_export, checkpoints.get("torch"), work, sizes),
                            "decode_images_per_second_one_thread": measure_decoding(folder, sizes)}

        for framework in present:
            steps.start(f"{framework}: training throughput, our stage vs the tutorial style")
            report["training"][framework] = measure_training(framework, data, out, architecture, work, sizes)

        steps.start("install footprint")
        report["footprint"] = measure_footprint()

        steps.start("GPU section")
        cuda = any(environment.get("cuda_available") for environment in environments.values())
        report["gpu"] = run_gpu_section(exports, data, out, architecture, images, work, sizes, cuda)
        for environment in environments.values():
            report["versions"].update({k: v for k, v in environment.items() if not k.endswith(("threads", "count"))
                                       and k != "cuda_available"})
            report["threads"].update({k: v for k, v in environment.items() if k.endswith("threads")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = [target.as_dict() for target in evaluate_targets(report)]
    return report


def evaluate_targets(report):
    """Return the Targets of the benchmark, each with its measured value from `report`."""
    targets = []
    batch = str(TARGET_BATCH)
    for framework, inference in report["inference"].items():
        targets.append(Target(f"{framework}: onnxruntime vs framework inference, batch {batch}",
                              inference["ratio"][batch], 2.0, "x"))
    for framework, flops in report["flops"].items():
        targets.append(Target(f"{framework}: onnxruntime GFLOP/s at batch {batch}, share of matmul peak",
                              100 * flops["fraction_of_matmul_peak"], 50.0, "%"))
    cold = report["cold_start"]
    for framework, required in (("torch", 3.0), ("keras", 5.0)):
        if f"{framework}_script" in cold:
            ratio = cold[f"{framework}_script"]["median"] / cold[f"classify_{framework}_export"]["median"]
            targets.append(Target(f"cold start: classify vs the {framework} script", ratio, required, "x"))
    folder = report["folder"]
    classify_rate = folder["classify"]["images_per_second"]["median"]
    targets.append(Target("folder: classify images/s, end to end", classify_rate, FOLDER_TARGET, "images/s"))
    if "imagefolder_baseline" in folder:
        baseline = folder["imagefolder_baseline"]["images_per_second"]["median"]
        targets.append(Target("folder: classify vs ImageFolder baseline", classify_rate / baseline, 2.0, "x"))
    for framework, training in report["training"].items():
        ratio = training["ours"]["images_per_second"]["median"] / training["tutorial"]["images_per_second"]["median"]
        targets.append(Target(f"{framework}: training, our stage vs the tutorial style", ratio, 1.5, "x"))
    return targets


# ---------------------------------------------------------------- report


def _stat(stats, digits=0):
    return f"{stats['median']:,.{digits}f} ({stats['min']:,.{digits}f}-{stats['max']:,.{digits}f})"


def table_rows(report):
    """Return the summary table as rows of strings, the header first."""
    targets = {target["name"]: target for target in report["targets"]}

    def verdict(name):
        target = targets.get(name)
        if target is None:
            return ""
        return f">= {_format_value(target['required'], target['unit'])}: {target['result']}"

    rows = [["measurement", "ours", "baseline", "ratio", "target"]]
    for framework, inference in report["inference"].items():
        for batch, ratio in inference["ratio"].items():
            rows.append([f"{framework} inference, batch {batch}, images/s (onnxruntime vs {framework})",
                         _stat(inference["onnxruntime"][batch]), _stat(inference["framework"][batch]),
                         f"{ratio:.2f}x",
                         verdict(f"{framework}: onnxruntime vs framework inference, batch {batch}")])
    peak = report["matmul"]["peak_gflops"]
    for framework, flops in report["flops"].items():
        rows.append([f"{framework} export: {flops['per_image'] / 1e6:.1f} MFLOP/image; onnxruntime GFLOP/s at "
                     f"batch {TARGET_BATCH} vs float32 matmul GFLOP/s", f"{flops['onnxruntime_gflops_batch64']:.1f}",
                     f"{peak:.1f}", f"{100 * flops['fraction_of_matmul_peak']:.0f}%",
                     verdict(f"{framework}: onnxruntime GFLOP/s at batch {TARGET_BATCH}, share of matmul peak")])
    cold = report["cold_start"]
    for framework in ("torch", "keras"):
        if f"{framework}_script" in cold:
            ours, script = cold[f"classify_{framework}_export"], cold[f"{framework}_script"]
            rows.append([f"cold start, s to first prediction (classify {framework} export vs {framework} script)",
                         _stat(ours, 2), _stat(script, 2), f"{script['median'] / ours['median']:.2f}x",
                         verdict(f"cold start: classify vs the {framework} script")])
    folder = report["folder"]
    classify = folder["classify"]["images_per_second"]
    baseline = folder.get("imagefolder_baseline")
    rows.append([f"folder, {folder['images']:,} files to CSV, images/s end to end (classify vs ImageFolder)",
                 _stat(classify), _stat(baseline["images_per_second"]) if baseline else "not measured",
                 f"{classify['median'] / baseline['images_per_second']['median']:.2f}x" if baseline else "",
                 verdict("folder: classify vs ImageFolder baseline")])
    rows.append(["folder, classify images/s end to end (absolute)", _stat(classify), "", "",
                 verdict("folder: classify images/s, end to end")])
    rows.append(["folder, classify images/s inside its loop vs decoding alone on one thread",
                 _stat(folder["classify"]["loop_images_per_second"]),
                 _stat(folder["decode_images_per_second_one_thread"]), "", ""])
    for framework, training in report["training"].items():
        ours, tutorial = training["ours"], training["tutorial"]
        rows.append([f"{framework} training, {ours['images']:,} images, images/s (our stage vs tutorial style)",
                     _stat(ours["images_per_second"]), _stat(tutorial["images_per_second"]),
                     f"{ours['images_per_second']['median'] / tutorial['images_per_second']['median']:.2f}x",
                     verdict(f"{framework}: training, our stage vs the tutorial style")])
        if "model-step" in training:
            step_alone = training["model-step"]["images_per_second"]
            rows.append([f"{framework} training, the model step alone on prepared batches vs tutorial style",
                         _stat(step_alone), _stat(tutorial["images_per_second"]),
                         f"{step_alone['median'] / tutorial['images_per_second']['median']:.2f}x", ""])
    footprint = report["footprint"]
    venv_bytes = footprint["predictor_venv"]["bytes"]
    for root in ("torch", "tensorflow"):
        if root in footprint:
            rows.append([f"install footprint, MB (predictor-only venv vs {root} and its dependencies)",
                         f"{venv_bytes / 1e6:,.0f}" if venv_bytes else "not measured",
                         f"{footprint[root]['bytes'] / 1e6:,.0f}",
                         f"{footprint[root]['bytes'] / venv_bytes:.1f}x smaller" if venv_bytes else "", ""])
    gpu = report["gpu"]
    if "skipped" in gpu:
        rows.append([f"GPU section: {gpu['skipped']}", "", "", "", ""])
    else:
        for name, result in gpu["training"].items():
            rows.append([f"GPU training {name}, images/s", _stat(result["images_per_second"]), "", "", ""])
        for framework, providers in gpu["onnxruntime"].items():
            if "error" in providers:
                rows.append([f"{framework} onnxruntime on CUDA failed: {providers['error']}", "", "", "", ""])
                continue
            cuda, cpu = providers["cuda"][str(BATCH_SIZES[-1])], providers["cpu"][str(BATCH_SIZES[-1])]
            rows.append([f"{framework} onnxruntime batch {BATCH_SIZES[-1]}, images/s (CUDA vs CPU provider)",
                         _stat(cuda), _stat(cpu), f"{cuda['median'] / cpu['median']:.2f}x", ""])
    return rows


def format_table(report):
    """Return the summary table as aligned plain text for the terminal."""
    rows = table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(report):
    """Return bench.md: the table, the targets, the machine and versions, and what was measured."""
    machine = report["machine"]
    machine_line = (f"{machine.get('cpu_model')}, {machine.get('physical_cores')} physical / "
                    f"{machine.get('logical_cores')} logical cores, {machine.get('memory_gib')} GiB memory, "
                    f"{machine.get('platform')}")

    def escape(cell):
        return cell.replace("|", "\\|")

    rows = table_rows(report)
    lines = [
        "# cifar-onnx benchmark",
        "",
        f"Measured {report['created']} on {machine_line}. Architecture {report['architecture']}, "
        f"data `{report['data']}`{', **--quick sizes**: not a record' if report['quick'] else ''}.",
        "Each cell is the median with (min-max) over the timed repeats, after warm-up.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "| " + " | ".join("---" for _ in rows[0]) + " |",
        *("| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows[1:]),
        "",
        "## Targets",
        "",
    ]
    met = sum(target["met"] for target in report["targets"])
    lines.append(f"{met} of {len(report['targets'])} targets met.")
    lines.append("")
    for target in report["targets"]:
        lines.append(f"- {target['name']}: {_format_value(target['measured'], target['unit'])}, target "
                     f">= {_format_value(target['required'], target['unit'])}: {target['result']}")
    lines += ["", "## Folder throughput limits measured in this run", ""]
    folder = report["folder"]
    flops = report["flops"].get("torch", next(iter(report["flops"].values())))["per_image"]
    lines.append(f"- {FOLDER_TARGET:,.0f} images/s needs {FOLDER_TARGET * flops / 1e9:.0f} GFLOP/s of network "
                 f"arithmetic ({flops / 1e6:.1f} MFLOP/image); this machine's float32 matmul peak measured "
                 f"{report['matmul']['peak_gflops']:.0f} GFLOP/s.")
    lines.append(f"- Decoding alone ran at {folder['decode_images_per_second_one_thread']['median']:,.0f} images/s "
                 f"on one thread; classify's own loop at {folder['classify']['loop_images_per_second']['median']:,.0f}"
                 " images/s.")
    lines += model_step_shares(report)
    lines += ["", f"## Where onnxruntime's time goes at batch {TARGET_BATCH}", "",
              "Share of kernel time by operator type, from onnxruntime's profiler:", ""]
    for framework, flops in report["flops"].items():
        shares = flops["onnxruntime_profile_batch64"]["share_by_operator"]
        lines.append(f"- {framework} export: " + ", ".join(f"{op} {share:.0%}" for op, share in shares.items()))
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in {**report["versions"], **report["threads"]}.items()]
    lines += ["", "## Install footprint by package (MB)", ""]
    footprint = report["footprint"]
    venv = footprint["predictor_venv"]
    lines.append(f"- predictor-only virtualenv: {venv['bytes'] / 1e6:,.0f} MB at {venv['path']}" if venv["bytes"]
                 else f"- predictor-only virtualenv: {venv['note']}")
    for root in ("torch", "tensorflow"):
        if root in footprint:
            packages = ", ".join(f"{name} {size / 1e6:,.0f}" for name, size in footprint[root]["packages"].items())
            lines.append(f"- {root}, {footprint[root]['bytes'] / 1e6:,.0f} MB in all: {packages}")
    lines += ["", f"Every raw figure is in `{JSON_NAME}` beside this file."]
    return "\n".join(lines) + "\n"


def model_step_shares(report):
    """Return bench.md lines that place each training style against the model step alone."""
    lines = []
    for framework, training in report["training"].items():
        if "model-step" not in training:
            continue
        if not lines:
            lines += ["", "## Training throughput against the model step alone", "",
                      "The model step alone is forward, backward and Adam on normalised batches prepared in memory, "
                      "with no augmentation and no loader: the work every training loop repeats.", ""]
        step = training["model-step"]["images_per_second"]["median"]
        ours = training["ours"]["images_per_second"]["median"]
        tutorial = training["tutorial"]["images_per_second"]["median"]
        lines.append(f"- {framework}: the model step alone runs {step:,.0f} images/s; our stage runs at {ours / step:.0%} "
                     f"of that rate and the tutorial style at {tutorial / step:.0%}.")
    return lines


def write_report(report, out):
    """Write OUT/bench.json and OUT/bench.md atomically; return their paths."""
    out = Path(out)
    json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
    write_text(json_path, json.dumps(report, indent=2) + "\n")
    write_text(markdown_path, format_markdown(report))
    return json_path, markdown_path
