"""The `cifar-onnx train` command: load the dataset, then train one framework with the recipe.

Imports no framework at module level; torch or tensorflow is imported only after
`require_framework` has checked that it is installed.
"""

import sys

import click

from pipeline.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE
from pipeline.frameworks import FRAMEWORKS, require_framework
from pipeline.recipe import AUGMENTATIONS, CROP_FILLS, SCHEDULES, Recipe
from pipeline.training import DEVICES

_DEFAULTS = Recipe()
# Recipe fields set by options; an option left at its default keeps a resumed run's saved value.
_RECIPE_OPTIONS = ("epochs", "batch_size", "lr", "schedule", "label_smoothing", "weight_decay", "seed", "limit",
                   "augment", "crop_fill")


@click.command()
@click.option("--framework", type=click.Choice(tuple(FRAMEWORKS)), required=True, help="Framework to train.")
@click.option("--arch", "architecture", type=click.Choice(tuple(ARCHITECTURES)), default=DEFAULT_ARCHITECTURE,
              show_default=True, help="Architecture specification to build.")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULTS.epochs, show_default=True,
              help="Maximum epochs; early stopping may end the run sooner.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size, show_default=True,
              help="Images per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True,
              help=f"Base Adam learning rate; one-cycle peaks at {_DEFAULTS.peak_factor:g}x this.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_DEFAULTS.schedule, show_default=True,
              help="Learning-rate schedule, stepped once per batch.")
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True),
              default=_DEFAULTS.label_smoothing, show_default=True,
              help="Training targets become (1 - s) * one-hot + s / 10. Validation and test loss use plain labels.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_DEFAULTS.weight_decay, show_default=True,
              help="Decoupled weight decay: each step multiplies conv and dense kernels by 1 - lr * this.")
@click.option("--augment", type=click.Choice(tuple(AUGMENTATIONS)), default=_DEFAULTS.augment,
              show_default=True, help="Training augmentation policy, applied batch-wise on the device.")
@click.option("--crop-fill", type=click.Choice(CROP_FILLS), default=_DEFAULTS.crop_fill, show_default=True,
              help="Fill of the crop's padding: the image's edge mirrored, or black.")
@click.option("--seed", type=click.IntRange(min=0), default=_DEFAULTS.seed, show_default=True,
              help="Seed of the validation split, --limit subset, initialisation and shuffling.")
@click.option("--data", "source", default="cifar10", show_default=True,
              help="Dataset: 'cifar10' (download) or a folder / .tar / .tar.gz with train/<class>/ and test/<class>/.")
@click.option("--out", type=click.Path(file_okay=False), default="artifacts", show_default=True,
              help="Artifact folder; the run writes OUT/<framework>/.")
@click.option("--limit", type=click.IntRange(min=10), default=None,
              help="Smoke runs: a class-balanced subset of N training images (a tenth of them for validation) "
                   "and at most N test images.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT/<framework>/ after its last epoch.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto picks cuda, then mps (torch only), then cpu.")
@click.option("--mixed-precision", is_flag=True, help="Train with float16/bfloat16 autocast (GPU only).")
def train(framework, architecture, source, out, resume, device, mixed_precision, **options):
    """Train the CNN in one framework with the shared recipe.

    Writes OUT/<framework>/: model.pt or model.keras (best validation accuracy),
    history.csv, metrics.json and curves.png. Ctrl-C or SIGTERM keeps the last
    completed epoch; --resume continues from it.

    Example: cifar-onnx train --framework torch --data cifar10 --epochs 10
    """
    from pathlib import Path

    from pipeline.data import load_dataset

    require_framework(framework)
    recipe = _recipe_for(framework, Path(out), resume, options)
    dataset = load_dataset(source, out)

    if framework == "torch":
        from pipeline.torch_train import train_model
    else:
        from pipeline.keras_train import train_model
    try:
        metrics = train_model(dataset, architecture, recipe, out, device=device,
                              mixed_precision=mixed_precision, resume=resume)
    except KeyboardInterrupt:
        sys.exit(130)  # the train module has logged what was kept
    click.echo(
        f"{framework} {architecture}: test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['test_images']} images), best epoch {metrics['best_epoch']}, "
        f"outputs in {Path(out) / framework}"
    )


def _recipe_for(framework, out, resume, options):
    """Return the Recipe from the options; on --resume, the saved recipe with the options given explicitly."""
    from pipeline import training

    values = {name: options[name] for name in _RECIPE_OPTIONS}
    if not resume:
        return Recipe(**values)
    state = training.read_state(out / framework, framework)
    saved = Recipe.from_dict(state.recipe)
    context = click.get_current_context()
    explicit = {
        name: value for name, value in values.items()
        if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }
    return Recipe(**{**saved.to_dict(), **explicit})
