"""The `cifar-onnx` command: one click group over every stage.

Each command lives in a light module and imports torch or tensorflow only when it
runs, so `cifar-onnx classify` starts fast where neither framework is installed.
"""

import logging
import signal
import sys

import click

from serving.errors import CifarOnnxError


class _Group(click.Group):
    """Report the project's own errors as one line on stderr and exit 1."""

    def invoke(self, ctx):
        # SIGTERM unwinds like Ctrl-C, so temporary files and worker processes are cleaned up.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return super().invoke(ctx)
        except CifarOnnxError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            # An --out or --output path that cannot be created or written, a full disk.
            where = f" {error.filename}" if error.filename else ""
            click.echo(f"error: cannot write or read{where}: {error.strerror or error}; check the path and "
                       "its permissions", err=True)
            sys.exit(1)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
def main(verbose):
    """Train a CIFAR-10 CNN in PyTorch or Keras, export it to ONNX, verify and serve it."""
    # Our packages log at INFO; the libraries underneath (onnxscript's optimizer,
    # tf2onnx) only from WARNING, or their chatter buries the progress lines.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    for package in ("pipeline", "exporters", "serving"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
    # Library warnings (Pillow's decompression-bomb notice, for one) become one log line.
    logging.captureWarnings(True)


def _register_commands():
    from pipeline.cli_data import data
    from pipeline.cli_export import export
    from pipeline.cli_bench import bench
    from pipeline.cli_train import train
    from pipeline.cli_verify import verify
    from serving.cli import classify

    for command in (data, train, export, verify, classify, bench):
        main.add_command(command)


_register_commands()
if __name__ == "__main__":
    main()
