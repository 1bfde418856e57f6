import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CIFAR = ROOT / "tests" / "data" / "cifar10-tiny"  # 30 train + 10 test JPEGs per class, from the JPEG copy
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A private copy of the shipped tiny CIFAR-10 tree, so decode caches never land in the repo."""
    dst = tmp_path_factory.mktemp("data") / "cifar10-tiny"
    shutil.copytree(TINY_CIFAR, dst, ignore=shutil.ignore_patterns(".decoded-*"))
    return dst
