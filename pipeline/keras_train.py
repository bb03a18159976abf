"""Train an architecture in Keras with the shared recipe: `fit` with callbacks.

Mirrors pipeline/torch_train.py: the same split, schedule, augmentation, early
stopping and output files, written the way each framework is meant to be used.
"""

import logging
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline import training
from pipeline.errors import TrainError
from pipeline.keras_model import (
    CHECKPOINT_NAME, build_model, count_parameters, inference, keras, load_checkpoint, preprocess,
    save_checkpoint, tf,
)
from pipeline.recipe import (
    ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, AUGMENTATIONS, learning_rate_at, learning_rate_table, split_indices,
    steps_per_epoch, subset_indices,
)

logger = logging.getLogger(__name__)

FRAMEWORK = "keras"
LAST_NAME = "last.npz"  # weights and optimizer variables of the last completed epoch


def train_model(dataset, architecture, recipe, out, device="auto", mixed_precision=False, resume=False):
    """Train `architecture` on `dataset` with `recipe`; write OUT/keras/*; return the metrics dict.

    Raises TrainError for an unusable device, batch size or resume state. Ctrl-C or
    SIGTERM stops after keeping the last completed epoch (KeyboardInterrupt propagates).
    """
    run_dir = Path(out) / FRAMEWORK
    device = resolve_device(device)
    _set_precision(device, mixed_precision)

    # The split: both frameworks call split_indices, so the validation images are identical.
    train_indices, validation_indices = split_indices(
        len(dataset.train_labels), dataset.train_labels, recipe.validation_size, recipe.seed, recipe.limit
    )
    test_indices = subset_indices(dataset.test_labels, recipe.limit or len(dataset.test_labels), recipe.seed)
    sizes = {"train": len(train_indices), "validation": len(validation_indices), "test": len(test_indices)}
    if recipe.batch_size > sizes["train"]:
        raise TrainError(
            f"--batch-size {recipe.batch_size} is larger than the {sizes['train']} training images: "
            "lower --batch-size or raise --limit"
        )

    state = training.RunState(architecture, recipe.to_dict(), dataset.fingerprint)
    if resume:
        state = training.read_state(run_dir, FRAMEWORK)
        training.check_resume(state, architecture, recipe, dataset.fingerprint, run_dir)

    # Model and trainer: uint8 NHWC batches -> augmentation (training only) -> preprocess -> net.
    keras.utils.set_random_seed(recipe.seed)
    net = build_model(architecture)
    trainer = keras.Sequential(
        [keras.Input(shape=net.input_shape[1:], dtype="uint8"), Augmentation(recipe), Preprocess(), net],
        name="trainer",
    )
    total_steps = recipe.epochs * steps_per_epoch(sizes["train"], recipe.batch_size)
    trainer.compile(
        optimizer=make_optimizer(net.trainable_variables, total_steps, recipe),
        loss=smoothed_cross_entropy(recipe.label_smoothing, net.output_shape[-1]),
        # Validation loss is plain cross-entropy, as in the torch stage, because only training smooths labels.
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy")],
        jit_compile=False,  # NOTE: XLA left off to keep the custom augmentation ops plain; its speed is not measured
    )
    if resume:
        _load_last(run_dir / LAST_NAME, net, trainer)
        logger.info("resume: continuing %s after epoch %d", run_dir, state.epoch)
        # Reseed, so the resumed epochs do not replay the first epochs' shuffles and dropout.
        keras.utils.set_random_seed(recipe.seed * 100_003 + state.epoch)

    training.log_header(
        FRAMEWORK, f"{keras.__version__} (tensorflow {tf.__version__})", _describe_device(device), architecture,
        count_parameters(net), dataset, sizes, recipe,
    )
    info = {"class_names": list(dataset.class_names), "dataset_fingerprint": dataset.fingerprint}

    train_data = _batches(dataset.train_images[train_indices], dataset.train_labels[train_indices],
                          recipe.batch_size, shuffle_seed=recipe.seed + state.epoch)
    val_data = _batches(dataset.train_images[validation_indices], dataset.train_labels[validation_indices],
                        recipe.eval_batch_size)
    early_stopping = ResumableEarlyStopping(state, monitor="val_accuracy", mode="max", patience=recipe.patience)
    progress = ProgressBar(recipe, sizes["train"])
    callbacks = [
        progress,
        early_stopping,  # before RunRecorder, which stores the counters it updates
        RunRecorder(run_dir, state, net, info, recipe, progress, total_steps),
    ]

    with training.interrupts_raise():
        try:
            if state.epoch < recipe.epochs:
                trainer.fit(train_data, validation_data=val_data, epochs=recipe.epochs,
                            initial_epoch=state.epoch, callbacks=callbacks, shuffle=False, verbose=0)
        except KeyboardInterrupt:
            logger.warning(training.interrupted_message(run_dir, state))
            raise
    if early_stopping.stopped_epoch:
        logger.info("early stop: no better val_acc for %d epochs", recipe.patience)

    # Restore the best weights; the test split is touched here only.
    best, best_info = load_checkpoint(run_dir / CHECKPOINT_NAME, architecture)
    test_loss, test_accuracy = evaluate(best, dataset.test_images[test_indices],
                                        dataset.test_labels[test_indices], recipe.eval_batch_size)
    save_checkpoint(run_dir / CHECKPOINT_NAME, best, {**best_info | info, "test_accuracy": round(test_accuracy, 6),
                                                      "recipe": recipe.to_dict()})
    metrics = training.base_metrics(
        FRAMEWORK, architecture, recipe, dataset, state, sizes, test_loss, test_accuracy,
        {"device": _describe_device(device), "mixed_precision": mixed_precision,
         "parameter_count": count_parameters(best), "checkpoint": CHECKPOINT_NAME,
         "versions": training.versions(tensorflow=tf.__version__, keras=keras.__version__)},
    )
    training.finish_run(run_dir, state, metrics, f"keras {architecture}: test accuracy {test_accuracy:.4f}")
    return metrics


