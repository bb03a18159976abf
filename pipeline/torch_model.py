"""The PyTorch build of an architecture specification, its preprocessing and checkpoints.

Mirrors pipeline/keras_model.py function by function; the differences are the
framework's: NCHW layout, BatchNorm momentum convention, state_dict checkpoints.
Only the training-side commands import this module (it imports torch).
"""

import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared or oversubscribed CPU, spinning
# threads take the cores from the ones with work: measured on 2 shared cores with a load of
# about 4, PASSIVE made cnn-3block training steps 2-4x faster. It must be set before torch
# loads libgomp; a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import architectures as arch  # noqa: E402
from pipeline.errors import TrainError  # noqa: E402
from serving.contract import MEAN, STD  # noqa: E402

CHECKPOINT_NAME = "model.pt"


def build_model(architecture):
    """Build `architecture` (a name from ARCHITECTURES) as a freshly initialised nn.Module.

    Input: float32 [N, 3, 32, 32] (NCHW), normalised with MEAN/STD. Output: logits
    float32 [N, 10]. Every layer is registered under its spec name, so the state_dict
    keys are "conv1.weight", "bn1.running_mean", "dense2.bias" and so on.
    """
    spec = arch.get_architecture(architecture)
    layers = {}
    channels = spec.input_shape[-1]
    for layer in spec.layers:
        layers[layer.name], channels = _build_layer(layer, channels, spec)

    net = Network(layers, spec.name)
    with torch.no_grad():
        _initialise(net, spec)
    return net


def _build_layer(layer, channels, spec):
    """Return (module, output channels or features) for one LayerSpec."""
    if layer.kind == arch.CONV:
        # PADDING "same" for a 3x3 stride-1 kernel is one zero pixel on each side.
        padding = layer.kernel_size // 2
        return nn.Conv2d(channels, layer.filters, layer.kernel_size, padding=padding), layer.filters
    if layer.kind == arch.BATCHNORM:
        return nn.BatchNorm2d(channels, eps=spec.bn_epsilon, momentum=spec.bn_momentum), channels
    if layer.kind == arch.RELU:
        return nn.ReLU(), channels
    if layer.kind == arch.MAXPOOL:
        return nn.MaxPool2d(layer.pool_size, stride=layer.pool_size), channels
    if layer.kind == arch.DROPOUT:
        return nn.Dropout(layer.rate), channels
    if layer.kind == arch.SPATIAL_DROPOUT:
        return nn.Dropout2d(layer.rate), channels
    if layer.kind == arch.GLOBAL_AVG_POOL:
        return GlobalAvgPool(), channels
    if layer.kind == arch.DENSE:
        return nn.Linear(channels, layer.units), layer.units
    raise TrainError(f"layer {layer.name!r} has unknown kind {layer.kind!r}: expected one of {arch.LAYER_KINDS}")


class Network(nn.Sequential):
    """The spec's layers in order; `architecture` names the spec it was built from."""

    def __init__(self, layers, architecture):
        super().__init__(OrderedDict(layers))
        self.architecture = architecture


class GlobalAvgPool(nn.Module):
    """Mean over height and width: [N, C, H, W] -> [N, C]."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _initialise(net, spec):
    """Draw the initial weights from the distributions pinned in pipeline/architectures.py."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # Uniform, bound 1 / sqrt(fan_in) (KERNEL_INIT): a = sqrt(5) makes kaiming's gain sqrt(1/3).
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # scale 1, shift 0, running mean 0, running variance 1


def preprocess(images):
    """Turn uint8 [N, 32, 32, 3] RGB images (NHWC) into the network input.

    Returns float32 [N, 3, 32, 32] (NCHW) on the images' device, scaled to 0-1 and
    normalised per channel with serving.contract.MEAN and STD.
    """
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device)
    std = torch.tensor(STD, dtype=torch.float32, device=images.device)
    x = (images.to(torch.float32) / 255.0 - mean) / std
    return x.permute(0, 3, 1, 2)  # NHWC -> NCHW


class InferenceModel(nn.Module):
    """uint8 [N, 32, 32, 3] images -> (logits, probabilities), both float32 [N, 10].

    Preprocessing, the network in eval mode (no dropout, BatchNorm running statistics)
    and softmax: the module the ONNX exporter exports, so the graph contains the whole contract.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net.eval()

    def forward(self, images):
        logits = self.net(preprocess(images))
        return logits, torch.softmax(logits, dim=1)


def save_checkpoint(path, net, info):
    """Write `net`'s state_dict, its architecture and `info` (plain types only) to `path` atomically.

    The file loads with torch.load(path, weights_only=True).
    """
    checkpoint = {"state_dict": net.state_dict(), "architecture": net.architecture, **info}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, architecture=None):
    """Read a checkpoint written by save_checkpoint; return (net in eval mode, info dict).

    `info` contains every key except "state_dict". When `architecture` is given, a
    checkpoint of another architecture is rejected. Raises TrainError naming the path
    and the fix for a missing, unreadable or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} not found: train first with `cifar-onnx train --framework torch`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # torch's weights_only message runs over several lines; its first states the cause.
        reason = str(error).strip().splitlines()[0]
        raise TrainError(f"cannot read checkpoint {path}: {reason}; train again to rewrite it") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "architecture" not in checkpoint:
        raise TrainError(
            f"{path} is not a cifar-onnx PyTorch checkpoint (expected a dict with 'state_dict' and "
            "'architecture'): train again to rewrite it"
        )
    saved = checkpoint["architecture"]
    if architecture is not None and saved != architecture:
        raise TrainError(
            f"checkpoint {path} contains architecture {saved!r}, expected {architecture!r}: "
            f"pass --arch {saved} or train {architecture} from scratch"
        )
    if saved not in arch.ARCHITECTURES:
        raise TrainError(f"checkpoint {path} contains unknown architecture {saved!r}: expected one of {', '.join(arch.ARCHITECTURES)}")

    net = build_model(saved)
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise TrainError(f"checkpoint {path} does not match architecture {saved!r}: {error}") from error
    info = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    return net.eval(), info


def count_parameters(net):
    """Return the number of trainable parameters of `net`."""
    return sum(parameter.numel() for parameter in net.parameters() if parameter.requires_grad)
