"""The framework side of `cifar-onnx bench`, one framework per process.

PyTorch's dynamo and triton crash in a process that imported tensorflow first, so the
benchmark orchestrator (pipeline/bench.py) imports neither framework: it runs this
module as `python -m pipeline.bench_worker TASK ...` and reads the JSON it writes.

Tasks:
  infer             checkpoint + images .npy -> framework inference images/s per batch size
  train             one framework's training images/s: our stage, the tutorial style or the model step
  first-prediction  load a checkpoint, classify one image file, print one line (cold start)
  folder-baseline   torchvision ImageFolder + DataLoader + the eager model over a folder, to CSV
"""

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.training import write_json
from serving.contract import MEAN, STD
from serving.errors import CifarOnnxError

logger = logging.getLogger(__name__)

# ours: the project's training stage. tutorial: the tutorial's way of training. model-step:
# forward, backward and Adam alone on batches prepared in memory, without augmentation or
# a loader, which is the work every training loop repeats.
TRAIN_STYLES = ("ours", "tutorial", "model-step")
# Each framework's tutorial augments differently; our stage runs the same transforms,
# so a comparison measures the training code, not the amount of augmentation.
TUTORIAL_AUGMENT = {"torch": "crop-flip-jitter", "keras": "flip-affine"}
TUTORIAL_LOADER_WORKERS = 4  # num_workers of the DataLoader in common CIFAR-10 tutorials
LEARNING_RATE = 1e-3


def summarize(samples):
    """Return {"median", "min", "max", "samples"} of a list of numbers."""
    values = [float(value) for value in samples]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "samples": values}


def time_repeats(action, warmup, repeats):
    """Run `action` `warmup` times untimed, then `repeats` times; return the wall seconds of each timed run."""
    for _ in range(warmup):
        action()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def cyclic_batches(images, batch_size, count):
    """Return `count` images of `images` as batches of `batch_size`, wrapping around the array."""
    batches = []
    for start in range(0, count, batch_size):
        indices = np.arange(start, min(start + batch_size, count)) % len(images)
        batches.append(np.ascontiguousarray(images[indices]))
    return batches


def _environment(framework):
    """Return the versions and thread counts of `framework` in this process."""
    environment = {"numpy": np.__version__, "cpu_count": os.cpu_count()}
    if framework == "torch":
        import torch
        import torchvision

        environment.update({
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cuda_available": torch.cuda.is_available(),
        })
    else:
        from pipeline.keras_model import keras, tf

        environment.update({
            "tensorflow": tf.__version__, "keras": keras.__version__,
            # 0 means TensorFlow picks: one thread per core.
            "tensorflow_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tensorflow_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "cuda_available": bool(tf.config.list_physical_devices("GPU")),
        })
    return environment


# ---------------------------------------------------------------- inference


def infer(framework, checkpoint, images_path, batch_sizes, counts, warmup, repeats):
    """Measure the framework's own inference on uint8 NHWC images; return a dict of images/s per batch size."""
    images = np.load(images_path, allow_pickle=False)
    if framework == "torch":
        import torch

        from pipeline.torch_model import InferenceModel, load_checkpoint

        net, _ = load_checkpoint(checkpoint)
        model = InferenceModel(net).eval()

        def run(batch):
            with torch.inference_mode():
                logits, probabilities = model(torch.from_numpy(batch))
            return logits.numpy(), probabilities.numpy()
    else:
        from pipeline.keras_model import inference, load_checkpoint

        model, _ = load_checkpoint(checkpoint)

        def run(batch):
            logits, probabilities = inference(model, batch)
            return logits.numpy(), probabilities.numpy()

    results = {}
    for batch_size, count in zip(batch_sizes, counts, strict=True):
        batches = cyclic_batches(images, batch_size, count)

        def run_all(batches=batches):
            for batch in batches:
                run(batch)

        seconds = time_repeats(run_all, warmup, repeats)
        results[str(batch_size)] = {"images": count, **summarize([count / s for s in seconds])}
    return {"environment": _environment(framework), "images_per_second": results}


# ---------------------------------------------------------------- training


def train(framework, style, data, dataset_out, work, architecture, limit, epochs, device, mixed_precision):
    """Train for `epochs` epochs on the --limit split and return images/s per epoch plus the image count.

    Both styles train on the training part of `split_indices(..., limit=limit)`, so they
    see the same images. The first epoch includes start-up work, so the caller reports it apart.
    """
    from pipeline.data import load_dataset
    from pipeline.recipe import Recipe, split_indices

    dataset = load_dataset(data, dataset_out, progress=False)
    recipe = Recipe(epochs=epochs, limit=limit, augment=TUTORIAL_AUGMENT[framework], patience=epochs + 1)
    train_indices, _ = split_indices(len(dataset.train_labels), dataset.train_labels, recipe.validation_size,
                                     recipe.seed, recipe.limit)
    if style == "ours":
        rates = _train_ours(framework, dataset, architecture, recipe, work, device, mixed_precision)
    elif style == "model-step":
        step_alone = _model_step_torch if framework == "torch" else _model_step_keras
        rates = step_alone(dataset, train_indices, architecture, recipe)
    elif framework == "torch":
        rates = _train_tutorial_torch(dataset, train_indices, architecture, recipe)
    else:
        rates = _train_tutorial_keras(dataset, train_indices, architecture, recipe)
    return {"environment": _environment(framework), "images": int(len(train_indices)),
            "epoch_images_per_second": rates, "augment": recipe.augment, "batch_size": recipe.batch_size,
            "device": device, "mixed_precision": mixed_precision}