def evaluate(model, images, labels, batch_size):
    """Return (mean cross-entropy, accuracy) of `model` in inference mode on uint8 NHWC `images`."""
    loss_sum = 0.0
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits, _ = inference(model, images[start:start + batch_size])
        batch_labels = labels[start:start + batch_size]
        loss_sum += float(tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            batch_labels, logits, from_logits=True)))
        correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == batch_labels))
    return loss_sum / len(labels), correct / len(labels)


def _batches(images, labels, batch_size, shuffle_seed=None):
    """Return a tf.data pipeline of (uint8 NHWC images, int64 labels) batches; shuffled when seeded."""
    data = tf.data.Dataset.from_tensor_slices((images, labels.astype("int64")))
    if shuffle_seed is not None:
        data = data.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


_PAD_MODES = {"reflect": "REFLECT", "black": "CONSTANT"}  # crop_fill -> tf.pad mode


class Augmentation(keras.layers.Layer):
    """Augment uint8 [N, 32, 32, 3] (NHWC) batches while training; return float32 NHWC on 0-255.

    Applies the transforms of AUGMENTATIONS[recipe.augment] in order on the training
    device, each drawn per image; with training=False it only casts to float32.
    """

    def __init__(self, recipe, **kwargs):
        super().__init__(**kwargs)
        self.recipe = recipe
        self.seed_generator = keras.random.SeedGenerator(recipe.seed)

    def call(self, images, training=None):
        x = tf.cast(images, tf.float32)
        if not training:
            return x
        for transform in AUGMENTATIONS[self.recipe.augment]:
            x = getattr(self, f"_random_{transform}")(x)
        return x

    def _uniform(self, shape, low=-1.0, high=1.0):
        return keras.random.uniform(shape, low, high, seed=self.seed_generator)

    def _random_crop(self, x):
        """Pad by the recipe's crop_fill, then cut a random 32x32 window per image."""
        n, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
        pad = self.recipe.crop_padding
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=_PAD_MODES[self.recipe.crop_fill])
        top = tf.cast(tf.floor(self._uniform((n, 1), 0.0, 2 * pad + 1)), tf.int32)
        left = tf.cast(tf.floor(self._uniform((n, 1), 0.0, 2 * pad + 1)), tf.int32)
        top = tf.minimum(top, 2 * pad)  # uniform's upper bound is open; guard the float edge anyway
        left = tf.minimum(left, 2 * pad)
        rows = top + tf.range(height)[None, :]  # [N, H]
        columns = left + tf.range(width)[None, :]  # [N, W]
        x = tf.gather(padded, rows, axis=1, batch_dims=1)  # [N, H, W + 2 pad, C]
        return tf.gather(x, columns, axis=2, batch_dims=1)  # [N, H, W, C]

    def _random_flip(self, x):
        """Mirror left-right with probability 0.5 per image (NHWC: width is axis 2)."""
        flip = self._uniform((tf.shape(x)[0], 1, 1, 1), 0.0, 1.0) < 0.5
        return tf.where(flip, tf.reverse(x, axis=[2]), x)

    def _random_affine(self, x):
        """Rotate, zoom and shift each image at random, bilinear, black outside."""
        n, size = tf.shape(x)[0], x.shape[1]
        angle = self._uniform((n,)) * self.recipe.rotation * 2 * math.pi
        scale = 1 + self._uniform((n,)) * self.recipe.zoom  # > 1 samples a wider area: zoom out
        shift = self._uniform((n, 2)) * self.recipe.translation * size  # pixels
        cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
        # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): the same map
        # as torch's affine_grid theta, moved from normalised to pixel coordinates about the centre.
        centre = (size - 1) / 2
        transforms = tf.stack([
            cos, -sin, centre - cos * centre + sin * centre + shift[:, 0],
            sin, cos, centre - sin * centre - cos * centre + shift[:, 1],
            tf.zeros_like(cos), tf.zeros_like(cos),
        ], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=[size, size], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT",
        )

    def _random_jitter(self, x):
        """Scale brightness, then contrast around the grey mean, by random factors per image."""
        n = tf.shape(x)[0]
        brightness = 1 + self._uniform((n, 1, 1, 1)) * self.recipe.brightness
        x = tf.clip_by_value(x * brightness, 0.0, 255.0)
        contrast = 1 + self._uniform((n, 1, 1, 1)) * self.recipe.contrast
        grey = tf.reduce_mean(tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=3), axis=(1, 2))
        grey = grey[:, None, None, None]
        return tf.clip_by_value((x - grey) * contrast + grey, 0.0, 255.0)


