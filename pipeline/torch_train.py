"""Train an architecture in PyTorch with the shared recipe: an explicit loop over device-resident batches.

Mirrors pipeline/keras_train.py: the same split, schedule, augmentation, early
stopping and output files, written the way each framework is meant to be used.
"""

import logging
import math
import os
import pickle
import time
from pathlib import Path

# torch comes through torch_model, which sets the OpenMP wait policy before torch loads.
from pipeline.torch_model import (
    CHECKPOINT_NAME, build_model, count_parameters, load_checkpoint, preprocess, save_checkpoint, torch,
)
from pipeline import training  # noqa: I001
from pipeline.errors import TrainError
from pipeline.recipe import (
    ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, AUGMENTATIONS, learning_rate_at, split_indices, steps_per_epoch,
    subset_indices,
)

F = torch.nn.functional

logger = logging.getLogger(__name__)

FRAMEWORK = "torch"
LAST_NAME = "last.pt"  # model, optimizer and scheduler state of the last completed epoch


def train_model(dataset, architecture, recipe, out, device="auto", mixed_precision=False, resume=False):
    """Train `architecture` on `dataset` with `recipe`; write OUT/torch/*; return the metrics dict.

    Raises TrainError for an unusable device, batch size or resume state. Ctrl-C or
    SIGTERM stops after keeping the last completed epoch (KeyboardInterrupt propagates).
    """
    run_dir = Path(out) / FRAMEWORK
    device = resolve_device(device)
    autocast_dtype = _autocast_dtype(device, mixed_precision)

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
    train_images, train_labels = _to_device(dataset.train_images, dataset.train_labels, train_indices, device)
    val_images, val_labels = _to_device(dataset.train_images, dataset.train_labels, validation_indices, device)

    # Model, optimizer and the per-step learning-rate schedule.
    torch.manual_seed(recipe.seed)
    # channels_last matches preprocess' NHWC -> NCHW view and runs faster in oneDNN and cuDNN.
    net = build_model(architecture).to(device, memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(
        net.parameters(), recipe.epochs * steps_per_epoch(sizes["train"], recipe.batch_size), recipe
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    state = training.RunState(architecture, recipe.to_dict(), dataset.fingerprint)
    if resume:
        state = training.read_state(run_dir, FRAMEWORK)
        training.check_resume(state, architecture, recipe, dataset.fingerprint, run_dir)
        _load_last(run_dir / LAST_NAME, net, optimizer, scheduler, scaler)
        logger.info("resume: continuing %s after epoch %d", run_dir, state.epoch)

    training.log_header(
        FRAMEWORK, torch.__version__, _describe_device(device), architecture, count_parameters(net),
        dataset, sizes, recipe,
    )
    info = {"class_names": list(dataset.class_names), "dataset_fingerprint": dataset.fingerprint}

    with training.interrupts_raise():
        try:
            for epoch in range(state.epoch + 1, recipe.epochs + 1):
                # Seed each epoch on its own, so a resumed run draws what an uninterrupted one would.
                torch.manual_seed(recipe.seed * 100_003 + epoch)
                row = _run_epoch(epoch, net, optimizer, scheduler, scaler, autocast_dtype, recipe,
                                 train_images, train_labels, val_images, val_labels)
                # Keep the epoch before reporting it, so a logged epoch is always resumable.
                with training.interrupts_deferred():
                    if state.record_epoch(row):
                        save_checkpoint(run_dir / CHECKPOINT_NAME, net, {**info, "epoch": epoch,
                                        "val_accuracy": row["val_accuracy"]})
                    _save_last(run_dir / LAST_NAME, net, optimizer, scheduler, scaler)
                    training.write_state(run_dir, state)
                    training.write_history(run_dir, state.history)
                    logger.info(training.format_epoch(row, recipe.epochs))
                if state.epochs_without_improvement >= recipe.patience:
                    logger.info("early stop: no better val_acc for %d epochs", recipe.patience)
                    break
        except KeyboardInterrupt:
            logger.warning(training.interrupted_message(run_dir, state))
            raise

    # Restore the best weights; the test split is touched here only.
    best, best_info = load_checkpoint(run_dir / CHECKPOINT_NAME, architecture)
    best = best.to(device, memory_format=torch.channels_last)
    test_images, test_labels = _to_device(dataset.test_images, dataset.test_labels, test_indices, device)
    test_loss, test_accuracy = evaluate(best, test_images, test_labels, recipe.eval_batch_size)
    save_checkpoint(run_dir / CHECKPOINT_NAME, best, {**best_info | info, "test_accuracy": round(test_accuracy, 6),
                                                      "recipe": recipe.to_dict()})
    metrics = training.base_metrics(
        FRAMEWORK, architecture, recipe, dataset, state, sizes, test_loss, test_accuracy,
        {"device": _describe_device(device), "mixed_precision": mixed_precision,
         "parameter_count": count_parameters(best), "checkpoint": CHECKPOINT_NAME,
         "versions": training.versions(torch=torch.__version__)},
    )
    training.finish_run(run_dir, state, metrics, f"torch {architecture}: test accuracy {test_accuracy:.4f}")
    return metrics


def _run_epoch(epoch, net, optimizer, scheduler, scaler, autocast_dtype, recipe,
               train_images, train_labels, val_images, val_labels):
    """Train one epoch then validate; return its history row."""
    started = time.perf_counter()
    net.train()
    count = len(train_labels)
    order = torch.randperm(count, device=train_images.device)
    loss_sum = torch.zeros((), device=train_images.device)
    correct = torch.zeros((), device=train_images.device, dtype=torch.long)
    progress = training.EpochProgress(epoch, recipe.epochs, count)

    for start in range(0, count, recipe.batch_size):
        batch = order[start:start + recipe.batch_size]
        images = augment(train_images[batch], recipe)
        labels = train_labels[batch]
        with torch.autocast(train_images.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = net(preprocess(images))
            loss = training_loss(logits, labels, recipe)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the epoch line reports the last
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(batch)
        correct += (logits.argmax(dim=1) == labels).sum()
        progress.update(len(batch))
    train_seconds = time.perf_counter() - started
    progress.clear()

    val_loss, val_accuracy = evaluate(net, val_images, val_labels, recipe.eval_batch_size)
    return training.epoch_row(
        epoch, loss_sum.item() / count, correct.item() / count, val_loss, val_accuracy,
        lr, count, time.perf_counter() - started, train_seconds,
    )


def training_loss(logits, labels, recipe):
    """Return the mean cross-entropy of `logits` against integer `labels` smoothed by the recipe."""
    return F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)


def make_optimizer(parameters, total_steps, recipe):
    """Return (Adam, a LambdaLR that sets each step's learning rate from the recipe's schedule).

    Conv and dense kernels (the parameters with more than one dimension) get the recipe's
    decoupled weight decay. Biases and BatchNorm parameters get none.
    """
    parameters = list(parameters)
    groups = [
        {"params": [p for p in parameters if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.Adam(groups, lr=recipe.lr, betas=(ADAM_BETA1, ADAM_BETA2), eps=ADAM_EPSILON,
                                 decoupled_weight_decay=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, total_steps, recipe) / recipe.lr
    )
    return optimizer, scheduler


@torch.inference_mode()
def evaluate(net, images, labels, batch_size):
    """Return (mean cross-entropy, accuracy) of `net` in eval mode on uint8 NHWC `images`."""
    net.eval()
    loss_sum = 0.0
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = net(preprocess(images[start:start + batch_size])).float()
        batch_labels = labels[start:start + batch_size]
        loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == batch_labels).sum().item()
    return loss_sum / len(labels), correct / len(labels)


def augment(images, recipe):
    """Augment a uint8 [N, 32, 32, 3] (NHWC) batch on its device; return float32 NHWC on 0-255.

    Applies the transforms of AUGMENTATIONS[recipe.augment] in order, each drawn per
    image from the global torch generator.
    """
    x = images.to(torch.float32)
    for transform in AUGMENTATIONS[recipe.augment]:
        x = _TRANSFORMS[transform](x, recipe)
    return x


def _random_crop(x, recipe):
    """Pad by the recipe's crop_fill, then cut a random 32x32 window per image (NHWC)."""
    n, height, width, _ = x.shape
    pad = recipe.crop_padding
    # F.pad's reflect mode pads the last dimensions, so pad H and W of an NCHW view.
    nchw = x.permute(0, 3, 1, 2)
    padded = F.pad(nchw, (pad, pad, pad, pad), mode=_PAD_MODES[recipe.crop_fill]).permute(0, 2, 3, 1)
    top = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    left = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (top + torch.arange(height, device=x.device))[:, :, None]  # [N, H, 1]
    columns = (left + torch.arange(width, device=x.device))[:, None, :]  # [N, 1, W]
    return padded[torch.arange(n, device=x.device)[:, None, None], rows, columns]


def _random_flip(x, recipe):
    """Mirror left-right with probability 0.5 per image (NHWC: width is dim 2)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(2), x)


def _random_affine(x, recipe):
    """Rotate, zoom and shift each image at random, bilinear, black outside (NHWC in and out)."""
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * recipe.rotation * 2 * math.pi
    scale = 1 + (torch.rand(n, device=x.device) * 2 - 1) * recipe.zoom  # > 1 samples a wider area: zoom out
    # affine_grid works in normalised coordinates spanning 2 across the image.
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * recipe.translation * 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0]], dim=1),
        torch.stack([sin, cos, shift[:, 1]], dim=1),
    ], dim=1)
    nchw = x.permute(0, 3, 1, 2)  # NHWC -> NCHW for grid_sample
    grid = F.affine_grid(theta, list(nchw.shape), align_corners=False)
    out = F.grid_sample(nchw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 2, 3, 1)  # NCHW -> NHWC


def _random_jitter(x, recipe):
    """Scale brightness, then contrast around the grey mean, by random factors per image."""
    n = x.shape[0]
    brightness = 1 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * recipe.brightness
    x = (x * brightness).clamp(0, 255)
    contrast = 1 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * recipe.contrast
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device)).sum(dim=3).mean(dim=(1, 2))
    grey = grey[:, None, None, None]
    return ((x - grey) * contrast + grey).clamp(0, 255)


_PAD_MODES = {"reflect": "reflect", "black": "constant"}  # crop_fill -> F.pad mode
_TRANSFORMS = {"crop": _random_crop, "flip": _random_flip, "affine": _random_affine, "jitter": _random_jitter}


def resolve_device(requested):
    """Return the torch.device for --device (auto: cuda, then mps, then cpu); raise TrainError if absent."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise TrainError("--device cuda: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
    if requested == "mps" and not mps:
        raise TrainError("--device mps: Apple MPS is not available to PyTorch; use --device auto or cpu")
    return torch.device(requested)


def _autocast_dtype(device, mixed_precision):
    """Return the autocast dtype for --mixed-precision (None when off); raise TrainError on CPU."""
    if not mixed_precision:
        return None
    if device.type == "cpu":
        raise TrainError("--mixed-precision needs a GPU (cuda or mps), but the device is cpu: drop the option")
    # NOTE: not run on a GPU in this repository's tests (they run on CPU only).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # same range as float32, so no loss scaling
    return torch.float16


def _describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type


def _to_device(images, labels, indices, device):
    """Select `indices` and move uint8 NHWC images and int64 labels to `device`."""
    return (
        torch.from_numpy(images[indices]).to(device),
        torch.from_numpy(labels[indices].astype("int64")).to(device),
    )


def _save_last(path, net, optimizer, scheduler, scaler):
    """Write the resume state (weights, optimizer, schedule, loss scale) atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }, temporary)
    os.replace(temporary, path)


def _load_last(path, net, optimizer, scheduler, scaler):
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found: start a new run without --resume")
    try:
        last = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as error:
        # torch's weights_only message runs over several lines; its first states the cause.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainError(f"--resume: cannot read {path}: {reason}; start a new run without --resume") from error
