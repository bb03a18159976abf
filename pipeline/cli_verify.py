"""The `cifar-onnx verify` command."""

import click

from pipeline.frameworks import FRAMEWORKS
from pipeline.verify import DEFAULT_ATOL, DEFAULT_RTOL


@click.command()
@click.option("--framework", type=click.Choice([*FRAMEWORKS, "both"]), default="both", show_default=True,
              help="Whose export to check and whose weights to move into the other build; "
                   "both means every framework with a checkpoint and an export under OUT.")
@click.option("--data", default=None,
              help="Dataset source the models were trained on: cifar10, or a folder / .tar / .tar.gz  "
                   "[default: the source recorded in OUT/<framework>/metrics.json, else cifar10]")
@click.option("--out", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Artifact folder with OUT/<framework>/ checkpoints and model.onnx; the report goes here.")
@click.option("--atol", type=click.FloatRange(min=0), default=DEFAULT_ATOL, show_default=True,
              help="Absolute tolerance on logits and probabilities.")
@click.option("--rtol", type=click.FloatRange(min=0), default=DEFAULT_RTOL, show_default=True,
              help="Relative tolerance (fraction of |reference|) for framework vs export.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Compare only the first N test images  [default: the whole test split]")
def verify(framework, data, out, atol, rtol, samples):
    """Prove each export computes what its framework computes, and that the frameworks agree.

    For each framework with a checkpoint and an export under OUT: the framework model
    vs its ONNX file on test images and edge inputs, and the trained weights moved
    into the other framework's build and exported by its exporter. Prints one line per
    check, writes OUT/verify.json and OUT/verify.md, and exits 1 if any check failed.

    Example: cifar-onnx verify --data cifar10 --out artifacts
    """
    import importlib.util

    from pipeline.errors import VerificationError
    from pipeline.verify import run_verify, write_report

    if importlib.util.find_spec("onnx") is None:
        raise VerificationError("verify needs the onnx package and both frameworks: "
                                "run pip install 'cifar-onnx[torch,keras]'")

    if data is None:
        from pipeline.bench import recorded_data_source

        data = recorded_data_source(out) or "cifar10"
    frameworks = None if framework == "both" else [framework]
    report = run_verify(data, out, frameworks=frameworks, atol=atol, rtol=rtol, samples=samples)
    for check in report.checks:
        click.echo(check.line())
    json_path, markdown_path = write_report(report, out)
    passed = len(report.checks) - len(report.failed)
    click.echo(f"{passed}/{len(report.checks)} checks passed; report: {json_path}, {markdown_path}")
    if report.failed:
        names = "; ".join(check.name for check in report.failed)
        raise VerificationError(f"{len(report.failed)} check(s) failed: {names}")