class Preprocess(keras.layers.Layer):
    """Normalise float NHWC pixels on 0-255 with MEAN/STD (keras_model.preprocess as a layer)."""

    def call(self, x):
        return preprocess(x)


def smoothed_cross_entropy(smoothing, num_classes):
    """Return a Keras loss: cross-entropy of logits against integer labels smoothed by `smoothing`.

    Targets become (1 - smoothing) * one-hot + smoothing / num_classes, which is what
    PyTorch's cross_entropy(label_smoothing=smoothing) computes. Keras 3's
    SparseCategoricalCrossentropy has no label_smoothing argument, hence the one-hot step.
    """

    def loss(labels, logits):
        targets = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), num_classes)
        return keras.losses.categorical_crossentropy(
            targets, tf.cast(logits, tf.float32), from_logits=True, label_smoothing=smoothing)

    return loss


def make_optimizer(variables, total_steps, recipe):
    """Return Adam whose learning rate follows the recipe's schedule, one table entry per step.

    The rate is looked up from the step counter inside the compiled train step, so no
    callback runs Python between batches to set it. Of `variables`, only conv and dense
    kernels (more than one dimension) get the recipe's decoupled weight decay.
    """
    optimizer = keras.optimizers.Adam(learning_rate=StepTable(learning_rate_table(total_steps, recipe)),
                                      beta_1=ADAM_BETA1, beta_2=ADAM_BETA2, epsilon=ADAM_EPSILON,
                                      weight_decay=recipe.weight_decay or None)
    optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    return optimizer


