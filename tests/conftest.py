"""Shared test set-up: offline Hugging Face, a temporary HF_HOME and model cache (removed at the end), and the paths
of the real fixture data."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SESSION_FOLDERS = []  # made here (not the caller's), removed at the end
for name, prefix in (("HF_HOME", "minirec-hf-"), ("MINIREC_CACHE", "minirec-models-")):  # MINIREC_CACHE: models
    if name not in os.environ:
        os.environ[name] = tempfile.mkdtemp(prefix=prefix)
        SESSION_FOLDERS.append(os.environ[name])

PROJECT_ROOT = Path(__file__).resolve().parents[1]
AMAZON_DIR = PROJECT_ROOT.parent / "shared" / "data" / "amazon2023"
BENCHMARKS = PROJECT_ROOT / "benchmarks"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this session's model and HF folders (hundreds of MB; the disk of a shared CI machine is finite)."""
    for folder in SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def import_benchmark():
    """`import_benchmark(name)` imports a benchmark script as a module; benchmarks/ stays on sys.path for the session
    (the scripts import each other by name, and fork-server workers import them again)."""
    sys.path.insert(0, str(BENCHMARKS))
    yield importlib.import_module
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """Folder of the real Amazon Reviews 2023 fixture files (read in place, never copied)."""
    if not AMAZON_DIR.is_dir():
        pytest.fail(f"fixture data folder missing: {AMAZON_DIR}")
    return AMAZON_DIR
