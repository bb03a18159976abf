"""One framework's heavy work, run as its own process by the verify stage.

PyTorch's dynamo exporter crashes in a process that imported tensorflow first, so
verify (which needs both frameworks) never imports either: it runs this module as
`python -m pipeline.worker TASK ...` once per framework step and exchanges numpy
files with it.

Tasks:
  infer         checkpoint + images .npy -> logits and probabilities .npz
  dump-weights  checkpoint -> neutral weights .npz + info .json
  load-weights  neutral weights .npz + info .json -> checkpoint of this framework
"""

import argparse
import json
import logging
import sys

import numpy as np

from pipeline import transfer
from pipeline.architectures import get_architecture
from serving.errors import CifarOnnxError

logger = logging.getLogger(__name__)
INFER_BATCH_SIZE = 500  # images per framework call; bounds memory, not accuracy


def _framework_module(framework):
    if framework == "torch":
        from pipeline import torch_model
        return torch_model
    from pipeline import keras_model
    from pipeline.frameworks import import_tensorflow
    import_tensorflow()
    return keras_model


def infer(framework, checkpoint, images_paths, output_paths):
    """Run the framework model in inference mode on each images .npy file.

    Writes (logits, probabilities) for images_paths[i] to output_paths[i]; each
    file's images go through the model in batches of at most INFER_BATCH_SIZE, and
    a file of 7 images is one batch of 7.
    """
    module = _framework_module(framework)
    if framework == "torch":
        import torch

        net, _ = module.load_checkpoint(checkpoint)
        model = module.InferenceModel(net).eval()

        def run(batch):
            with torch.inference_mode():
                return [t.numpy() for t in model(torch.from_numpy(batch))]
    else:
        model, _ = module.load_checkpoint(checkpoint)

        def run(batch):
            return [np.asarray(t) for t in module.inference(model, batch)]

    for images_path, output_path in zip(images_paths, output_paths, strict=True):
        images = np.load(images_path, allow_pickle=False)
        outputs = [run(images[start:start + INFER_BATCH_SIZE]) for start in range(0, len(images), INFER_BATCH_SIZE)]
        logits = np.concatenate([o[0] for o in outputs]).astype(np.float32)
        probabilities = np.concatenate([o[1] for o in outputs]).astype(np.float32)
        np.savez(output_path, logits=logits, probabilities=probabilities)


def dump_weights(framework, checkpoint, weights_path, info_path):
    """Write the checkpoint's weights in the neutral layout, and its info as JSON."""
    module = _framework_module(framework)
    model, info = module.load_checkpoint(checkpoint)
    spec = get_architecture(info["architecture"])
    if framework == "torch":
        state = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
        weights = transfer.from_torch(spec, state)
    else:
        weights = transfer.from_keras(spec, {layer.name: layer.get_weights() for layer in model.layers})
    transfer.save_weights(weights_path, weights)
    with open(info_path, "w", encoding="utf-8") as stream:
        json.dump(info, stream)


def load_weights(framework, weights_path, info_path, checkpoint):
    """Build this framework's model from neutral weights and save it as `checkpoint`."""
    module = _framework_module(framework)
    with open(info_path, encoding="utf-8") as stream:
        info = json.load(stream)
    spec = get_architecture(info["architecture"])
    weights = transfer.load_weights(weights_path)
    model = module.build_model(spec.name)
    if framework == "torch":
        import torch

        state = {key: torch.from_numpy(np.array(value)) for key, value in transfer.to_torch(spec, weights).items()}
        model.load_state_dict(state, strict=True)
        epsilons = {name: m.eps for name, m in model.named_modules() if hasattr(m, "running_var")}
    else:
        for name, values in transfer.to_keras(spec, weights).items():
            model.get_layer(name).set_weights(values)
        epsilons = {layer.name: layer.epsilon for layer in model.layers if hasattr(layer, "epsilon")}
    transfer.check_epsilon(spec, epsilons)
    module.save_checkpoint(checkpoint, model, info)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["infer", "dump-weights", "load-weights"])
    parser.add_argument("--framework", choices=["torch", "keras"], required=True)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to read (or, for load-weights, to write)")
    parser.add_argument("--images", action="append", default=[], help="infer: images .npy (repeatable)")
    parser.add_argument("--output", action="append", default=[], help="infer: outputs .npz, one per --images")
    parser.add_argument("--weights", help="neutral weights .npz")
    parser.add_argument("--info", help="checkpoint info .json")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        if arguments.task == "infer":
            infer(arguments.framework, arguments.checkpoint, arguments.images, arguments.output)
        elif arguments.task == "dump-weights":
            dump_weights(arguments.framework, arguments.checkpoint, arguments.weights, arguments.info)
        else:
            load_weights(arguments.framework, arguments.weights, arguments.info, arguments.checkpoint)
    except (CifarOnnxError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
