"""Move trained weights between the PyTorch and Keras builds of one specification.

Weights travel through a framework-neutral dict (saved as .npz) keyed by the
specification's layer names, so each framework's side runs in its own process:
in one process that imported tensorflow first, torch's dynamo exporter crashes.
Every layout difference between the frameworks is handled here and nowhere else:

    parameter              neutral (= PyTorch)        Keras
    conv kernel            [out, in, kh, kw] (OIHW)   [kh, kw, in, out] (HWIO)
    dense kernel           [out, in]                  [in, out]
    BatchNorm scale/shift  weight / bias              gamma / beta
    BatchNorm statistics   running_mean / running_var moving_mean / moving_variance

BatchNorm epsilon is not a weight: both builds take it from the specification,
and `check_epsilon` confirms a built model uses it.
"""

import numpy as np

from pipeline.architectures import BATCHNORM, CONV, DENSE

# Neutral keys are "<layer name>/<parameter>" with these parameters per kind.
NEUTRAL_PARAMETERS = {
    CONV: ("kernel", "bias"),
    DENSE: ("kernel", "bias"),
    BATCHNORM: ("scale", "shift", "mean", "variance"),
}
_TORCH_NAMES = {
    "kernel": "weight", "bias": "bias", "scale": "weight", "shift": "bias",
    "mean": "running_mean", "variance": "running_var",
}


def neutral_keys(spec):
    """Return every neutral key of `spec`, in layer order."""
    return [f"{layer.name}/{parameter}" for layer in spec.parametrised_layers()
            for parameter in NEUTRAL_PARAMETERS[layer.kind]]


def _require_keys(spec, weights, where):
    expected, given = set(neutral_keys(spec)), set(weights)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise ValueError(f"{where}: weights do not match architecture {spec.name}: "
                         f"missing {missing}, unexpected {unexpected}")


def from_torch(spec, state_dict):
    """Return neutral weights from a PyTorch state dict of numpy arrays."""
    weights = {}
    for layer in spec.parametrised_layers():
        for parameter in NEUTRAL_PARAMETERS[layer.kind]:
            key = f"{layer.name}.{_TORCH_NAMES[parameter]}"
            if key not in state_dict:
                raise ValueError(f"PyTorch state dict has no {key!r} for architecture {spec.name}")
            weights[f"{layer.name}/{parameter}"] = np.asarray(state_dict[key], dtype=np.float32)
    return weights


def to_torch(spec, weights):
    """Return a PyTorch state dict (numpy arrays) from neutral weights."""
    _require_keys(spec, weights, "to_torch")
    state = {}
    for layer in spec.parametrised_layers():
        for parameter in NEUTRAL_PARAMETERS[layer.kind]:
            state[f"{layer.name}.{_TORCH_NAMES[parameter]}"] = weights[f"{layer.name}/{parameter}"]
        if layer.kind == BATCHNORM:
            # Only used to pick a momentum when momentum=None; zero is the fresh-module value.
            state[f"{layer.name}.num_batches_tracked"] = np.zeros((), dtype=np.int64)
    return state


def conv_kernel_to_keras(kernel):
    """OIHW -> HWIO."""
    return np.transpose(kernel, (2, 3, 1, 0))


def conv_kernel_from_keras(kernel):
    """HWIO -> OIHW."""
    return np.transpose(kernel, (3, 2, 0, 1))


def dense_kernel_to_keras(kernel):
    """[out, in] -> [in, out]."""
    return np.transpose(kernel)


def dense_kernel_from_keras(kernel):
    """[in, out] -> [out, in]."""
    return np.transpose(kernel)


def from_keras(spec, layer_weights):
    """Return neutral weights from {layer name: layer.get_weights()} of a Keras build."""
    weights = {}
    for layer in spec.parametrised_layers():
        if layer.name not in layer_weights:
            raise ValueError(f"Keras model has no layer {layer.name!r} for architecture {spec.name}")
        values = [np.asarray(v, dtype=np.float32) for v in layer_weights[layer.name]]
        if layer.kind == CONV:
            weights[f"{layer.name}/kernel"] = conv_kernel_from_keras(values[0])
            weights[f"{layer.name}/bias"] = values[1]
        elif layer.kind == DENSE:
            weights[f"{layer.name}/kernel"] = dense_kernel_from_keras(values[0])
            weights[f"{layer.name}/bias"] = values[1]
        else:
            for parameter, value in zip(NEUTRAL_PARAMETERS[BATCHNORM], values):
                weights[f"{layer.name}/{parameter}"] = value
    return weights


def to_keras(spec, weights):
    """Return {layer name: list for layer.set_weights()} from neutral weights."""
    _require_keys(spec, weights, "to_keras")
    layer_weights = {}
    for layer in spec.parametrised_layers():
        if layer.kind == CONV:
            values = [conv_kernel_to_keras(weights[f"{layer.name}/kernel"]), weights[f"{layer.name}/bias"]]
        elif layer.kind == DENSE:
            values = [dense_kernel_to_keras(weights[f"{layer.name}/kernel"]), weights[f"{layer.name}/bias"]]
        else:
            values = [weights[f"{layer.name}/{parameter}"] for parameter in NEUTRAL_PARAMETERS[BATCHNORM]]
        layer_weights[layer.name] = values
    return layer_weights


def check_epsilon(spec, epsilons):
    """Raise ValueError unless every BatchNorm epsilon in {layer name: epsilon} is the spec's."""
    for layer in spec.parametrised_layers():
        if layer.kind == BATCHNORM and not np.isclose(epsilons[layer.name], spec.bn_epsilon, rtol=0, atol=1e-12):
            raise ValueError(f"BatchNorm {layer.name} uses epsilon {epsilons[layer.name]}, "
                             f"expected {spec.bn_epsilon} from architecture {spec.name}")


def save_weights(path, weights):
    """Write neutral weights to the .npz file `path`."""
    np.savez(path, **{key.replace("/", "__"): value for key, value in weights.items()})


def load_weights(path):
    """Read neutral weights written by `save_weights`."""
    with np.load(path, allow_pickle=False) as archive:
        return {key.replace("__", "/"): archive[key] for key in archive.files}
