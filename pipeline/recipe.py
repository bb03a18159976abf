"""The one training recipe both frameworks follow: hyperparameters, schedule and data split.

Everything here is plain Python and numpy, so PyTorch and Keras read the same numbers:
the learning rate at every step, the validation indices and the --limit subset.
"""

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from pipeline.errors import TrainError

# Learning-rate schedules; the names are the --schedule choices.
SCHEDULES = ("one-cycle", "cosine")

# Adam's constants, the same in both frameworks. Keras adds epsilon to sqrt(v) before
# bias correction and PyTorch after it, so their effective epsilons differ by a factor
# sqrt(1 - beta2**step) that nears 1 after a few thousand steps. Both use Keras' 1e-7.
# Cycling beta1 between 0.95 and 0.85 against the learning rate, as OneCycleLR does, was
# measured with PyTorch (10 epochs, validation accuracy 78.9% with and without it) and
# left out.
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7

# Augmentation policies: name -> the transforms applied to every training batch, in
# this order. Validation and test batches are never augmented.
#   crop:   pad `crop_padding` pixels on every side (filled by `crop_fill`), take a random 32x32 window
#   flip:   mirror left-right with probability 0.5
#   affine: random rotation, zoom and translation, black outside the image
#   jitter: random brightness and contrast factors
AUGMENTATIONS = {
    "crop-flip": ("crop", "flip"),  # default
    "crop-flip-jitter": ("crop", "flip", "jitter"),  # the tutorial's PyTorch pipeline
    "flip-affine": ("flip", "affine"),  # the tutorial's Keras pipeline
    "none": (),
}
DEFAULT_AUGMENT = "crop-flip"
# The fill of the crop's padding: "reflect" mirrors the image about its edge rows and
# columns (the edge itself not repeated, as numpy's, PyTorch's and TensorFlow's "reflect").
# "black" pads with 0 pixels, which a crop then shows as a black bar no test image has.
CROP_FILLS = ("reflect", "black")


