"""Shared fixtures: one micro sandbox per test session (built by our own code, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def micro_sandbox(tmp_path_factory) -> Path:
    from fastattr_sandbox import build

    # FASTATTR_TEST_SANDBOX reuses a micro sandbox across runs (building one is a no-op when complete).
    root = Path(os.environ.get("FASTATTR_TEST_SANDBOX") or tmp_path_factory.mktemp("sandbox") / "micro")
    build.build(root, scale="micro")
    return root


@pytest.fixture(scope="session")
def micro_pipeline(micro_sandbox):
    from fastattr_sandbox import build

    return build.load_pipeline(micro_sandbox)
