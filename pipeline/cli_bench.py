"""The `cifar-onnx bench` command."""

import click


@click.command()
@click.option("--data", default=None,
              help="Dataset source the models were trained on: cifar10, or a folder / .tar / .tar.gz  "
                   "[default: the source recorded in OUT/<framework>/metrics.json, else cifar10]")
@click.option("--out", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Artifact folder with OUT/<framework>/ checkpoints and model.onnx; the report goes here.")
@click.option("--quick", is_flag=True,
              help="Run every measurement on small sizes (about 70 s on 2 cores); its figures are not a record.")
def bench(data, out, quick):
    """Measure the pipeline side by side with what a framework user would run instead.

    Uses every framework with a checkpoint and an export under OUT. Measures inference
    images/s of onnxruntime vs the framework at batch 1, 64 and 256, and the network's
    FLOPs against the machine's float32 matmul GFLOP/s. Compares the cold start of
    classify with a minimal framework script, and folder throughput with a torchvision
    ImageFolder loop. Compares training images/s of our stage with tutorial-style code,
    and the install footprint. A GPU section runs when CUDA is present. Prints a table,
    writes OUT/bench.json and OUT/bench.md.

    Example: cifar-onnx bench --out artifacts
    """
    from pipeline.bench import format_table, run_bench, write_report

    report = run_bench(data, out, quick=quick)
    click.echo(format_table(report))
    json_path, markdown_path = write_report(report, out)
    met = sum(target["met"] for target in report["targets"])
    click.echo(f"{met}/{len(report['targets'])} targets met; report: {json_path}, {markdown_path}")
