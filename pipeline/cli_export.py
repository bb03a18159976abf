"""The `cifar-onnx export` command: one framework's checkpoint to OUT/<framework>/model.onnx."""

import collections
import logging
from pathlib import Path

import click

from exporters import DEFAULT_OPSET
from pipeline.errors import ExportError
from pipeline.frameworks import FRAMEWORKS, require_framework

logger = logging.getLogger(__name__)

CHECKPOINT_NAMES = {"torch": "model.pt", "keras": "model.keras"}
ONNX_NAME = "model.onnx"


def checkpoint_path(out, framework):
    """Return where `cifar-onnx train` writes the checkpoint of `framework` under `out`."""
    return Path(out) / framework / CHECKPOINT_NAMES[framework]


def export_path(out, framework):
    """Return where `cifar-onnx export` writes the ONNX file of `framework` under `out`."""
    return Path(out) / framework / ONNX_NAME


def run_export(framework, checkpoint, path, opset):
    """Export in this process with the exporter of `framework`; return the contract checks."""
    require_framework(framework)
    if framework == "torch":
        from exporters import torch_onnx as exporter
    else:
        from exporters import keras_onnx as exporter
    return exporter.export_onnx(checkpoint, path, opset)


def summarize_export(path, checks):
    """Return the printed summary of the export at `path` as a list of lines."""
    import onnx

    from exporters.checks import describe_signature

    model = onnx.load(str(path))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    lines = [
        f"export     {path}",
        f"size       {path.stat().st_size / 1e6:.2f} MB",
        f"opset      {opsets}",
    ]
    lines += [f"input      {describe_signature(value)}" for value in model.graph.input]
    lines += [f"output     {describe_signature(value)}" for value in model.graph.output]
    lines.append(f"nodes      {sum(counts.values())}: "
                 + ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))))
    lines += [f"check      {'pass' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in checks]
    return lines


@click.command()
@click.option("--framework", type=click.Choice(list(FRAMEWORKS)), required=True,
              help="Which trained checkpoint to export.")
@click.option("--out", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Artifact folder: reads OUT/<framework>/ checkpoint, writes OUT/<framework>/model.onnx.")
@click.option("--opset", type=click.IntRange(min=1), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset to write; the default is the highest the whole chain supports.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to export instead of the one under OUT.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write instead of OUT/<framework>/model.onnx.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
def export(framework, out, opset, checkpoint, output, force):
    """Export a trained checkpoint to the ONNX contract.

    PyTorch goes through torch.onnx (dynamo), Keras through tf2onnx. The file is
    checked (onnx checker, shape inference, signatures, metadata, no training-only
    ops, dynamic batch in onnxruntime) before it replaces OUT/<framework>/model.onnx.

    Example: cifar-onnx export --framework torch --out artifacts
    """
    source = Path(checkpoint) if checkpoint else checkpoint_path(out, framework)
    if not source.exists():
        raise ExportError(f"no checkpoint at {source}: run `cifar-onnx train --framework {framework} "
                          f"--out {out}` first")
    # Re-exporting replaces OUT/<framework>/model.onnx; a file the user named is kept unless --force.
    if output and Path(output).exists() and not force:
        raise click.BadParameter(f"{output} exists; pass --force to overwrite it", param_hint="'--output'")
    path = Path(output) if output else export_path(out, framework)
    checks = run_export(framework, source, path, opset)
    for line in summarize_export(path, checks):
        click.echo(line)
    click.echo(f"next       cifar-onnx verify --out {out}")
    click.echo(f"           cifar-onnx classify IMAGES... --model {path}")
