"""Opt-outs: flag items removed in the items store; every later query skips them at once."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fastattr_hook.bundle import bundle_files, read_manifest, write_manifest
from fastattr_hook.items import ItemStore


def remove_items(bundle_dir: str | Path, *, ids: Iterable[str] = (), creator: str | None = None,
                 license: str | None = None, reason: str = "opt-out") -> int:
    """Flag matching items removed and refresh the bundle's checksums; returns the count."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    with ItemStore(bundle_dir / "items.sqlite", readonly=False) as store:
        count = store.remove(ids=ids, creator=creator, license=license, reason=reason)
    manifest.files = bundle_files(bundle_dir)
    write_manifest(bundle_dir, manifest)
    return count
