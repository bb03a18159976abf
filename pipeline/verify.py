"""Verify: each export computes what its framework computes, and both frameworks agree.

This process imports neither framework. Framework inference, weight dumps and
transferred checkpoints come from `pipeline.worker` subprocesses and the exporter
command, one framework per process; onnxruntime runs here. Every check runs even
after another failed, and the report lists them all.
"""

import dataclasses
import datetime
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from exporters.metadata import FULL_TEST_SPLIT, sha256_file
from pipeline.compare import compare_outputs
from pipeline.frameworks import FRAMEWORKS
from pipeline.training import write_text
from serving.contract import (
    CHANNELS, IMAGE_SIZE, INPUT_NAME, META_CHECKPOINT_SHA256, META_CLASS_NAMES, META_DATASET_FINGERPRINT,
    META_TEST_ACCURACY, META_TEST_ACCURACY_SCOPE,
    OUTPUT_NAMES,
)

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4  # max |difference| of logits and probabilities allowed
DEFAULT_RTOL = 1e-3  # plus this fraction of |reference|
# The framework and its export run the same weights on the same split, so their
# accuracies may differ only by near-ties. The accuracy recorded at training time came
# from evaluation batches of another size, so it may differ by this many images.
RECORDED_ACCURACY_SLACK_IMAGES = 2
ORT_BATCH_SIZE = 256
CHECKPOINT_NAMES = {"torch": "model.pt", "keras": "model.keras"}


@dataclasses.dataclass
class CheckResult:
    """One line of the report: what was compared, the measured value, the threshold, pass or fail."""

    name: str
    passed: bool
    measured: str
    threshold: str
    detail: str = ""

    def line(self):
        status = "PASS" if self.passed else "FAIL"
        text = f"{status}  {self.name:<64} {self.measured:<22} {self.threshold}"
        return f"{text}  ({self.detail})" if self.detail else text


@dataclasses.dataclass
class Report:
    """Every check of one verify run, with what it ran on."""

    checks: list
    environment: dict
    files: dict
    settings: dict
    disagreements: list = dataclasses.field(default_factory=list)

    @property
    def failed(self):
        return [check for check in self.checks if not check.passed]


def edge_images(seed=0):
    """Return uint8 [7, 32, 32, 3]: all 0, all 255, then five images of uniform noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(7, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    return images


def _run(command, what):
    """Run a subprocess; return None on success or the last line of its stderr."""
    logger.info("%s", what)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {result.returncode}"
    logger.debug("%s failed:\n%s", what, result.stderr)
    return f"{what} failed: {reason}"


def _worker(task, framework, **options):
    command = [sys.executable, "-m", "pipeline.worker", task, "--framework", framework]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def _onnx_outputs(path, inputs):
    """Run each uint8 batch of `inputs` through the ONNX file; return a list of (logits, probabilities)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results = []
    for images in inputs:
        parts = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start:start + ORT_BATCH_SIZE]})
                 for start in range(0, len(images), ORT_BATCH_SIZE)]
        results.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return results


def _framework_outputs(framework, checkpoint, work, inputs, tag):
    """Run the framework model on each batch of `inputs` in a worker; return outputs or an error."""
    command = _worker("infer", framework, checkpoint=checkpoint)
    output_paths = []
    for index, images in enumerate(inputs):
        images_path, output_path = work / f"{tag}-images-{index}.npy", work / f"{tag}-outputs-{index}.npz"
        np.save(images_path, images)
        command += ["--images", str(images_path), "--output", str(output_path)]
        output_paths.append(output_path)
    sizes = " + ".join(f"{len(images):,}" for images in inputs)
    error = _run(command, f"{framework}: framework inference on {sizes} images")
    if error:
        return None, error
    outputs = []
    for output_path in output_paths:
        with np.load(output_path, allow_pickle=False) as archive:
            outputs.append((archive["logits"], archive["probabilities"]))
    return outputs, None


