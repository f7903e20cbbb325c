"""Shared fixtures: one micro sandbox per test session (built by our own code, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def micro_sandbox(tmp_path_factory, request) -> Path:
    import shutil

    from fastattr_sandbox import build

    # FASTATTR_TEST_SANDBOX reuses a micro sandbox across runs (building one is a no-op when complete);
    # otherwise the suite works on a copy of the one that ships (fastattr_sandbox/artifacts/micro, made
    # by `fastattr sandbox build --scale micro`), so tests never change it and never wait for a build.
    root = Path(os.environ.get("FASTATTR_TEST_SANDBOX") or tmp_path_factory.mktemp("sandbox") / "micro")
    shipped = build.DEFAULT_SANDBOX.parent / "micro"
    if not os.environ.get("FASTATTR_TEST_SANDBOX") and (shipped / "sandbox.yaml").is_file():
        shutil.copytree(shipped, root, ignore=shutil.ignore_patterns("work"))
    if not build.read_state(root).get("files"):
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # say why the first tests pause: the fixture trains small models
            reporter.write_line(f"\nbuilding the micro sandbox in {root} (a few minutes on 2 cores; "
                                f"FASTATTR_TEST_SANDBOX=DIR keeps one between runs)")
    build.build(root, scale="micro")
    return root


@pytest.fixture(scope="session")
def micro_pipeline(micro_sandbox):
    from fastattr_sandbox import build

    return build.load_pipeline(micro_sandbox)
