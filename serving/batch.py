"""Classify many image files with a Predictor, decoding in threads while the session runs.

Pillow releases the GIL while it decodes and onnxruntime while it runs, so a thread
pool keeps the next batches decoding during inference without extra processes.
"""

import collections
import concurrent.futures
import dataclasses
import os

import numpy as np

from serving.errors import ImageError
from serving.images import load_image
from serving.predictor import DEFAULT_BATCH_SIZE

PREFETCH_BATCHES = 2  # batches decoded ahead of the one the session runs


@dataclasses.dataclass(frozen=True)
class FileResult:
    """One file's outcome: a Prediction, or the reason it could not be read."""

    path: object  # the path as collected (str or Path)
    prediction: object = None  # serving.Prediction, None when `error` is set
    error: str = None  # the reason, without the path, None on success


def default_decode_workers():
    """Return the decoding thread count: one per CPU, at most 8."""
    # NOTE: the cap of 8 is a guess. Throughput was measured on 2 cores only.
    return max(1, min(8, os.cpu_count() or 1))


def classify_files(predictor, paths, top_k=1, batch_size=DEFAULT_BATCH_SIZE, workers=None):
    """Yield a FileResult for every path in `paths`, in the same order.

    Unreadable files give a FileResult with `error` and the run goes on. `workers`
    decoding threads (default `default_decode_workers()`) decode up to
    PREFETCH_BATCHES batches ahead while the session runs the current one.
    """
    paths = list(paths)
    workers = workers or default_decode_workers()
    batches = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = collections.deque()
        for batch in batches[:PREFETCH_BATCHES]:
            pending.append(_submit_decoding(pool, batch, workers))
        for index, batch in enumerate(batches):
            decoded = [item for future in pending.popleft() for item in future.result()]
            following = index + PREFETCH_BATCHES
            if following < len(batches):
                pending.append(_submit_decoding(pool, batches[following], workers))
            yield from _classify_decoded(predictor, batch, decoded, top_k)


def _submit_decoding(pool, batch, workers):
    # One task per worker and batch keeps the per-task overhead small next to decoding.
    chunk = -(-len(batch) // workers)
    return [pool.submit(_decode_all, batch[start:start + chunk]) for start in range(0, len(batch), chunk)]


def _decode_all(paths):
    decoded = []
    for path in paths:
        try:
            decoded.append(load_image(path))
        except ImageError as error:
            decoded.append(error)
    return decoded


def _classify_decoded(predictor, paths, decoded, top_k):
    arrays = [item for item in decoded if isinstance(item, np.ndarray)]
    predictions = iter([])
    if arrays:
        predictions = iter(predictor.to_predictions(predictor.predict_probabilities(np.stack(arrays)), top_k))
    for path, item in zip(paths, decoded):
        if isinstance(item, ImageError):
            yield FileResult(path, error=getattr(item, "reason", str(item)))
        else:
            yield FileResult(path, prediction=next(predictions))
