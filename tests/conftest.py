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


def run_cli(*arguments, env=None, cwd=None):
    """Run `cifar-onnx ARGUMENTS` as a real subprocess; return the CompletedProcess (text)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pipeline.cli", *[str(a) for a in arguments]]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


# The briefly trained runs the export and verify tests share: --limit images, one epoch.
TRAINED_LIMIT = 256
TRAINED_EPOCHS = 1


@pytest.fixture(scope="session")
def trained_out(shared_tarball, cifar_cache_dir, tmp_path_factory):
    """Return a function (framework, architecture) -> out folder with a briefly trained checkpoint.

    Each pair trains once per session; both frameworks of one architecture share an out
    folder, which links to the shared dataset cache. Training runs in a subprocess, so
    neither framework enters the pytest process.
    """
    folders, runs = {}, {}

    def trained(framework, architecture="cnn-3block"):
        if architecture not in folders:
            folders[architecture] = tmp_path_factory.mktemp(f"trained-{architecture}")
            (folders[architecture] / "data").symlink_to(cifar_cache_dir / "data", target_is_directory=True)
        out = folders[architecture]
        if (framework, architecture) not in runs:
            result = run_cli("train", "--framework", framework, "--arch", architecture, "--data", shared_tarball,
                             "--out", out, "--limit", TRAINED_LIMIT, "--epochs", TRAINED_EPOCHS)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[framework, architecture] = out
        return runs[framework, architecture]

    return trained
