"""Bench: the FLOP count, the test-folder extraction and the footprint on known inputs, then a --quick run end to end.

The end-to-end test runs `cifar-onnx bench --quick` as a subprocess on briefly
trained exports of both frameworks. It checks that every section contains positive
figures, never a time or a ratio: those depend on the machine.
"""

import json

import numpy as np
import pytest

from conftest import run_cli
from onnx_models import build_color_probe
from pipeline.bench import (
    BATCH_SIZES, BenchmarkError, Target, count_flops, dependency_closure_bytes, prepare_test_folder,
    profile_onnxruntime, recorded_data_source,
)


def _conv_gemm_model(path, groups=1):
    """Write a graph: [batch, 4, 8, 8] -> Conv 3x3 (6 filters, pad 1) -> mean over H, W -> Gemm to 5 outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((6, 4 // groups, 3, 3), dtype=np.float32), "conv_weight"),
        numpy_helper.from_array(rng.standard_normal((6, 5), dtype=np.float32), "dense_weight"),
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_weight"], ["features"], pads=[1, 1, 1, 1], group=groups),
        helper.make_node("ReduceMean", ["features", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "dense_weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv-gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_count_flops_conv_and_gemm(tmp_path):
    flops = count_flops(_conv_gemm_model(tmp_path / "model.onnx"))

    conv = 2 * 6 * 4 * 3 * 3 * 8 * 8  # 2 * Cout * Cin * kh * kw * Hout * Wout
    gemm = 2 * 1 * 5 * 6  # 2 * M * N * K
    assert flops["by_operator"] == {"Conv": conv, "Gemm": gemm}
    assert flops["per_image"] == conv + gemm


def test_count_flops_grouped_conv(tmp_path):
    flops = count_flops(_conv_gemm_model(tmp_path / "model.onnx", groups=2))

    assert flops["by_operator"]["Conv"] == 2 * 6 * 2 * 3 * 3 * 8 * 8


def test_count_flops_matmul(tmp_path):
    flops = count_flops(build_color_probe(tmp_path / "probe.onnx"))

    assert flops["by_operator"] == {"MatMul": 2 * 3 * 10}


def test_count_flops_unknown_shape(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # A MatMul of two graph inputs whose inner dimension is symbolic cannot be counted.
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "symbolic",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "k"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["k", 4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "symbolic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    with pytest.raises(BenchmarkError, match="unknown"):
        count_flops(path)


def test_profile_shares_by_operator(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)

    profile = profile_onnxruntime(build_color_probe(tmp_path / "probe.onnx"), images, 4, 16, tmp_path)

    shares = profile["share_by_operator"]
    # onnxruntime fuses MatMul and Add into one Gemm kernel, so the graph's first operators are checked.
    assert "Cast" in shares
    assert "ReduceMean" in shares
    assert sum(shares.values()) == pytest.approx(1.0)
    assert profile["kernel_ms"] > 0


def test_prepare_test_folder_from_tarball(shared_tarball, tmp_path):
    count, origin = prepare_test_folder(shared_tarball, None, tmp_path / "test", per_class=3)

    classes = sorted(p.name for p in (tmp_path / "test").iterdir())
    assert count == 30
    assert len(classes) == 10
    assert all(len(list((tmp_path / "test" / name).iterdir())) == 3 for name in classes)
    assert "test/" in origin


def test_prepare_test_folder_from_arrays(tmp_path):
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 1])

    count, origin = prepare_test_folder("cifar10", (images, labels, ["cat", "dog"]), tmp_path / "test",
                                        per_class=2)

    assert count == 3
    assert sorted(p.name for p in (tmp_path / "test" / "dog").iterdir()) == ["00001.jpg", "00002.jpg"]
    assert "JPEG" in origin


def test_dependency_closure_follows_requirements():
    sizes = dependency_closure_bytes("onnx")

    assert "onnx" in sizes
    assert "numpy" in sizes  # onnx requires numpy
    assert all(size > 0 for size in sizes.values())


def test_recorded_data_source_from_metrics(tmp_path):
    assert recorded_data_source(tmp_path) is None
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "metrics.json").write_text(json.dumps({"dataset_source": "/data/cifar.tar.gz"}))

    assert recorded_data_source(tmp_path) == "/data/cifar.tar.gz"


def test_target_describes_shortfall():
    assert Target("t", 2.5, 2.0, "x").describe() == "met"
    assert Target("t", 1.5, 2.0, "x").describe() == "missed by 0.50x (75% of the target)"


def test_bench_without_exports_names_the_fix(tmp_path):
    result = run_cli("bench", "--quick", "--out", tmp_path)

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: nothing to benchmark")
    assert "cifar-onnx export" in last
    assert not (tmp_path / "bench.json").exists()


@pytest.fixture(scope="module")
def exported_out(trained_out):
    """Out folder with both frameworks of cnn-3block trained briefly and exported."""
    out = trained_out("torch", "cnn-3block")
    assert trained_out("keras", "cnn-3block") == out
    for framework in ("torch", "keras"):
        if not (out / framework / "model.onnx").is_file():
            result = run_cli("export", "--framework", framework, "--out", out)
            assert result.returncode == 0, result.stderr[-3000:]
    return out


def _positive(stats):
    return stats["median"] > 0 and stats["min"] > 0 and stats["max"] >= stats["median"]


@pytest.mark.slow
def test_bench_quick_reports_every_section(shared_tarball, exported_out):
    # No --data: bench reads the source that training recorded in metrics.json.
    result = run_cli("bench", "--quick", "--out", exported_out)

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((exported_out / "bench.json").read_text())
    assert report["quick"] is True
    assert report["data"] == str(shared_tarball)
    for key in ("cpu_model", "logical_cores", "memory_gib"):
        assert report["machine"][key]
    for key in ("onnxruntime", "numpy", "torch", "tensorflow", "keras"):
        assert key in report["versions"]
    assert "torch_threads" in report["threads"]

    for framework in ("torch", "keras"):
        inference = report["inference"][framework]
        for batch in map(str, BATCH_SIZES):
            assert _positive(inference["onnxruntime"][batch])
            assert _positive(inference["framework"][batch])
            assert inference["ratio"][batch] > 0
        assert report["flops"][framework]["onnxruntime_gflops_batch64"] > 0
        assert "Conv" in report["flops"][framework]["onnxruntime_profile_batch64"]["share_by_operator"]
        training = report["training"][framework]
        assert _positive(training["ours"]["images_per_second"])
        assert _positive(training["tutorial"]["images_per_second"])
        assert _positive(training["model-step"]["images_per_second"])
        assert training["ours"]["images"] == training["tutorial"]["images"] == training["model-step"]["images"]
        assert _positive(report["cold_start"][f"classify_{framework}_export"])
        assert _positive(report["cold_start"][f"{framework}_script"])
    # One architecture: both exporters' graphs must do the same arithmetic.
    assert report["flops"]["torch"]["per_image"] == report["flops"]["keras"]["per_image"] > 0
    for rates in report["matmul"]["by_size"].values():
        assert _positive(rates["numpy_gflops"])
        assert _positive(rates["onnxruntime_gflops"])
    assert report["matmul"]["peak_gflops"] > 0

    folder = report["folder"]
    assert folder["images"] == 200
    assert _positive(folder["classify"]["images_per_second"])
    assert _positive(folder["imagefolder_baseline"]["images_per_second"])
    assert _positive(folder["classify"]["loop_images_per_second"])
    assert _positive(folder["decode_images_per_second_one_thread"])

    footprint = report["footprint"]
    assert footprint["torch"]["bytes"] > 0
    assert "torch" in footprint["torch"]["packages"]
    assert footprint["tensorflow"]["bytes"] > 0
    assert "keras" in footprint["tensorflow"]["packages"]
    assert footprint["predictor_venv"]["bytes"] is None or footprint["predictor_venv"]["bytes"] > 0
    assert "skipped" in report["gpu"] or report["gpu"]["training"]

    names = [target["name"] for target in report["targets"]]
    assert len(names) == 10
    assert all(target["measured"] > 0 for target in report["targets"])

    markdown = (exported_out / "bench.md").read_text()
    assert "| measurement | ours | baseline | ratio | target |" in markdown
    assert "## Targets" in markdown
    assert "## Where onnxruntime's time goes" in markdown
    assert "## Training throughput against the model step alone" in markdown
    assert "measurement" in result.stdout.splitlines()[0]
    assert "targets met; report:" in result.stdout
