"""The `cifar-onnx classify` command."""

import click

from serving.errors import CifarOnnxError


@click.command()
@click.argument("paths", nargs=-1)
def classify(paths):
    """Not implemented yet: classify images with an ONNX model."""
    raise CifarOnnxError("`cifar-onnx classify` is not implemented yet")
