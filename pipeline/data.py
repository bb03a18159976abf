"""The data stage: turn a CIFAR-10 source into cached, framework-neutral uint8 arrays.

Sources are the canonical binary archive (downloaded with pooch, MD5-checked), or a
folder or .tar/.tar.gz laid out as train/<class>/* and test/<class>/*. Training,
verification and benchmarks all start from `load_dataset`.
"""

import concurrent.futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError
from pipeline.progress import Progress
from serving.contract import CHANNELS, IMAGE_SIZE
from serving.errors import ImageError
from serving.images import load_image

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the CIFAR-10 page
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
URL_ENV = "CIFAR_ONNX_CIFAR10_URL"  # when set, replaces CIFAR10_URL for every stage

# The binary version: each record is 1 label byte then 3072 pixel bytes, R then G then B
# planes of 32x32, row-major.
_BINARY_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_BINARY_TEST_FILE = "test_batch.bin"
_BINARY_META_FILE = "batches.meta.txt"
_RECORD_BYTES = 1 + CHANNELS * IMAGE_SIZE * IMAGE_SIZE

_CACHE_FORMAT = 1  # bump when the layout of the .npz changes, so old caches are rebuilt
_SPLITS = ("train", "test")
_CHUNK_SIZE = 1000  # images per worker task
_MIN_PARALLEL = 2000  # below this many images, decoding in-process beats starting workers
_FIX_LOCAL = "or point DATA at a local copy: --data /path/to/folder-or-tarball (make ... DATA=path)"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset: uint8 RGB images [N, 32, 32, 3] (NHWC) and int64 labels [N]."""

    train_images: np.ndarray = field(repr=False)
    train_labels: np.ndarray = field(repr=False)
    test_images: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)
    class_names: tuple
    fingerprint: str  # sha256 hex of images, labels and class names; independent of the source
    source: str
    cache_path: Path
    cache_reused: bool = False  # True when the arrays came from an existing cache


def load_dataset(source="cifar10", out="artifacts", *, url=None, md5=CIFAR10_MD5,
                 progress=True, workers=None, retries=2):
    """Build or reuse the cache of `source` under `out/data/cache/` and return a Dataset.

    `source` is "cifar10" (download `url`, check `md5`), a folder, or a .tar/.tar.gz
    file with train/<class>/* and test/<class>/* (optionally inside one top folder),
    or a local copy of the canonical binary archive or its extracted folder.
    `workers` sets the decoding processes (default: every usable core); `retries`
    sets extra download attempts. Raises DataError naming the path and the fix;
    a failed build leaves no cache file behind.
    """
    url = url or os.environ.get(URL_ENV) or CIFAR10_URL
    out = Path(out)
    cache_dir = out / "data" / "cache"
    if source == "cifar10":
        # Keyed on the archive's MD5, which pooch checks before any build.
        key = f"cifar10 md5:{md5.lower()}"
        cache_path = cache_dir / "cifar10.npz"
        build = lambda: _build_cifar10(out, url, md5, progress, retries)  # noqa: E731
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data source {path} not found: expected 'cifar10', a folder or a "
                            f".tar/.tar.gz file; check the path given to --data (DATA=...)")
        path = path.resolve()
        key = _source_key(path)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.split(".")[0]) or "data"
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:12]
        cache_path = cache_dir / f"{name}-{digest}.npz"
        build = lambda: _build_local(path, progress, workers)  # noqa: E731

    cached = _read_cache(cache_path, key, str(source))
    if cached is not None:
        log.info("reusing dataset cache %s", cache_path)
        return cached

    started = time.monotonic()
    arrays, class_names = build()
    fingerprint = _fingerprint(arrays, class_names)
    _write_cache(cache_path, key, arrays, class_names, fingerprint)
    log.info("built dataset cache %s in %.1f s", cache_path, time.monotonic() - started)
    return Dataset(*arrays, class_names=tuple(class_names), fingerprint=fingerprint,
                   source=str(source), cache_path=cache_path, cache_reused=False)


def download_cifar10(directory, url=CIFAR10_URL, md5=CIFAR10_MD5, progress=True, retries=2):
    """Download the canonical archive into `directory` unless a copy with `md5` is there.

    Returns its path. pooch 1.9 streams into a temporary file in `directory`, checks
    the MD5 and only then renames it. So an interrupted or corrupt download never
    appears under the final name, and an existing file with the wrong hash is fetched again.
    """
    import pooch
    import requests

    directory = Path(directory)
    fetcher = pooch.create(path=directory, base_url="", registry={CIFAR10_ARCHIVE: f"md5:{md5}"},
                           urls={CIFAR10_ARCHIVE: url}, retry_if_failed=retries)
    bar = Progress(0, f"downloading {CIFAR10_ARCHIVE}", unit="B", enabled=progress)
    downloader = pooch.HTTPDownloader(progressbar=bar, chunk_size=1 << 20, timeout=30)
    # pooch logs its start and retry lines to its own stderr handler, outside the
    # CLI's logging setup, so only its warnings are kept.
    pooch.get_logger().setLevel(logging.WARNING)
    log.debug("fetching %s from %s into %s", CIFAR10_ARCHIVE, url, directory)
    try:
        return Path(fetcher.fetch(CIFAR10_ARCHIVE, downloader=downloader))
    except ValueError as error:
        # pooch's message: "... expected md5:<hex> but got <hex>. Deleted download ..."
        match = re.search(r"but got ([0-9a-fA-F]+)", str(error))
        if match is None:
            raise DataError(f"cannot download {url}: {_one_line(error)}; check the URL "
                            f"({URL_ENV}) {_FIX_LOCAL}") from error
        actual = match.group(1)
        raise DataError(f"MD5 mismatch for {CIFAR10_ARCHIVE} downloaded from {url}: expected "
                        f"{md5}, got {actual}; the download was deleted. Retry, or download it "
                        f"yourself, check its MD5 and pass --data /path/to/{CIFAR10_ARCHIVE}") from error
    except requests.exceptions.RequestException as error:
        reason = _one_line(error)
        raise DataError(f"could not reach {url} to download CIFAR-10 ({reason}); check the "
                        f"network {_FIX_LOCAL}") from error


def extract_tarball(archive, target):
    """Extract `archive` into the folder `target`, rejecting members that would land outside.

    Raises DataError naming the first unsafe member (absolute path, `..`, a link
    leading outside, a device file); tarfile's "data" filter checks the same again.
    """
    archive, target = Path(archive), Path(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            tar.extractall(target, members=members, filter="data")
    except tarfile.FilterError as error:
        name = error.tarinfo.name if error.tarinfo is not None else "?"
        raise DataError(f"unsafe member {name!r} in {archive}: {error}; "
                        f"use an archive whose members stay inside its top folder") from error
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read tar archive {archive}: {_one_line(error)}; "
                        f"replace it with a complete .tar or .tar.gz file") from error


# ---------------------------------------------------------------- cache


def _source_key(path):
    """Identify the state of a local source without reading its content.

    A file is keyed on its path, size and mtime; a folder on the path, size and
    mtime of every file under it. NOTE: an edit that keeps both size and mtime
    (for example a copy with preserved timestamps) is not detected.
    """
    if path.is_file():
        stat = path.stat()
        return f"file {path} {stat.st_size} {stat.st_mtime_ns}"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file_path = Path(root, name)
            stat = file_path.stat()
            # os.fsencode keeps file names that are not valid UTF-8 as their original bytes.
            digest.update(os.fsencode(file_path.relative_to(path)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder {path} {digest.hexdigest()}"


def _read_cache(cache_path, key, source):
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as npz:
            if int(npz["format"]) != _CACHE_FORMAT or str(npz["source_key"]) != key:
                log.info("source changed since %s was built; rebuilding it", cache_path)
                return None
            arrays = tuple(npz[f"{split}_{kind}"] for split in _SPLITS for kind in ("images", "labels"))
            class_names = tuple(str(name) for name in npz["class_names"])
            fingerprint = str(npz["fingerprint"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        log.warning("dataset cache %s is unreadable (%s); rebuilding it", cache_path, _one_line(error))
        return None
    return Dataset(*arrays, class_names=class_names, fingerprint=fingerprint, source=source,
                   cache_path=cache_path, cache_reused=True)


def _write_cache(cache_path, key, arrays, class_names, fingerprint):
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    train_images, train_labels, test_images, test_labels = arrays
    # A per-process name, opened with open() so that the file mode follows the umask.
    temporary = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            np.savez(file, format=np.int64(_CACHE_FORMAT), source_key=np.str_(key),
                     fingerprint=np.str_(fingerprint), class_names=np.array(class_names, dtype=str),
                     train_images=train_images, train_labels=train_labels,
                     test_images=test_images, test_labels=test_labels)
        os.replace(temporary, cache_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fingerprint(arrays, class_names):
    digest = hashlib.sha256()
    digest.update(json.dumps(list(class_names)).encode())
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# ---------------------------------------------------------------- canonical binary archive


def _build_cifar10(out, url, md5, progress, retries):
    downloads = out / "data" / "downloads"
    archive = download_cifar10(downloads, url=url, md5=md5, progress=progress, retries=retries)
    return _build_binary_archive(archive, downloads)


def _build_binary_archive(archive, scratch_parent):
    # The extracted files live only for this build; the next build extracts again
    # from the archive, whose hash pooch checks on every fetch.
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix="extract-") as scratch:
        extract_tarball(archive, scratch)
        folder = _find_binary_folder(Path(scratch))
        if folder is None:
            raise DataError(f"{archive} contains no {_BINARY_TEST_FILE}: expected the CIFAR-10 "
                            f"binary version ({CIFAR10_ARCHIVE}); check the archive")
        return _parse_binary_folder(folder, archive)


def _find_binary_folder(root):
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (candidate / _BINARY_TEST_FILE).is_file():
            return candidate
    return None


def _parse_binary_folder(folder, origin):
    names_path = folder / _BINARY_META_FILE
    if not names_path.is_file():
        raise DataError(f"{origin} has no {_BINARY_META_FILE} beside {_BINARY_TEST_FILE}; "
                        f"use the complete CIFAR-10 binary archive")
    class_names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    train = [_parse_binary_batch(folder / name, origin, len(class_names)) for name in _BINARY_TRAIN_FILES]
    test_images, test_labels = _parse_binary_batch(folder / _BINARY_TEST_FILE, origin, len(class_names))
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return (train_images, train_labels, test_images, test_labels), class_names


def _parse_binary_batch(path, origin, class_count):
    if not path.is_file():
        raise DataError(f"{origin} has no {path.name}; use the complete CIFAR-10 binary archive")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD_BYTES:
        raise DataError(f"{path.name} in {origin} has {raw.size} bytes, expected a non-zero multiple "
                        f"of {_RECORD_BYTES}; the archive is damaged, download it again")
    records = raw.reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= class_count:
        raise DataError(f"{path.name} in {origin} has label {labels.max()} but {_BINARY_META_FILE} "
                        f"names {class_count} classes; the archive is damaged, download it again")
    # Planar CHW per record -> NHWC, the layout of the ONNX contract.
    images = records[:, 1:].reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


# ---------------------------------------------------------------- local folder or tarball


def _build_local(path, progress, workers):
    if path.is_dir():
        binary = _find_binary_folder(path)
        if binary is not None:
            return _parse_binary_folder(binary, path)
        return _build_image_folder(path, progress, workers)
    if not tarfile.is_tarfile(path):
        raise DataError(f"data source {path} is neither a folder nor a .tar/.tar.gz archive; "
                        f"pass a folder or tarball with train/<class>/ and test/<class>/")
    return _build_tarball(path, progress, workers)


def _build_image_folder(path, progress, workers):
    root = _find_split_root(path, lambda folder: sorted(c.name for c in folder.iterdir() if c.is_dir()))
    splits = {}
    for split in _SPLITS:
        classes = {}
        for class_dir in sorted(c for c in (root / split).iterdir() if c.is_dir()):
            classes[class_dir.name] = [str(p) for p in sorted(class_dir.iterdir())
                                       if p.is_file() and _is_image_name(p.name)]
        splits[split] = classes
    class_names = _check_classes(splits, root)
    return _decode_splits(splits, class_names, progress, workers, _decode_paths), class_names


def _build_tarball(path, progress, workers):
    # Members are read into memory in archive order (one pass over the gzip stream)
    # and decoded from bytes, so nothing is extracted to disk. Measured on the shared
    # 60,000-JPEG tarball on 2 cores: about 2 s to read, and 2 s more for a separate
    # listing pass, which this single pass avoids.
    log.debug("reading %s", path)
    files = {}
    folders = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                _check_member(member, path)
                name = PurePosixPath(member.name)
                if member.isdir():
                    folders.add(name)
                elif member.isfile() or member.islnk() or member.issym():
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        files[name] = extracted.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot read tar archive {path}: {_one_line(error)}; "
                        f"replace it with a complete .tar or .tar.gz file") from error
    if any(name.name == _BINARY_TEST_FILE for name in files):
        return _build_binary_archive(path, Path(tempfile.gettempdir()))
    for name in list(files):
        folders.update(name.parents)

    def children(folder):
        return sorted(f.name for f in folders if f.parent == folder and f != folder)

    root = _find_split_root(PurePosixPath("."), children, display=path)
    splits = {split: {} for split in _SPLITS}
    for split in _SPLITS:
        for class_name in children(root / split):
            splits[split][class_name] = []
    for name in sorted(files):
        relative = name.relative_to(root) if root != PurePosixPath(".") else name
        parts = relative.parts
        if len(parts) == 3 and parts[0] in splits and parts[1] in splits[parts[0]] and _is_image_name(parts[2]):
            splits[parts[0]][parts[1]].append((f"{path}:{name}", files[name]))
    display = path if root == PurePosixPath(".") else f"{path}:{root}"
    class_names = _check_classes(splits, display)
    return _decode_splits(splits, class_names, progress, workers, _decode_blobs), class_names


def _find_split_root(path, children, display=None):
    """Return the folder that contains train/ and test/: `path` itself or its single subfolder."""
    display = display or path
    candidates = [path]
    subfolders = [name for name in children(path) if not name.startswith(".")]
    if len(subfolders) == 1:
        candidates.append(path / subfolders[0])
    for candidate in candidates:
        if all(split in children(candidate) for split in _SPLITS):
            return candidate
    found = ", ".join(subfolders) or "nothing"
    raise DataError(f"{display} has no train/ and test/ folders (found: {found}); expected "
                    f"train/<class>/* and test/<class>/*, optionally inside one top folder")


def _check_classes(splits, root):
    train_classes, test_classes = list(splits["train"]), list(splits["test"])
    if not train_classes:
        raise DataError(f"{root}/train has no class folders; expected train/<class>/ with images")
    if set(train_classes) != set(test_classes):
        raise DataError(f"test classes differ from train classes in {root}: train has "
                        f"{sorted(train_classes)}, test has {sorted(test_classes)}; "
                        f"use the same class folders in both")
    for split in _SPLITS:
        for class_name, items in splits[split].items():
            if not items:
                raise DataError(f"class folder {root}/{split}/{class_name} has no images; "
                                f"add images or remove the folder from train/ and test/")
    return sorted(train_classes)


def _is_image_name(name):
    return not name.startswith(".") and Path(name).suffix.lower() in _image_extensions()


def _image_extensions():
    return set(Image.registered_extensions())


# ---------------------------------------------------------------- parallel decoding


def _decode_splits(splits, class_names, progress, workers, decode_chunk):
    """Decode every item of both splits; returns (train_images, train_labels, test_images, test_labels)."""
    total = sum(len(items) for classes in splits.values() for items in classes.values())
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bar = Progress(total, "decoding images", unit="images", enabled=progress)

    # spawn, not fork: the caller may be a training process with torch or
    # tensorflow threads running, and forking those can deadlock.
    executor = None
    if workers > 1 and total >= _MIN_PARALLEL:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    arrays = []
    try:
        for split in _SPLITS:
            items, labels = [], []
            for label, class_name in enumerate(class_names):
                items.extend(splits[split][class_name])
                labels.extend([label] * len(splits[split][class_name]))

            chunks = [items[start:start + _CHUNK_SIZE] for start in range(0, len(items), _CHUNK_SIZE)]
            images = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
            if executor is None:
                results = map(decode_chunk, chunks)
            else:
                results = executor.map(decode_chunk, chunks)

            for index, decoded in enumerate(results):
                start = index * _CHUNK_SIZE
                images[start:start + len(decoded)] = decoded
                bar.update(len(decoded))
            arrays += [images, np.asarray(labels, dtype=np.int64)]
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    bar.close()
    return tuple(arrays)


def _decode_paths(paths):
    """Decode a chunk of image files in a worker process."""
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            images[index] = load_image(path)
        except ImageError as error:
            raise DataError(f"{error}; fix or remove this file from the dataset") from None
    return images


def _decode_blobs(blobs):
    """Decode a chunk of (name, bytes) tar members in a worker process."""
    images = np.empty((len(blobs), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
    for index, (name, data) in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                images[index] = load_image(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
                ImageError) as error:
            raise DataError(f"cannot read image {name}: {_one_line(error)}; "
                            f"fix or remove this file from the dataset") from None
    return images


# ---------------------------------------------------------------- helpers


def _check_member(member, archive):
    """Reject a tar member whose path or link target would leave the extraction folder."""
    name = PurePosixPath(member.name)
    problem = None
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        problem = "absolute path"
    elif ".." in name.parts:
        problem = "path with '..'"
    elif member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        resolved = target if member.islnk() else name.parent / target
        if target.is_absolute() or _escapes(resolved):
            problem = f"link to {member.linkname!r} outside the archive"
    elif not (member.isfile() or member.isdir()):
        problem = "device, FIFO or other special file"
    if problem is not None:
        raise DataError(f"unsafe member {member.name!r} in {archive} ({problem}); "
                        f"use an archive whose members stay inside its top folder")


def _escapes(path):
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
        elif part != ".":
            depth += 1
        if depth < 0:
            return True
    return False


def _one_line(error):
    return " ".join(str(error).split())
