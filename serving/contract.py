"""The ONNX contract that training, export, verification and serving share.

Every fact both sides must agree on is defined here once: tensor names, the input
shape and layout, the class list, the normalisation constants and the metadata keys.
"""

INPUT_NAME = "images"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
OUTPUT_NAMES = (LOGITS_NAME, PROBABILITIES_NAME)

IMAGE_SIZE = 32  # pixels, height and width
CHANNELS = 3  # RGB
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)  # one image, HWC; the batch is NHWC
BATCH_DIM = "batch"  # name of the symbolic batch dimension in every export

# The canonical CIFAR-10 labels, in label-index order of the binary archive.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Per-channel statistics of the CIFAR-10 training set on 0-1 pixels (RGB), as used
# by the widely copied PyTorch CIFAR-10 examples. Applied inside every graph.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

# metadata_props keys written by every exporter and read by the predictor.
META_CLASS_NAMES = "class_names"
META_ARCHITECTURE = "architecture"
META_FRAMEWORK = "framework"
META_FRAMEWORK_VERSION = "framework_version"
META_EXPORTER = "exporter"
META_EXPORTER_VERSION = "exporter_version"
META_OPSET = "opset"
META_DATASET_FINGERPRINT = "dataset_fingerprint"
META_TEST_ACCURACY = "test_accuracy"
META_TEST_ACCURACY_SCOPE = "test_accuracy_scope"  # optional: which test images test_accuracy covers
META_CHECKPOINT_SHA256 = "checkpoint_sha256"
META_CREATED = "created"
REQUIRED_METADATA = (
    META_CLASS_NAMES, META_ARCHITECTURE, META_FRAMEWORK, META_FRAMEWORK_VERSION,
    META_EXPORTER, META_EXPORTER_VERSION, META_OPSET, META_DATASET_FINGERPRINT,
    META_TEST_ACCURACY, META_CHECKPOINT_SHA256, META_CREATED,
)
# The ONNX standard image metadata (onnx/docs/MetadataProps.md).
IMAGE_METADATA = {
    "Image.BitmapPixelFormat": "Rgb8",
    "Image.NominalPixelRange": "NominalRange_0_255",
}
