"""The `cifar-onnx data` command: build or reuse the dataset cache and describe it."""

import time

import click


@click.command()
@click.option("--data", "source", default="cifar10", show_default=True,
              help="'cifar10' to download the canonical archive, or a folder or .tar/.tar.gz "
                   "with train/<class>/* and test/<class>/*.")
@click.option("--out", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Artifact folder; the cache goes to OUT/data/cache/.")
def data(source, out):
    """Build the cached dataset from the --data source, or reuse it while the source is unchanged.

    Prints the source, the image counts per split and class, the fingerprint and the
    cache path. The download URL of 'cifar10' can be overridden with the environment
    variable CIFAR_ONNX_CIFAR10_URL.

    Example: cifar-onnx data --data ~/datasets/cifar10-jpeg.tar.gz --out artifacts
    """
    from pipeline.data import load_dataset

    started = time.monotonic()
    dataset = load_dataset(source, out)
    elapsed = time.monotonic() - started

    train_counts = _count(dataset.train_labels, len(dataset.class_names))
    test_counts = _count(dataset.test_labels, len(dataset.class_names))
    width = max(len("class"), *(len(name) for name in dataset.class_names))
    state = "reused" if dataset.cache_reused else "built"
    click.echo(f"source:      {dataset.source}")
    click.echo(f"cache:       {dataset.cache_path} ({state} in {elapsed:.1f} s)")
    click.echo(f"fingerprint: sha256:{dataset.fingerprint}")
    click.echo(f"classes:     {len(dataset.class_names)} ({', '.join(dataset.class_names)})")
    click.echo(f"images:      {len(dataset.train_labels)} train, {len(dataset.test_labels)} test")
    click.echo(f"{'class':<{width}}  {'train':>7}  {'test':>7}")
    for index, name in enumerate(dataset.class_names):
        click.echo(f"{name:<{width}}  {train_counts[index]:>7}  {test_counts[index]:>7}")
    click.echo(f"{'total':<{width}}  {sum(train_counts):>7}  {sum(test_counts):>7}")


def _count(labels, class_count):
    import numpy as np

    return np.bincount(labels, minlength=class_count).tolist()