def _train_ours(framework, dataset, architecture, recipe, work, device, mixed_precision):
    """Run the project's training stage into `work`; return the images/s of each epoch from its history."""
    if framework == "torch":
        from pipeline.torch_train import train_model
    else:
        from pipeline.keras_train import train_model
    train_model(dataset, architecture, recipe, work, device=device, mixed_precision=mixed_precision)
    with open(Path(work) / framework / "history.csv", encoding="utf-8") as stream:
        return [float(row["images_per_second"]) for row in csv.DictReader(stream)]


def _train_tutorial_torch(dataset, indices, architecture, recipe):
    """Train the way a PyTorch tutorial does: per-image torchvision transforms, a DataLoader, a plain loop."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.torch_model import build_model

    class ArrayImages(Dataset):
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, index):
            return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])

    augment = transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomCrop(32, padding=recipe.crop_padding),
        transforms.ColorJitter(brightness=recipe.brightness, contrast=recipe.contrast),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    images = ArrayImages(dataset.train_images[indices], dataset.train_labels[indices], augment)
    workers = min(TUTORIAL_LOADER_WORKERS, os.cpu_count() or 1)
    loader = DataLoader(images, batch_size=recipe.batch_size, shuffle=True, num_workers=workers)

    torch.manual_seed(recipe.seed)
    net = build_model(architecture)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.CrossEntropyLoss()
    rates = []
    for _ in range(recipe.epochs):
        started = time.perf_counter()
        net.train()
        loss_sum, correct = 0.0, 0
        for inputs, labels in loader:
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            correct += (outputs.argmax(1) == labels).sum().item()
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


def _train_tutorial_keras(dataset, indices, architecture, recipe):
    """Train the way a Keras tutorial does: float arrays, augmentation layers in the model, `fit`."""
    from pipeline.keras_model import build_model, keras

    pixels = dataset.train_images[indices].astype("float32") / 255.0
    labels = dataset.train_labels[indices]
    layers = keras.layers
    augmentation = keras.Sequential([
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(recipe.rotation),
        layers.RandomZoom(recipe.zoom),
        layers.RandomTranslation(recipe.translation, recipe.translation),
    ])
    keras.utils.set_random_seed(recipe.seed)
    inputs = keras.Input(shape=pixels.shape[1:])
    normalised = layers.Normalization(mean=MEAN, variance=[s * s for s in STD])(augmentation(inputs))
    model = keras.Model(inputs, build_model(architecture)(normalised))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    rates = []
    model.fit(pixels, labels, batch_size=recipe.batch_size, epochs=recipe.epochs, shuffle=True, verbose=0,
              callbacks=[_epoch_rate_callback(keras, len(labels), rates)])
    return rates


def _model_step_torch(dataset, indices, architecture, recipe):
    """Time forward, backward and Adam alone on normalised batches prepared before the clock starts."""
    # Import pipeline.torch_model first, because it sets our stage's OpenMP wait policy before torch loads.
    from pipeline.torch_model import build_model, preprocess, torch

    import torch.nn.functional as F

    torch.manual_seed(recipe.seed)
    net = build_model(architecture).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    images = torch.from_numpy(dataset.train_images[indices])
    labels = torch.from_numpy(dataset.train_labels[indices]).long()
    batches = [(preprocess(images[start:start + recipe.batch_size]).contiguous(memory_format=torch.channels_last),
                labels[start:start + recipe.batch_size]) for start in range(0, len(labels), recipe.batch_size)]
    rates = []
    for _ in range(recipe.epochs):
        started = time.perf_counter()
        net.train()
        for inputs, targets in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(inputs), targets).backward()
            optimizer.step()
        rates.append(len(labels) / (time.perf_counter() - started))
    return rates


def _model_step_keras(dataset, indices, architecture, recipe):
    """Time `fit` on normalised float batches cached in memory: no augmentation, no per-epoch conversion."""
    from pipeline.keras_model import build_model, keras, preprocess, tf

    keras.utils.set_random_seed(recipe.seed)
    labels = dataset.train_labels[indices].astype("int64")
    inputs = preprocess(dataset.train_images[indices])
    batches = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(recipe.batch_size).cache()
    model = build_model(architecture)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rates = []
    model.fit(batches, epochs=recipe.epochs, shuffle=False, verbose=0,
              callbacks=[_epoch_rate_callback(keras, len(labels), rates)])
    return rates


def _epoch_rate_callback(keras, images, rates):
    """Return a Keras callback that appends each epoch's images/s to `rates`."""

    class EpochRate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rates.append(images / (time.perf_counter() - self.started))

    return EpochRate()


