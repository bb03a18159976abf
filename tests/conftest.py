"""Shared fixtures: the shared CIFAR-10 JPEG tarball and one decoded cache of it per session."""

from pathlib import Path

import pytest

# CI runs a fresh clone with the shared folder beside it, so the path is relative to the repository.
SHARED_TARBALL = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def shared_tarball():
    """Path of the shared CIFAR-10 JPEG tarball; skips the test when it is missing."""
    if not SHARED_TARBALL.is_file():
        pytest.skip(f"shared CIFAR-10 JPEG tarball not found at {SHARED_TARBALL}")
    return SHARED_TARBALL


@pytest.fixture(scope="session")
def cifar_cache_dir(shared_tarball, tmp_path_factory):
    """Out folder containing the decoded shared dataset, built once per session.

    Pass it as `out` with the shared tarball as source: `load_dataset` then reuses the cache.
    """
    from pipeline.data import load_dataset

    out = tmp_path_factory.mktemp("cifar-cache")
    load_dataset(str(shared_tarball), out, progress=False)
    return out
