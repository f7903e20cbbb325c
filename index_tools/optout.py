"""Opt-outs: flag items removed in the items store; every later query skips them at once."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fastattr_hook.files import atomic_dir, link_tree
from fastattr_hook.bundle import Bundle


def remove_items(bundle_dir: str | Path, *, ids: Iterable[str] = (), creator: str | None = None,
                 license: str | None = None, reason: str = "opt-out") -> int:
    """Flag matching items removed and refresh the bundle's checksums; returns the count."""
    bundle = Bundle.open(bundle_dir)
    with atomic_dir(bundle.path) as tmp:  # the bundle changes in one step: a killed remove changes nothing
        link_tree(bundle.path, tmp, copy=(Bundle.ITEMS,))
        staged = Bundle(tmp, bundle.manifest)
        with staged.items(writable=True) as store:
            count = store.remove(ids=ids, creator=creator, license=license, reason=reason)
        staged.finish()
    return count
