"""The data stage on real files: the canonical archive through a loopback HTTP server,
image folders and tarballs, the cache, every bad input through the CLI, and the shared set."""

import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.data
from pipeline.data import CIFAR10_ARCHIVE, CIFAR10_MD5, URL_ENV, DataError, load_dataset
from serving.contract import CIFAR10_CLASSES

BINARY_CLASSES = ("plane", "car", "bird")
RECORDS_PER_BATCH = 4


# ---------------------------------------------------------------- builders


def build_binary_archive(folder, extra_members=()):
    """Write a tiny archive in the CIFAR-10 binary layout; returns (path, md5, expected arrays)."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, len(BINARY_CLASSES), RECORDS_PER_BATCH, dtype=np.uint8)
        images = rng.integers(0, 256, (RECORDS_PER_BATCH, 32, 32, 3), dtype=np.uint8)
        # Each record: label byte, then the R, G and B planes (CHW).
        planar = images.transpose(0, 3, 1, 2).reshape(RECORDS_PER_BATCH, -1)
        batches[name] = (images, labels, np.hstack([labels[:, None], planar]).tobytes())
    meta = ("\n".join(BINARY_CLASSES) + "\n\n").encode()

    path = folder / CIFAR10_ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        for name, (_, _, payload) in batches.items():
            add_bytes(tar, f"cifar-10-batches-bin/{name}", payload)
        add_bytes(tar, "cifar-10-batches-bin/batches.meta.txt", meta)
        for name, payload in extra_members:
            add_bytes(tar, name, payload)

    train = [batches[f"data_batch_{i}.bin"] for i in range(1, 6)]
    expected = {
        "train_images": np.concatenate([b[0] for b in train]),
        "train_labels": np.concatenate([b[1] for b in train]).astype(np.int64),
        "test_images": batches["test_batch.bin"][0],
        "test_labels": batches["test_batch.bin"][1].astype(np.int64),
    }
    return path, hashlib.md5(path.read_bytes()).hexdigest(), expected


def add_bytes(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def build_image_folder(root, classes=("cat", "dog"), per_class=(3, 2), seed=0):
    """Write train/<class>/*.png and test/<class>/*.png of random 32x32 pixels."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for class_name in classes:
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for index in range(count):
                write_png(folder / f"{index:03d}.png", rng)
    return root


def write_png(path, rng):
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def tar_folder(folder, path, arcname):
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        tar.add(folder, arcname=arcname)
    return path


def cache_files(out):
    folder = Path(out) / "data" / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- loopback HTTP


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    """Serve a folder on 127.0.0.1 at a free port; returns a function mapping a file name to its URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield root, lambda name: f"http://127.0.0.1:{port}/{name}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Keep requests from sending loopback traffic to a proxy named in the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{CIFAR10_ARCHIVE}"


def run_cli(*arguments, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "data", *arguments],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=120)


# ---------------------------------------------------------------- canonical archive


def test_cifar10_download_parses_binary_batches(tmp_path, serve):
    www, url_of = serve
    archive, md5, expected = build_binary_archive(www)
    out = tmp_path / "out"

    dataset = load_dataset("cifar10", out, url=url_of(archive.name), md5=md5, progress=False, retries=0)

    assert dataset.class_names == BINARY_CLASSES
    for name, array in expected.items():
        np.testing.assert_array_equal(getattr(dataset, name), array, err_msg=name)
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int64
    assert dataset.train_images.shape == (5 * RECORDS_PER_BATCH, 32, 32, 3)
    assert not dataset.cache_reused
    assert dataset.cache_path == out / "data" / "cache" / "cifar10.npz"
    # Only the verified archive stays in downloads: no temporary file, no extracted folder.
    assert sorted(p.name for p in (out / "data" / "downloads").iterdir()) == [CIFAR10_ARCHIVE]


def test_cifar10_cache_reused_without_network(tmp_path, serve):
    www, url_of = serve
    archive, md5, _ = build_binary_archive(www)
    out = tmp_path / "out"
    first = load_dataset("cifar10", out, url=url_of(archive.name), md5=md5, progress=False, retries=0)
    mtime = first.cache_path.stat().st_mtime_ns

    second = load_dataset("cifar10", out, url=closed_port_url(), md5=md5, progress=False, retries=0)

    assert second.cache_reused
    assert second.fingerprint == first.fingerprint
    assert second.cache_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.test_images, first.test_images)


def test_cifar10_md5_mismatch(tmp_path, serve):
    www, url_of = serve
    archive, md5, _ = build_binary_archive(www)
    out = tmp_path / "out"
    wrong = "0" * 32

    with pytest.raises(DataError) as raised:
        load_dataset("cifar10", out, url=url_of(archive.name), md5=wrong, progress=False, retries=0)

    message = str(raised.value)
    assert CIFAR10_ARCHIVE in message
    assert wrong in message
    assert md5 in message
    assert "--data" in message
    assert list((out / "data" / "downloads").iterdir()) == []
    assert cache_files(out) == []


def test_cifar10_member_with_dotdot_rejected(tmp_path, serve):
    www, url_of = serve
    archive, md5, _ = build_binary_archive(www, extra_members=[("../escaped.txt", b"outside")])
    out = tmp_path / "out"

    with pytest.raises(DataError) as raised:
        load_dataset("cifar10", out, url=url_of(archive.name), md5=md5, progress=False, retries=0)

    assert "'../escaped.txt'" in str(raised.value)
    assert not (out / "data" / "escaped.txt").exists()
    assert not (out / "data" / "downloads" / "escaped.txt").exists()
    assert cache_files(out) == []
    assert [p.name for p in (out / "data" / "downloads").iterdir()] == [CIFAR10_ARCHIVE]


@pytest.mark.parametrize("name, linkname", [("cifar-10-batches-bin/link", "../../../etc/passwd"),
                                            ("cifar-10-batches-bin/abs", "/etc/passwd")])
def test_cifar10_link_outside_rejected(tmp_path, name, linkname):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = linkname
        tar.addfile(info)

    with pytest.raises(DataError) as raised:
        pipeline.data.extract_tarball(archive, tmp_path / "target")

    assert repr(name) in str(raised.value)
    assert not (tmp_path / "target" / "cifar-10-batches-bin").exists()


def test_cifar10_unreachable_url(tmp_path):
    url = closed_port_url()

    with pytest.raises(DataError) as raised:
        load_dataset("cifar10", tmp_path / "out", url=url, progress=False, retries=0)

    message = str(raised.value)
    assert url in message
    assert "DATA=" in message
    assert cache_files(tmp_path / "out") == []


def test_local_binary_archive(tmp_path):
    archive, _, expected = build_binary_archive(tmp_path)

    dataset = load_dataset(str(archive), tmp_path / "out", progress=False)

    assert dataset.class_names == BINARY_CLASSES
    np.testing.assert_array_equal(dataset.train_labels, expected["train_labels"])
    np.testing.assert_array_equal(dataset.test_images, expected["test_images"])


# ---------------------------------------------------------------- folder and tarball sources


def test_folder_source_pixels_and_labels(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    pixels = {}
    for split in ("train", "test"):
        for class_name in ("zebra", "ant"):
            (root / split / class_name).mkdir(parents=True)
            for index in range(2):
                pixels[split, class_name, index] = write_png(root / split / class_name / f"{index}.png", rng)
    (root / "train" / "ant" / "notes.txt").write_text("not an image, skipped")

    dataset = load_dataset(str(root), tmp_path / "out", progress=False)

    assert dataset.class_names == ("ant", "zebra")
    np.testing.assert_array_equal(dataset.train_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(dataset.test_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(dataset.train_images[0], pixels["train", "ant", 0])
    np.testing.assert_array_equal(dataset.train_images[3], pixels["train", "zebra", 1])
    np.testing.assert_array_equal(dataset.test_images[2], pixels["test", "zebra", 0])
    assert dataset.source == str(root)
    assert len(dataset.fingerprint) == 64


def test_resized_images_become_32x32(tmp_path):
    root = build_image_folder(tmp_path / "images")
    Image.new("L", (100, 60), 128).save(root / "train" / "cat" / "large.jpg")

    dataset = load_dataset(str(root), tmp_path / "out", progress=False)

    assert dataset.train_images.shape == (7, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_tarball_matches_folder(tmp_path, suffix):
    root = build_image_folder(tmp_path / "images")
    archive = tar_folder(root, tmp_path / f"images{suffix}", arcname="top")

    from_folder = load_dataset(str(root), tmp_path / "out", progress=False)
    from_tarball = load_dataset(str(archive), tmp_path / "out", progress=False)

    assert from_tarball.fingerprint == from_folder.fingerprint
    assert from_tarball.class_names == ("cat", "dog")
    np.testing.assert_array_equal(from_tarball.train_images, from_folder.train_images)
    np.testing.assert_array_equal(from_tarball.test_labels, from_folder.test_labels)
    assert from_tarball.cache_path != from_folder.cache_path


def test_worker_pool_matches_in_process(tmp_path, monkeypatch):
    root = build_image_folder(tmp_path / "images", per_class=(5, 3))
    serial = load_dataset(str(root), tmp_path / "serial", progress=False, workers=1)
    monkeypatch.setattr(pipeline.data, "_MIN_PARALLEL", 0)
    monkeypatch.setattr(pipeline.data, "_CHUNK_SIZE", 3)

    parallel = load_dataset(str(root), tmp_path / "parallel", progress=False, workers=2)

    assert parallel.fingerprint == serial.fingerprint


def test_worker_pool_names_unreadable_image(tmp_path, monkeypatch):
    root = build_image_folder(tmp_path / "images", per_class=(5, 3))
    broken = root / "train" / "dog" / "002.png"
    broken.write_bytes(b"not a png")
    monkeypatch.setattr(pipeline.data, "_MIN_PARALLEL", 0)
    monkeypatch.setattr(pipeline.data, "_CHUNK_SIZE", 3)

    with pytest.raises(DataError) as raised:
        load_dataset(str(root), tmp_path / "out", progress=False, workers=2)

    assert str(broken) in str(raised.value)
    assert cache_files(tmp_path / "out") == []


# ---------------------------------------------------------------- cache


def test_cache_reused_unchanged_folder(tmp_path):
    root = build_image_folder(tmp_path / "images")
    first = load_dataset(str(root), tmp_path / "out", progress=False)
    mtime = first.cache_path.stat().st_mtime_ns

    second = load_dataset(str(root), tmp_path / "out", progress=False)

    assert not first.cache_reused
    assert second.cache_reused
    assert second.cache_path == first.cache_path
    assert second.cache_path.stat().st_mtime_ns == mtime
    assert second.fingerprint == first.fingerprint
    assert cache_files(tmp_path / "out") == [first.cache_path.name]


def test_cache_rebuilt_after_added_file(tmp_path):
    root = build_image_folder(tmp_path / "images")
    first = load_dataset(str(root), tmp_path / "out", progress=False)
    write_png(root / "train" / "dog" / "new.png", np.random.default_rng(9))

    second = load_dataset(str(root), tmp_path / "out", progress=False)

    assert not second.cache_reused
    assert len(second.train_labels) == len(first.train_labels) + 1
    assert second.fingerprint != first.fingerprint
    assert cache_files(tmp_path / "out") == [first.cache_path.name]


def test_cache_rebuilt_after_changed_file(tmp_path):
    root = build_image_folder(tmp_path / "images")
    first = load_dataset(str(root), tmp_path / "out", progress=False)
    write_png(root / "test" / "cat" / "000.png", np.random.default_rng(42))

    second = load_dataset(str(root), tmp_path / "out", progress=False)

    assert not second.cache_reused
    assert second.fingerprint != first.fingerprint
    assert len(second.test_labels) == len(first.test_labels)


def test_cache_rebuilt_after_rewritten_tarball(tmp_path):
    root = build_image_folder(tmp_path / "images")
    archive = tar_folder(root, tmp_path / "images.tar.gz", arcname="top")
    first = load_dataset(str(archive), tmp_path / "out", progress=False)
    write_png(root / "train" / "cat" / "extra.png", np.random.default_rng(5))
    tar_folder(root, archive, arcname="top")

    second = load_dataset(str(archive), tmp_path / "out", progress=False)

    assert not second.cache_reused
    assert second.fingerprint != first.fingerprint


# ---------------------------------------------------------------- CLI


def test_cli_prints_counts_and_reuse(tmp_path):
    root = build_image_folder(tmp_path / "images")
    out = tmp_path / "out"

    first = run_cli("--data", str(root), "--out", str(out))
    second = run_cli("--data", str(root), "--out", str(out))

    assert first.returncode == 0, first.stderr
    assert str(root) in first.stdout
    assert "6 train, 4 test" in first.stdout
    assert "built" in first.stdout
    assert "cat, dog" in first.stdout
    dataset = load_dataset(str(root), out, progress=False)
    assert f"sha256:{dataset.fingerprint}" in first.stdout
    assert str(dataset.cache_path) in first.stdout
    assert second.returncode == 0, second.stderr
    assert "reused" in second.stdout
    rows = [line.split() for line in second.stdout.splitlines()]
    assert ["cat", "3", "2"] in rows
    assert ["dog", "3", "2"] in rows


def make_no_splits(tmp_path):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    return tmp_path / "flat", tmp_path / "flat"


def make_empty_class(tmp_path):
    root = build_image_folder(tmp_path / "images")
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    return root, root / "train" / "dog"


def make_class_mismatch(tmp_path):
    root = build_image_folder(tmp_path / "images")
    (root / "test" / "dog").rename(root / "test" / "wolf")
    return root, root


def make_unreadable_image(tmp_path):
    root = build_image_folder(tmp_path / "images")
    broken = root / "test" / "cat" / "001.png"
    broken.write_bytes(b"\x89PNG truncated")
    return root, broken


def make_unreadable_tar_member(tmp_path):
    root = build_image_folder(tmp_path / "images")
    (root / "train" / "dog" / "002.png").write_bytes(b"garbage")
    archive = tar_folder(root, tmp_path / "images.tar.gz", arcname="top")
    return archive, "top/train/dog/002.png"


def make_dotdot_tar_member(tmp_path):
    archive = tar_folder(build_image_folder(tmp_path / "images"), tmp_path / "images.tar", arcname="top")
    with tarfile.open(archive, "a") as tar:
        add_bytes(tar, "../outside.png", b"x")
    return archive, "../outside.png"


def make_missing(tmp_path):
    return tmp_path / "does-not-exist", tmp_path / "does-not-exist"


BAD_SOURCES = {
    "missing path": (make_missing, "not found"),
    "no train or test": (make_no_splits, "no train/ and test/"),
    "class without images": (make_empty_class, "has no images"),
    "test classes differ": (make_class_mismatch, "['cat', 'wolf']"),
    "unreadable image": (make_unreadable_image, "cannot read image"),
    "unreadable tar member": (make_unreadable_tar_member, "cannot read image"),
    "tar member with dotdot": (make_dotdot_tar_member, "unsafe member"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_cli_rejects_bad_source(tmp_path, case):
    make, expected_text = BAD_SOURCES[case]
    source, named = make(tmp_path)
    out = tmp_path / "out"

    result = run_cli("--data", str(source), "--out", str(out))

    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(named) in lines[0]
    assert expected_text in lines[0]
    assert cache_files(out) == []


@pytest.mark.parametrize("case", ["md5 mismatch", "unreachable"])
def test_cli_rejects_bad_download(tmp_path, serve, case):
    www, url_of = serve
    archive, md5, _ = build_binary_archive(www)
    url = url_of(archive.name) if case == "md5 mismatch" else closed_port_url()
    out = tmp_path / "out"

    result = run_cli("--out", str(out), env={URL_ENV: url})

    assert result.returncode == 1, result.stdout
    # Download progress lines may come first; the error is one line and the last.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], result.stderr
    if case == "md5 mismatch":
        assert CIFAR10_ARCHIVE in errors[0]
        assert CIFAR10_MD5 in errors[0]
        assert md5 in errors[0]
    else:
        assert url in errors[0]
        assert "DATA=" in errors[0]
    assert cache_files(out) == []


# ---------------------------------------------------------------- the shared JPEG set


@pytest.mark.slow
def test_shared_tarball_counts_and_classes(shared_tarball, cifar_cache_dir):
    started = time.monotonic()
    dataset = load_dataset(str(shared_tarball), cifar_cache_dir, progress=False)
    reuse_seconds = time.monotonic() - started

    assert dataset.cache_reused
    assert reuse_seconds < 5, reuse_seconds  # measured 0.6 s on 2 cores; a decode takes about 8 s
    assert dataset.class_names == CIFAR10_CLASSES
    assert dataset.train_images.shape == (50_000, 32, 32, 3)
    assert dataset.test_images.shape == (10_000, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8
    assert np.bincount(dataset.train_labels).tolist() == [5_000] * 10
    assert np.bincount(dataset.test_labels).tolist() == [1_000] * 10