@dataclass
class Recipe:
    """Every hyperparameter of a training run, identical in meaning for both frameworks.

    Weight decay is decoupled from the gradient (Loshchilov and Hutter's AdamW): before
    each Adam step, every conv and dense kernel is multiplied by 1 - lr * weight_decay,
    where lr is that step's learning rate. Biases and BatchNorm parameters are not
    decayed. This is PyTorch's Adam(decoupled_weight_decay=True) and Keras' Adam(weight_decay)
    with those variables excluded. PyTorch's plain Adam(weight_decay) would instead add an
    L2 term to the gradient, which Adam then rescales, so it is not used.
    """

    epochs: int = 50  # maximum passes over the training split; early stopping may end sooner
    batch_size: int = 64  # images per optimizer step
    lr: float = 1e-3  # base Adam learning rate; the schedule peaks at lr * peak_factor
    schedule: str = "one-cycle"  # one of SCHEDULES, stepped once per batch
    peak_factor: float = 6.0  # peak learning rate / lr (one-cycle), with label smoothing below
    warmup_fraction: float = 0.3  # one-cycle: share of all steps spent rising to the peak
    start_divisor: float = 25.0  # one-cycle: starting learning rate = peak / start_divisor
    end_divisor: float = 1e4  # one-cycle: final learning rate = peak / (start_divisor * end_divisor)
    # Training loss only: targets are (1 - s) * one-hot + s / classes. The peak and the
    # smoothing were chosen together from 10-epoch PyTorch runs of cnn-3block on the JPEG
    # copy of CIFAR-10, seed 0, one thread each, before crop_fill and weight_decay below
    # existed (black fill, no decay). Test accuracy (validation accuracy):
    #   no smoothing:   peak 4e-3 79.8%,           peak 6e-3 78.1% (78.1%)
    #   smoothing 0.1:  peak 4e-3 79.4% (79.5%),   peak 6e-3 80.2% (80.1%),  peak 8e-3 79.6% (79.3%)
    #   smoothing 0.2:  peak 6e-3 79.3% (79.4%)
    # Validation accuracy was 79.3-80.1% with smoothing and 78.1-79.2% without it (seven runs).
    # Run-to-run spread is about half a point, as large as most of these differences: the
    # chosen pair on two threads reached 79.5% in PyTorch, where one thread reached 80.2%.
    label_smoothing: float = 0.1
    # Decoupled, kernels only (see the class docstring). Chosen together with crop_fill
    # from 10-epoch PyTorch runs of cnn-3block on the JPEG copy, seed 0, two threads each
    # (the black-fill run without decay alone, the other three side by side).
    # Test accuracy (validation accuracy):
    #   black fill, no decay:     79.5% (78.8%)    black fill, decay 0.02:    79.8% (80.0%)
    #   reflect fill, no decay:   80.8% (80.0%)    reflect fill, decay 0.02:  81.0% (80.8%)
    # With both, one thread each, seeds 0, 1 and 2 reached 81.2%, 80.6% and 80.3% in PyTorch
    # (80.2%, 79.9% and 79.7% before), and seed 1 reached 80.3% in Keras (79.3% before).
    weight_decay: float = 0.02
    validation_size: int = 5000  # images held out of the training split (capped at a tenth of it)
    patience: int = 10  # epochs without a better validation accuracy before stopping
    augment: str = DEFAULT_AUGMENT  # one of AUGMENTATIONS
    crop_padding: int = 4  # crop: pixels added on each side before the random 32x32 crop
    crop_fill: str = "reflect"  # crop: one of CROP_FILLS, how the added pixels are filled
    rotation: float = 0.1  # affine: maximum rotation, fraction of a full turn (0.1 = 36 degrees)
    zoom: float = 0.1  # affine: maximum zoom in or out, fraction of the image size
    translation: float = 0.1  # affine: maximum shift along each axis, fraction of the image size
    brightness: float = 0.2  # jitter: brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # jitter: contrast factor drawn from [1 - c, 1 + c]
    eval_batch_size: int = 500  # images per forward pass when evaluating; no effect on results
    seed: int = 0  # seeds the split, the --limit subset, initialisation, shuffling and augmentation
    limit: int | None = None  # smoke runs: use a class-balanced subset of this many training images

    def to_dict(self):
        """Return the recipe as a plain dict (for metrics.json and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build a Recipe from `to_dict` output, ignoring keys this version does not know."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def describe(self):
        """Return the recipe as one line of key=value pairs for the run header."""
        return " ".join(f"{key}={value}" for key, value in self.to_dict().items())


def learning_rate_at(step, total_steps, recipe):
    """Return the learning rate for optimizer step `step` (0-based) of `total_steps`.

    one-cycle (Smith and Topin, 2017, as in torch.optim.lr_scheduler.OneCycleLR with
    cosine phases): rise from peak / start_divisor to the peak over warmup_fraction of
    the steps, then fall to peak / (start_divisor * end_divisor). cosine: start at lr
    and decay to zero. Measured with a PyTorch cnn-3block, crop+flip, 45,000/5,000
    split and 10 epochs, without label smoothing: cosine from 1e-3 reached 77.1% test
    accuracy, one-cycle peaking at 2e-3 79.3%, and peaking at 4e-3 80.2%.
    """
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    peak = recipe.lr * recipe.peak_factor
    start = peak / recipe.start_divisor
    end = start / recipe.end_divisor
    if progress < recipe.warmup_fraction:
        phase = progress / recipe.warmup_fraction
        return _cosine_between(start, peak, phase)
    phase = (progress - recipe.warmup_fraction) / (1.0 - recipe.warmup_fraction)
    return _cosine_between(peak, end, phase)


def learning_rate_table(total_steps, recipe):
    """Return the learning rate of every optimizer step as a float32 array of `total_steps` entries."""
    steps = range(max(total_steps, 1))
    return np.array([learning_rate_at(step, total_steps, recipe) for step in steps], dtype=np.float32)


def _cosine_between(first, last, phase):
    return last + (first - last) * 0.5 * (1.0 + math.cos(math.pi * phase))


def steps_per_epoch(n_train, batch_size):
    """Return the optimizer steps in one epoch; the last batch may be smaller."""
    return math.ceil(n_train / batch_size)


def split_indices(n_train, labels, validation_size, seed, limit=None):
    """Return (train_indices, validation_indices) into a training split of `n_train` images.

    Both frameworks call this one function, so their validation sets are identical.
    `labels` (int, length n_train) makes every piece class-balanced. With `limit`, a
    seeded class-balanced subset of `limit` images is drawn first and both parts come
    from it. The validation part has `validation_size` images, capped at a tenth of the
    images available (5,000 of CIFAR-10's 50,000 either way). Both arrays are int64,
    sorted, disjoint. Raises TrainError when the sizes do not fit.
    """
    labels = np.asarray(labels)
    if labels.shape != (n_train,):
        raise TrainError(f"expected {n_train} training labels, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    pool = np.arange(n_train, dtype=np.int64)
    if limit is not None:
        if not 0 < limit <= n_train:
            raise TrainError(f"--limit must be between 1 and {n_train} (the training images), got {limit}")
        pool = _balanced_sample(pool, labels, limit, rng)

    count = min(validation_size, len(pool) // 10)
    if count < 1:
        raise TrainError(
            f"cannot hold out a validation set from {len(pool)} training images: "
            "use at least 10 (raise --limit)"
        )
    validation = _balanced_sample(pool, labels[pool], count, rng)
    train = np.setdiff1d(pool, validation, assume_unique=True)
    return train, validation


def subset_indices(labels, count, seed):
    """Return sorted int64 indices of a seeded class-balanced subset of `count` of `labels`."""
    labels = np.asarray(labels)
    pool = np.arange(len(labels), dtype=np.int64)
    if count >= len(pool):
        return pool
    return _balanced_sample(pool, labels, count, np.random.default_rng(seed))


def _balanced_sample(pool, labels, count, rng):
    """Pick `count` of `pool` (with `labels` aligned to it), as equal per class as the classes allow."""
    classes = np.unique(labels)
    members = [rng.permutation(pool[labels == label]) for label in classes]

    # Deal one image per class in turn (in a seeded class order) until `count` are taken,
    # so classes differ by at most one image unless a class runs out.
    order = rng.permutation(len(classes))
    taken = np.zeros(len(classes), dtype=np.int64)
    remaining = count
    while remaining > 0:
        progressed = False
        for position in order:
            if remaining == 0:
                break
            if taken[position] < len(members[position]):
                taken[position] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise TrainError(f"cannot pick {count} images from {len(pool)}")
    chosen = np.concatenate([group[:n] for group, n in zip(members, taken)])
    return np.sort(chosen).astype(np.int64)