class StepTable(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule that reads one precomputed value per optimizer step."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)

    def __call__(self, step):
        index = keras.ops.minimum(keras.ops.cast(step, "int32"), len(self.values) - 1)
        return keras.ops.take(keras.ops.convert_to_tensor(self.values), index)

    def get_config(self):
        return {"values": self.values.tolist()}


class ProgressBar(keras.callbacks.Callback):
    """The in-epoch progress line (images, rate, ETA) and the timings the epoch line reports."""

    def __init__(self, recipe, train_size):
        super().__init__()
        self.recipe = recipe
        self.train_size = train_size

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.train_seconds = None
        self.done = 0
        self.progress = training.EpochProgress(epoch + 1, self.recipe.epochs, self.train_size)

    def on_train_batch_end(self, batch, logs=None):
        done = min((batch + 1) * self.recipe.batch_size, self.train_size)
        self.progress.update(done - self.done)
        self.done = done

    def on_test_begin(self, logs=None):
        if getattr(self, "train_seconds", 0) is None:
            self.train_seconds = time.perf_counter() - self.started
            self.progress.clear()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that starts from the counters of a resumed run instead of from zero.

    The best weights are restored from model.keras after fit (not by restore_best_weights,
    which would hold them only in memory and lose them across a resume).
    """

    def __init__(self, state, **kwargs):
        super().__init__(restore_best_weights=False, **kwargs)
        self.state = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state.epoch:
            self.wait = self.state.epochs_without_improvement
            self.best = self.state.best_val_accuracy
            self.best_epoch = self.state.best_epoch - 1


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: log the epoch line, keep the best model.keras, write resume state and history."""

    def __init__(self, run_dir, state, net, info, recipe, progress, total_steps):
        super().__init__()
        self.total_steps = total_steps
        self.run_dir = run_dir
        self.state = state
        self.net = net
        self.info = info
        self.recipe = recipe
        self.progress = progress

    def on_epoch_end(self, epoch, logs=None):
        progress = self.progress
        now = time.perf_counter()
        train_seconds = progress.train_seconds or (now - progress.started)
        row = training.epoch_row(
            epoch + 1, logs["loss"], logs["accuracy"], logs["val_cross_entropy"], logs["val_accuracy"],
            self._last_learning_rate(), progress.train_size, now - progress.started,
            train_seconds,
        )
        # Keep the epoch before reporting it, so a logged epoch is always resumable.
        with training.interrupts_deferred():
            if self.state.record_epoch(row):
                save_checkpoint(self.run_dir / CHECKPOINT_NAME, _float32_copy(self.net),
                                {**self.info, "epoch": epoch + 1, "val_accuracy": row["val_accuracy"]})
            _save_last(self.run_dir / LAST_NAME, self.net, self.model)
            training.write_state(self.run_dir, self.state)
            training.write_history(self.run_dir, self.state.history)
            logger.info(training.format_epoch(row, self.recipe.epochs))

    def _last_learning_rate(self):
        """Return the rate the epoch's last step used, as the torch stage reports it."""
        steps = int(self.model.optimizer.iterations.numpy())
        return learning_rate_at(steps - 1, self.total_steps, self.recipe)


def _float32_copy(net):
    """Return `net` itself, or under mixed precision a float32 twin with its weights (what is saved and exported)."""
    if keras.config.dtype_policy().name == "float32":
        return net
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        twin = build_model(net.name)
        twin.set_weights(net.get_weights())
    finally:
        keras.config.set_dtype_policy(policy)
    return twin


def _save_last(path, net, trainer):
    """Write the resume state (net weights incl. BatchNorm statistics, optimizer variables) atomically."""
    arrays = {f"weight_{i}": value for i, value in enumerate(net.get_weights())}
    arrays.update({f"optimizer_{i}": variable.numpy() for i, variable in enumerate(trainer.optimizer.variables)})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def _load_last(path, net, trainer):
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found: start a new run without --resume")
    try:
        with np.load(path) as arrays:
            weights = [arrays[f"weight_{i}"] for i in range(len(net.get_weights()))]
            net.set_weights(weights)
            optimizer = trainer.optimizer
            optimizer.build(trainer.trainable_variables)
            for i, variable in enumerate(optimizer.variables):
                variable.assign(arrays[f"optimizer_{i}"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise TrainError(f"--resume: cannot read {path}: {error}; start a new run without --resume") from error


def resolve_device(requested):
    """Return "gpu" or "cpu" for --device (auto: a visible GPU, else cpu); raise TrainError if absent.

    Must run before TensorFlow touches a device: --device cpu hides every GPU.
    """
    if requested == "mps":
        raise TrainError("--device mps is available for --framework torch only: use --device auto or cpu")
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "cuda" and not gpus:
        raise TrainError("--device cuda: no CUDA GPU is visible to TensorFlow; use --device auto or cpu")
    if requested == "cpu" or not gpus:
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu"
    return "gpu"


def _set_precision(device, mixed_precision):
    """Switch Keras to mixed_float16 for --mixed-precision; raise TrainError on CPU."""
    if not mixed_precision:
        keras.config.set_dtype_policy("float32")
        return
    if device == "cpu":
        raise TrainError("--mixed-precision needs a GPU (cuda), but the device is cpu: drop the option")
    # NOTE: not run on a GPU in this repository's tests (they run on CPU only). Keras'
    # compile wraps the optimizer in a LossScaleOptimizer under this policy.
    keras.config.set_dtype_policy("mixed_float16")


def _describe_device(device):
    if device == "gpu":
        return f"gpu ({tf.config.list_physical_devices('GPU')[0].name})"
    return f"cpu ({os.cpu_count()} cores, {tf.config.threading.get_intra_op_parallelism_threads() or 'all'} intra-op threads)"