def _metadata(path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def _difference_checks(prefix, comparison, what, atol, rtol):
    threshold = f"<= atol {atol:g} + rtol {rtol:g}*|ref|"
    return [
        CheckResult(f"{prefix}: logits, {what}", comparison.required_atol_logits <= atol,
                    f"max|diff| {comparison.max_abs_logits:.2e}", threshold,
                    f"max rel {comparison.max_rel_logits:.2e}; smallest passing atol "
                    f"{comparison.required_atol_logits:.1e}"),
        CheckResult(f"{prefix}: probabilities, {what}", comparison.required_atol_probabilities <= atol,
                    f"max|diff| {comparison.max_abs_probabilities:.2e}", threshold,
                    f"max rel {comparison.max_rel_probabilities:.2e}; smallest passing atol "
                    f"{comparison.required_atol_probabilities:.1e}"),
    ]


def _agreement_check(name, comparison, allow_near_ties):
    unexplained = [d for d in comparison.disagreements if not (allow_near_ties and d["near_tie"])]
    detail = ""
    if comparison.disagreements:
        shown = "; ".join(
            f"image {d['index']}: reference {d['reference_top2']} vs export {d['candidate_top2']}"
            f"{' (near-tie)' if d['near_tie'] else ''}" for d in comparison.disagreements[:5])
        detail = f"{len(comparison.disagreements)} differ, {len(unexplained)} unexplained: {shown}"
    return CheckResult(name, not unexplained, f"{comparison.top1_agreement:.2%}",
                       "100%" + (" or near-ties" if allow_near_ties else ""), detail)


def verify_framework(framework, checkpoint, export, test, edges, work, atol, rtol, full_test):
    """Return (checks, comparison on the test images or None) for one framework vs its ONNX file."""
    from exporters.checks import check_contract

    images, labels, class_names, fingerprint = test
    checks = []

    contract = check_contract(export)
    failed = [c for c in contract if not c.passed]
    checks.append(CheckResult(
        f"{framework}: export contract", not failed, f"{len(contract) - len(failed)}/{len(contract)} passed",
        "all", "; ".join(f"{c.name}: {c.detail}" for c in failed)))
    if any(c.name in ("ONNX file readable", "onnxruntime session") for c in failed):
        return checks, None

    # The export must come from this checkpoint and the data must be what it was trained on.
    metadata = _metadata(export)
    exported_classes = json.loads(metadata.get(META_CLASS_NAMES, "null"))
    checks.append(CheckResult(
        f"{framework}: class names of the data = export's", exported_classes == list(class_names),
        f"{len(class_names)} classes", f"= {len(exported_classes or [])} in export",
        "" if exported_classes == list(class_names) else
        f"data has {list(class_names)}, export has {exported_classes}: pass the training data with --data"))
    exported_fingerprint = metadata.get(META_DATASET_FINGERPRINT, "")
    checks.append(CheckResult(
        f"{framework}: data fingerprint = training's", exported_fingerprint == fingerprint,
        f"sha256 {fingerprint[:12]}", f"= {exported_fingerprint[:12]}",
        "" if exported_fingerprint == fingerprint else "pass the data the model was trained on with --data"))
    recorded = metadata.get(META_CHECKPOINT_SHA256, "")
    actual = sha256_file(checkpoint)
    checks.append(CheckResult(
        f"{framework}: export made from this checkpoint", recorded == actual, f"sha256 {recorded[:12]}",
        f"= {actual[:12]}", "" if recorded == actual else f"re-export: cifar-onnx export --framework {framework}"))

    inputs = [images, edges, edges[:1]]
    reference, error = _framework_outputs(framework, checkpoint, work, inputs, framework)
    if error:
        checks.append(CheckResult(f"{framework}: framework inference", False, "error", "runs", error))
        return checks, None
    candidate = _onnx_outputs(export, inputs)

    on_test = compare_outputs(reference[0], candidate[0], atol=atol, rtol=rtol, labels=labels,
                              class_names=class_names)
    edge_reference = tuple(np.concatenate([reference[1][i], reference[2][i]]) for i in range(2))
    edge_candidate = tuple(np.concatenate([candidate[1][i], candidate[2][i]]) for i in range(2))
    on_edges = compare_outputs(edge_reference, edge_candidate, atol=atol, rtol=rtol)

    checks += _difference_checks(framework, on_test, f"{on_test.count:,} test images", atol, rtol)
    checks += _difference_checks(framework, on_edges, "7 edge inputs, batch 7 and 1", atol, rtol)
    nonfinite = sum(c.nonfinite_reference + c.nonfinite_candidate for c in (on_test, on_edges))
    checks.append(CheckResult(f"{framework}: no NaN or Inf", nonfinite == 0, f"{nonfinite} non-finite", "0"))
    checks.append(_agreement_check(f"{framework}: top-1 agreement, test images", on_test, allow_near_ties=True))

    # Accuracies may differ only through explained near-ties.
    reference_correct = np.argmax(reference[0][0], axis=1) == labels
    candidate_correct = np.argmax(candidate[0][0], axis=1) == labels
    near_ties = {d["index"] for d in on_test.disagreements if d["near_tie"]}
    unexplained = [int(i) for i in np.flatnonzero(reference_correct != candidate_correct) if i not in near_ties]
    checks.append(CheckResult(
        f"{framework}: test accuracy, export vs framework", not unexplained,
        f"{on_test.candidate_accuracy:.2%} vs {on_test.reference_accuracy:.2%}", "equal",
        f"images {unexplained[:10]} change correctness without a near-tie" if unexplained else ""))

    recorded_accuracy = json.loads(metadata.get(META_TEST_ACCURACY, "null"))
    recorded_on_full_split = metadata.get(META_TEST_ACCURACY_SCOPE) == FULL_TEST_SPLIT
    if full_test and recorded_on_full_split and recorded_accuracy is not None:
        slack = RECORDED_ACCURACY_SLACK_IMAGES / len(labels)
        gap = abs(on_test.candidate_accuracy - recorded_accuracy)
        checks.append(CheckResult(
            f"{framework}: test accuracy vs training record", gap <= slack + 1e-12,
            f"{on_test.candidate_accuracy:.2%} vs {recorded_accuracy:.2%}",
            f"within {RECORDED_ACCURACY_SLACK_IMAGES} images",
            "" if gap <= slack else "preprocessing or weights changed since training: retrain or re-export"))
    return checks, on_test


def verify_transfer(source, target, checkpoint, export, test, edges, work, out, atol):
    """Return the checks of `source`'s weights moved into `target`'s build, exported by `target`'s exporter."""
    prefix = f"transfer {source} -> {target}"
    transfer_dir = Path(out) / "transfer"
    transfer_dir.mkdir(parents=True, exist_ok=True)
    weights, info = work / f"{source}-weights.npz", work / f"{source}-info.json"
    transferred = transfer_dir / f"{source}-to-{target}" / CHECKPOINT_NAMES[target]
    transferred_export = transfer_dir / f"{source}-to-{target}.onnx"

    steps = [
        (_worker("dump-weights", source, checkpoint=checkpoint, weights=weights, info=info),
         f"{prefix}: dump {source} weights"),
        (_worker("load-weights", target, checkpoint=transferred, weights=weights, info=info),
         f"{prefix}: load them into the {target} build"),
        ([sys.executable, "-m", "pipeline.cli", "export", "--framework", target, "--checkpoint",
          str(transferred), "--output", str(transferred_export), "--force"],
         f"{prefix}: export with the {target} exporter"),
    ]
    for command, what in steps:
        error = _run(command, what)
        if error:
            return [CheckResult(f"{prefix}: weights moved and exported", False, "error", "runs", error)]

    images, labels, class_names, _ = test
    try:
        reference = _onnx_outputs(export, [images, edges])
        candidate = _onnx_outputs(transferred_export, [images, edges])
    except Exception as error:  # onnxruntime's load and run errors share no public base class
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [CheckResult(f"{prefix}: both exports run", False, "error", "runs", reason)]
    comparison = compare_outputs(
        tuple(np.concatenate([reference[0][i], reference[1][i]]) for i in range(2)),
        tuple(np.concatenate([candidate[0][i], candidate[1][i]]) for i in range(2)),
        atol=atol, rtol=0.0, class_names=class_names)
    threshold = f"<= {atol:g}"
    what = f"{len(images):,} test + 7 edge images"
    return [
        CheckResult(f"{prefix}: logits, {what}", comparison.max_abs_logits <= atol,
                    f"max|diff| {comparison.max_abs_logits:.2e}", threshold,
                    f"smallest passing atol {comparison.max_abs_logits:.1e}"),
        _agreement_check(f"{prefix}: top-1 agreement", comparison, allow_near_ties=False),
    ]


def _environment():
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers_available": onnxruntime.get_available_providers(),
        "onnxruntime_provider_used": "CPUExecutionProvider",
    }


