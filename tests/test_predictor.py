"""Predictor: contract checks at load time, input checks, batching and providers, on real sessions."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from onnx_models import build_color_probe, color_probe_metadata, color_probe_probabilities
from serving import CIFAR10_CLASSES, Prediction, Predictor
from serving.contract import META_CLASS_NAMES, META_OPSET, META_TEST_ACCURACY
from serving.errors import ImageError, ModelContractError, ProviderError

SOLID_COLORS = {  # colour -> the probe's label
    (255, 0, 0): "airplane",
    (0, 255, 0): "automobile",
    (0, 0, 255): "bird",
    (255, 255, 255): "cat",
    (0, 0, 0): "deer",
}


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    return build_color_probe(tmp_path_factory.mktemp("model") / "probe.onnx")


@pytest.fixture(scope="module")
def predictor(probe_path):
    return Predictor(probe_path, providers="cpu")


def solid_array(color):
    return np.broadcast_to(np.array(color, dtype=np.uint8), (32, 32, 3)).copy()


def random_images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_metadata_is_parsed(predictor):
    assert predictor.class_names == CIFAR10_CLASSES
    assert predictor.metadata[META_CLASS_NAMES] == list(CIFAR10_CLASSES)
    assert predictor.metadata[META_OPSET] == 18
    assert predictor.metadata[META_TEST_ACCURACY] == pytest.approx(0.1)
    assert predictor.metadata["architecture"] == "color-probe"
    assert predictor.providers == ["CPUExecutionProvider"]
    assert predictor.expected_input == "uint8 [N,32,32,3]"


@pytest.mark.parametrize("color", list(SOLID_COLORS), ids=list(SOLID_COLORS.values()))
def test_solid_colors_get_known_labels(predictor, color):
    (prediction,) = predictor.predict(solid_array(color))
    assert prediction.label == SOLID_COLORS[color]
    assert prediction.index == CIFAR10_CLASSES.index(SOLID_COLORS[color])


def test_probabilities_match_numpy_reference(predictor):
    images = random_images(20)
    predictions = predictor.predict(images, top_k=10)
    expected = color_probe_probabilities(images)
    for prediction, row in zip(predictions, expected):
        probabilities = dict(prediction.top_k)
        assert [probabilities[name] for name in CIFAR10_CLASSES] == pytest.approx(row.tolist(), abs=1e-6)


def test_top_k_is_sorted_and_starts_with_label(predictor):
    (prediction,) = predictor.predict(solid_array((200, 30, 30)), top_k=3)
    assert len(prediction.top_k) == 3
    assert prediction.top_k[0] == (prediction.label, prediction.probability)
    values = [p for _, p in prediction.top_k]
    assert values == sorted(values, reverse=True)
    assert prediction.as_dict()["top_k"][0] == {"label": prediction.label, "probability": prediction.probability}


def test_mixed_inputs_keep_order(predictor, tmp_path):
    Image.new("RGB", (50, 40), (0, 0, 255)).save(tmp_path / "blue.png")
    inputs = [
        str(tmp_path / "blue.png"),
        Image.new("RGB", (32, 32), (255, 255, 255)),
        solid_array((255, 0, 0)),
        np.stack([solid_array((0, 0, 0)), solid_array((0, 255, 0))]),
        tmp_path / "blue.png",
    ]
    labels = [p.label for p in predictor.predict(inputs)]
    assert labels == ["bird", "cat", "airplane", "deer", "automobile", "bird"]


def test_batching_does_not_change_results(predictor):
    images = random_images(600, seed=1)
    in_small_batches = predictor.predict(images, top_k=2, batch_size=7)
    in_one_batch = predictor.predict(list(images), top_k=2, batch_size=1000)
    assert len(in_small_batches) == 600
    assert [p.index for p in in_small_batches] == [p.index for p in in_one_batch]
    expected = color_probe_probabilities(images).argmax(axis=1)
    assert [p.index for p in in_small_batches] == expected.tolist()


def test_empty_batch_gives_no_predictions(predictor):
    assert predictor.predict(np.zeros((0, 32, 32, 3), dtype=np.uint8)) == []
    assert predictor.predict([]) == []


@pytest.mark.parametrize(
    ("array", "described"),
    [
        (np.zeros((32, 32)), "float64 [32,32]"),
        (np.zeros((32, 32, 3), dtype=np.float32), "float32 [32,32,3]"),
        (np.zeros((32, 32, 4), dtype=np.uint8), "uint8 [32,32,4]"),
        (np.zeros((2, 64, 64, 3), dtype=np.uint8), "uint8 [2,64,64,3]"),
        (np.zeros((1, 2, 32, 32, 3), dtype=np.uint8), "uint8 [1,2,32,32,3]"),
    ],
    ids=["float64-2d", "float32", "four-channels", "64x64", "rank-5"],
)
def test_wrong_array_is_rejected_before_running(predictor, array, described):
    with pytest.raises(ModelContractError) as caught:
        predictor.predict(array)
    assert str(caught.value).startswith(f"expected uint8 [N,32,32,3], got {described}; ")


def test_unsupported_item_type_is_rejected(predictor):
    with pytest.raises(TypeError, match="got int"):
        predictor.predict([solid_array((0, 0, 0)), 7])


def test_unreadable_path_raises_image_error(predictor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ImageError, match="broken.png"):
        predictor.predict([tmp_path / "broken.png"])


@pytest.mark.parametrize("top_k", [0, 11, 2.0])
def test_invalid_top_k_is_rejected(predictor, top_k):
    with pytest.raises(ValueError, match="top_k must be between 1 and 10"):
        predictor.predict(solid_array((0, 0, 0)), top_k=top_k)


def test_missing_metadata_is_named(tmp_path):
    metadata = color_probe_metadata()
    del metadata[META_CLASS_NAMES], metadata[META_OPSET]
    path = build_color_probe(tmp_path / "bare.onnx", metadata=metadata)
    with pytest.raises(ModelContractError) as caught:
        Predictor(path, providers="cpu")
    assert "missing metadata keys: class_names, opset" in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("Image.BitmapPixelFormat", "Bgr8", "expected Image.BitmapPixelFormat=Rgb8, got 'Bgr8'"),
        (META_CLASS_NAMES, "cat,dog", "invalid class_names 'cat,dog'"),
        (META_CLASS_NAMES, '["cat", "cat"]', "expected unique class names"),
        (META_OPSET, "eighteen", "invalid opset 'eighteen'"),
        (META_TEST_ACCURACY, "1.5", "expected a number between 0 and 1, or null"),
    ],
    ids=["pixel-format", "class-names-not-json", "class-names-repeated", "opset", "accuracy"],
)
def test_malformed_metadata_is_rejected(tmp_path, key, value, expected):
    metadata = color_probe_metadata()
    metadata[key] = value
    path = build_color_probe(tmp_path / "odd.onnx", metadata=metadata)
    with pytest.raises(ModelContractError, match="does not follow the ONNX contract") as caught:
        Predictor(path, providers="cpu")
    assert expected in str(caught.value)


def test_null_test_accuracy_is_none(tmp_path):
    metadata = color_probe_metadata()
    metadata[META_TEST_ACCURACY] = "null"
    path = build_color_probe(tmp_path / "unevaluated.onnx", metadata=metadata)
    assert Predictor(path, providers="cpu").metadata[META_TEST_ACCURACY] is None


def test_class_count_must_match_outputs(tmp_path):
    metadata = color_probe_metadata(class_names=CIFAR10_CLASSES[:9])
    path = build_color_probe(tmp_path / "nine.onnx", metadata=metadata)
    with pytest.raises(ModelContractError, match=r"expected output logits: float \[batch,9\]"):
        Predictor(path, providers="cpu")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"input_name": "input"}, "expected one input images: uint8 [batch,32,32,3], got inputs ['input']"),
        ({"output_names": ("scores", "probabilities")}, "expected outputs logits, probabilities, got scores, probabilities"),
        ({"input_dtype": "float32"}, "expected input images: uint8 [batch,32,32,3], got tensor(float) ['batch', 32, 32, 3]"),
        ({"batch_dim": 1}, "got tensor(uint8) [1, 32, 32, 3]"),
    ],
    ids=["input-name", "output-names", "float-input", "fixed-batch"],
)
def test_other_signature_is_rejected(tmp_path, options, expected):
    path = build_color_probe(tmp_path / "other.onnx", **options)
    with pytest.raises(ModelContractError) as caught:
        Predictor(path, providers="cpu")
    assert expected in str(caught.value)


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(ModelContractError, match="model file not found"):
        Predictor(tmp_path / "none.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(ModelContractError, match=r"cannot load model .*text.onnx: .*INVALID_PROTOBUF"):
        Predictor(tmp_path / "text.onnx", providers="cpu")


def test_invalid_provider_and_threads_are_rejected(probe_path):
    with pytest.raises(ValueError, match="providers must be one of auto, cpu, cuda"):
        Predictor(probe_path, providers="gpu")
    with pytest.raises(ValueError, match="threads must be a positive int"):
        Predictor(probe_path, threads=0)


def test_threads_option_gives_same_results(probe_path, predictor):
    images = random_images(10, seed=5)
    single = Predictor(probe_path, providers="cpu", threads=1)
    assert single.predict(images) == predictor.predict(images)


def test_auto_provider_is_quiet_and_falls_back(probe_path):
    # onnxruntime-gpu without a usable GPU prints two error lines per CUDA attempt.
    code = f"from serving import Predictor; print(Predictor({str(probe_path)!r}).providers)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "CPUExecutionProvider" in result.stdout


def test_cuda_without_gpu_raises_provider_error(probe_path):
    if "CUDAExecutionProvider" in Predictor(probe_path).providers:
        pytest.skip("CUDA works on this machine")
    with pytest.raises(ProviderError, match="CUDA was requested but"):
        Predictor(probe_path, providers="cuda")


def test_import_serving_loads_no_runtime_or_framework():
    code = (
        "import sys, serving, serving.cli; "
        "print(','.join(m for m in ('onnxruntime', 'onnx', 'torch', 'tensorflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_prediction_is_a_plain_value():
    prediction = Prediction("cat", 3, 0.5, (("cat", 0.5),))
    assert prediction == Prediction("cat", 3, 0.5, (("cat", 0.5),))
    assert prediction.as_dict() == {"label": "cat", "index": 3, "probability": 0.5,
                                    "top_k": [{"label": "cat", "probability": 0.5}]}


def test_predict_accepts_file_object_and_rejects_others(tmp_path):
    import io

    model_path = tmp_path / "probe.onnx"
    build_color_probe(model_path)
    predictor = Predictor(str(model_path), providers="cpu")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buffer, format="PNG")
    buffer.seek(0)

    from_file = predictor.predict(buffer)
    from_array = predictor.predict(np.full((32, 32, 3), (255, 0, 0), dtype=np.uint8))

    assert from_file[0].label == from_array[0].label
    for bad in (None, b"/some/path", 3):
        with pytest.raises(TypeError, match="expected a path, a file object"):
            predictor.predict(bad)