# ---------------------------------------------------------------- cold start and folder baseline


def first_prediction(framework, checkpoint, image):
    """Load the checkpoint, classify one image file and print `path label probability`.

    The minimal script a framework user would write; the benchmark times it from
    process start to this line.
    """
    from serving.images import load_image

    pixels = load_image(image)[np.newaxis]
    if framework == "torch":
        import torch

        from pipeline.torch_model import InferenceModel, load_checkpoint

        net, info = load_checkpoint(checkpoint)
        with torch.inference_mode():
            _, probabilities = InferenceModel(net)(torch.from_numpy(np.array(pixels)))
        probabilities = probabilities.numpy()[0]
    else:
        from pipeline.keras_model import inference, load_checkpoint

        model, info = load_checkpoint(checkpoint)
        probabilities = inference(model, pixels)[1].numpy()[0]
    best = int(np.argmax(probabilities))
    print(f"{image} {info['class_names'][best]} {probabilities[best]:.4f}", flush=True)


def folder_baseline(checkpoint, folder, output, batch_size):
    """Classify every image under `folder` (one subfolder per class) the torchvision way; write a CSV.

    Prints `images seconds` of the loop (after imports and model loading) to stderr.
    """
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline.torch_model import load_checkpoint

    net, info = load_checkpoint(checkpoint)
    class_names = info["class_names"]
    started = time.perf_counter()
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    images = datasets.ImageFolder(folder, transform=to_input)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=os.cpu_count() or 1)
    paths = [path for path, _ in images.samples]
    temporary = Path(output).with_name(f".{Path(output).name}.tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as stream, torch.inference_mode():
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["path", "label", "index", "probability"])
        done = 0
        for inputs, _ in loader:
            probabilities = torch.softmax(net(inputs), dim=1)
            best_probabilities, best = probabilities.max(dim=1)
            for index, probability in zip(best.tolist(), best_probabilities.tolist()):
                writer.writerow([paths[done], class_names[index], index, f"{probability:.6f}"])
                done += 1
    os.replace(temporary, output)
    print(f"{done} {time.perf_counter() - started:.6f}", file=sys.stderr)


# ---------------------------------------------------------------- command line


def _integers(text):
    return [int(part) for part in text.split(",") if part]


def _parser():
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["infer", "train", "first-prediction", "folder-baseline"])
    parser.add_argument("--framework", choices=["torch", "keras"], default="torch")
    parser.add_argument("--checkpoint", help="model.pt or model.keras to load")
    parser.add_argument("--images", help="infer: uint8 [N, 32, 32, 3] .npy")
    parser.add_argument("--batch-sizes", type=_integers, default=[1, 64, 256], help="infer: comma-separated")
    parser.add_argument("--counts", type=_integers, help="infer: images per timed run, one per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="infer: untimed runs before the timed ones")
    parser.add_argument("--repeats", type=int, default=5, help="infer: timed runs")
    parser.add_argument("--style", choices=TRAIN_STYLES, default="ours", help="train: whose training code")
    parser.add_argument("--data", help="train: dataset source, as for cifar-onnx train --data")
    parser.add_argument("--dataset-out", help="train: folder whose data/cache contains the dataset cache")
    parser.add_argument("--work", help="train: scratch folder for our stage's outputs")
    parser.add_argument("--architecture", default="cnn-3block", help="train: architecture name")
    parser.add_argument("--limit", type=int, help="train: --limit of the recipe (a tenth is held out)")
    parser.add_argument("--epochs", type=int, default=2, help="train: epochs, the first one is warm-up")
    parser.add_argument("--device", default="cpu", help="train: cpu or cuda")
    parser.add_argument("--mixed-precision", action="store_true", help="train: mixed precision (GPU only)")
    parser.add_argument("--image", help="first-prediction: image file")
    parser.add_argument("--folder", help="folder-baseline: folder with one subfolder per class")
    parser.add_argument("--batch-size", type=int, default=256, help="folder-baseline: images per batch")
    parser.add_argument("--output", help="infer/train: result .json; folder-baseline: .csv")
    return parser


def main(argv=None):
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if arguments.framework == "keras":
        from pipeline.frameworks import import_tensorflow
        import_tensorflow()

    try:
        if arguments.task == "first-prediction":
            first_prediction(arguments.framework, arguments.checkpoint, arguments.image)
            return 0
        if arguments.task == "folder-baseline":
            folder_baseline(arguments.checkpoint, arguments.folder, arguments.output, arguments.batch_size)
            return 0
        if arguments.task == "infer":
            result = infer(arguments.framework, arguments.checkpoint, arguments.images, arguments.batch_sizes,
                           arguments.counts, arguments.warmup, arguments.repeats)
        else:
            result = train(arguments.framework, arguments.style, arguments.data, arguments.dataset_out,
                           arguments.work, arguments.architecture, arguments.limit, arguments.epochs,
                           arguments.device, arguments.mixed_precision)

        write_json(arguments.output, result)
    except (CifarOnnxError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
