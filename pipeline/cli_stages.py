"""Commands of the stages that are not built yet."""

import click

from serving.errors import CifarOnnxError


def _not_implemented(name):
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
    def command(arguments):
        raise CifarOnnxError(f"`cifar-onnx {name}` is not implemented yet")

    command.help = f"Not implemented yet: the {name} stage."
    return command


bench = _not_implemented("bench")
