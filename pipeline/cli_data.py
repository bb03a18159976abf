"""The `cifar-onnx data` command."""

import click

from serving.errors import CifarOnnxError


@click.command()
@click.option("--data", "source", default="cifar10", show_default=True)
@click.option("--out", default="artifacts", show_default=True)
def data(source, out):
    """Not implemented yet: build the cached dataset."""
    raise CifarOnnxError("`cifar-onnx data` is not implemented yet")
