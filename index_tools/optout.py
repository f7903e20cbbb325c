"""Opt-outs: flag items removed in the items store; every later query skips them at once."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fastattr_hook.bundle import Bundle


def remove_items(bundle_dir: str | Path, *, ids: Iterable[str] = (), creator: str | None = None,
                 license: str | None = None, reason: str = "opt-out") -> int:
    """Flag matching items removed and refresh the bundle's checksums; returns the count."""
    with Bundle.change(bundle_dir) as staged:  # one step, after any other writer: a killed remove changes nothing
        with staged.items(writable=True) as store:
            count = store.remove(ids=ids, creator=creator, license=license, reason=reason)
    return count