def run_verify(data, out, *, frameworks=None, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, samples=None):
    """Run every check for the checkpoints and exports under `out`; return the Report.

    `frameworks` (default: every framework with a checkpoint and an export) selects
    whose export is checked and whose weights are moved into the other build.
    `samples` limits the test images compared (default: the whole test split).
    Raises VerificationError when a selected framework lacks its checkpoint or export.
    """
    from pipeline.data import load_dataset
    from pipeline.errors import VerificationError

    out = Path(out)
    ready = [fw for fw in FRAMEWORKS
             if (out / fw / CHECKPOINT_NAMES[fw]).is_file() and (out / fw / "model.onnx").is_file()]
    present = ready if frameworks is None else list(frameworks)
    missing = [fw for fw in present if fw not in ready]
    if missing or not present:
        names = missing or list(FRAMEWORKS)
        raise VerificationError(
            f"nothing to verify for {', '.join(names)} under {out}: expected OUT/<framework>/ with a checkpoint "
            f"(model.pt or model.keras) and model.onnx; run `cifar-onnx train` and `cifar-onnx export` first")

    dataset = load_dataset(data, out)
    count = len(dataset.test_images) if samples is None else min(samples, len(dataset.test_images))
    # A seeded sample in split order: the test split is stored class by class, so its
    # first N images would all be of one class.
    chosen = np.sort(np.random.default_rng(0).permutation(len(dataset.test_images))[:count])
    test = (dataset.test_images[chosen], dataset.test_labels[chosen], list(dataset.class_names),
            dataset.fingerprint)
    edges = edge_images()
    checks, files, disagreements = [], {}, []
    work = Path(tempfile.mkdtemp(prefix="verify-", dir=out))
    try:
        for framework in present:
            checkpoint, export = out / framework / CHECKPOINT_NAMES[framework], out / framework / "model.onnx"
            files[str(checkpoint)] = sha256_file(checkpoint)
            files[str(export)] = sha256_file(export)
            framework_checks, on_test = verify_framework(
                framework, checkpoint, export, test, edges, work, atol, rtol,
                full_test=count == len(dataset.test_images))
            checks += framework_checks
            if on_test is not None:
                disagreements += [{"framework": framework, **d} for d in on_test.disagreements]
        for source in present:
            target = "keras" if source == "torch" else "torch"
            checkpoint, export = out / source / CHECKPOINT_NAMES[source], out / source / "model.onnx"
            checks += verify_transfer(source, target, checkpoint, export, test, edges, work, out, atol)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return Report(
        checks=checks, environment=_environment(), files=files, disagreements=disagreements,
        settings={"data": str(data), "out": str(out), "atol": atol, "rtol": rtol, "test_images": count,
                  "frameworks": present,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    )


def write_report(report, out):
    """Write OUT/verify.json and OUT/verify.md; return their paths."""
    out = Path(out)
    as_dict = {
        "passed": not report.failed,
        "settings": report.settings,
        "checks": [dataclasses.asdict(check) for check in report.checks],
        "failed": [check.name for check in report.failed],
        "disagreements": report.disagreements,
        "environment": report.environment,
        "files_sha256": report.files,
    }
    json_path, markdown_path = out / "verify.json", out / "verify.md"
    write_text(json_path, json.dumps(as_dict, indent=2, default=str) + "\n")

    settings = report.settings
    lines = [
        "# cifar-onnx verification",
        "",
        f"{'PASSED' if not report.failed else 'FAILED'}: {len(report.checks) - len(report.failed)} of "
        f"{len(report.checks)} checks passed, {settings['created']}, {settings['test_images']:,} test images "
        f"from `{settings['data']}`, atol {settings['atol']:g}, rtol {settings['rtol']:g}.",
        "",
        "| result | check | measured | threshold | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for check in report.checks:
        cells = [cell.replace("|", "\\|") for cell in (check.name, check.measured, check.threshold, check.detail)]
        lines.append(f"| {'pass' if check.passed else '**FAIL**'} | " + " | ".join(cells) + " |")
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in report.environment.items()]
    lines += ["", "## Files (sha256)", ""]
    lines += [f"- `{path}`: `{digest}`" for path, digest in report.files.items()]
    write_text(markdown_path, "\n".join(lines) + "\n")
    return json_path, markdown_path
