"""The items store: SQLite table mapping each integer vector key to its training item.

Opt-outs are a flag here (``removed``), so they take effect for every query at once, without
rebuilding the vector index; `fastattr index compact` later deletes the rows (``delete_removed``)
and drops the vectors.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

from .errors import FastattrError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    caption TEXT NOT NULL,
    creator TEXT,
    license TEXT,
    source_url TEXT,
    sha256 TEXT,
    image TEXT,
    thumbnail BLOB,
    removed INTEGER NOT NULL DEFAULT 0,
    removed_reason TEXT
);
CREATE INDEX IF NOT EXISTS items_creator ON items(creator);
CREATE INDEX IF NOT EXISTS items_license ON items(license);
"""


@dataclass(frozen=True, slots=True)
class Item:
    """A training item's descriptive fields: the one record of them. The store keeps one per vector
    (its columns follow these fields), a credit names one, and the manifest reader's ``ManifestRow``
    extends it with where the row came from."""

    id: str
    caption: str
    creator: str | None = None
    license: str | None = None
    source_url: str | None = None
    sha256: str | None = None  # hex digest of the image file's bytes
    image: str | None = None  # an ``index_tools.manifest.ImageRef`` as text; relative to the bundle once stored
    key: int | None = None  # the vector's key in the bundle; None until the store assigns one


FIELDS = tuple(f.name for f in fields(Item))  # the store's columns for an Item, in its order


class ItemStore:
    """Thread-safe access to ``items.sqlite`` (one connection, one lock: lookups are tiny)."""

    def __init__(self, path: str | Path, readonly: bool = True):
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise FastattrError(f"{self.path}: items store missing; rebuild the bundle with `fastattr index build`")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        if not readonly:
            with self._locked() as conn:
                conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; a damaged file is named, not left to sqlite's bare
        "database disk image is malformed" (which names nothing)."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.IntegrityError:  # our own mistake, not the file's
                raise
            except sqlite3.DatabaseError as exc:
                raise FastattrError(f"{self.path}: damaged items store ({exc}); run `fastattr index verify` on its "
                                    "bundle, then restore or rebuild the bundle") from None

    def __enter__(self) -> "ItemStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def insert(self, items: Iterable[tuple[Item, bytes | None]]) -> None:
        """Store (item, thumbnail PNG) pairs; each item carries the key of its vector."""
        columns = (*FIELDS, "thumbnail")
        with self._locked(), self._conn:
            self._conn.executemany(
                f"INSERT INTO items ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                ([*(getattr(item, name) for name in FIELDS), thumbnail] for item, thumbnail in items))

    def get(self, keys: Iterable[int]) -> dict[int, Item]:
        keys = [int(k) for k in keys]
        if not keys:
            return {}
        with self._locked():
            cursor = self._conn.execute(
                f"SELECT {', '.join(FIELDS)} FROM items WHERE key IN ({','.join('?' * len(keys))})", keys)
            items = [Item(*row) for row in cursor]
        return {item.key: item for item in items}

    def thumbnail(self, key: int) -> bytes | None:
        with self._locked():
            row = self._conn.execute("SELECT thumbnail FROM items WHERE key = ?", (int(key),)).fetchone()
        return row[0] if row else None

    def removed_keys(self) -> set[int]:
        with self._locked():
            return {r[0] for r in self._conn.execute("SELECT key FROM items WHERE removed = 1")}

    def count(self, include_removed: bool = True) -> int:
        where = "" if include_removed else " WHERE removed = 0"
        with self._locked():
            return self._conn.execute(f"SELECT COUNT(*) FROM items{where}").fetchone()[0]

    def max_key(self) -> int:
        with self._locked():
            value = self._conn.execute("SELECT MAX(key) FROM items").fetchone()[0]
        return -1 if value is None else value

    def ids(self) -> Iterator[str]:
        with self._locked():
            rows = self._conn.execute("SELECT id FROM items").fetchall()
        return (r[0] for r in rows)

    def remove(self, *, ids: Iterable[str] = (), creator: str | None = None, license: str | None = None,
               reason: str = "opt-out") -> int:
        """Flag items as removed; returns how many were newly removed."""
        clauses, params = [], []
        ids = list(ids)
        if ids:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            params += ids
        if creator is not None:
            clauses.append("creator = ?")
            params.append(creator)
        if license is not None:
            clauses.append("license = ?")
            params.append(license)
        if not clauses:
            raise FastattrError("nothing to remove: give ids, a creator or a license")
        with self._locked(), self._conn:
            cursor = self._conn.execute(
                f"UPDATE items SET removed = 1, removed_reason = ? WHERE removed = 0 AND ({' OR '.join(clauses)})",
                [reason, *params])
            return cursor.rowcount

    def delete_removed(self) -> int:
        """Delete the removed items' rows (captions, thumbnails, ...) and VACUUM, so that their bytes
        leave the file rather than linger in free pages; returns how many were deleted."""
        with self._locked():
            with self._conn:
                count = self._conn.execute("DELETE FROM items WHERE removed = 1").rowcount
            self._conn.execute("VACUUM")
        return count

    def sample_keys(self, count: int, seed: int = 0) -> list[int]:
        import random

        with self._locked():
            keys = [r[0] for r in self._conn.execute("SELECT key FROM items WHERE removed = 0 ORDER BY key")]
        return sorted(random.Random(seed).sample(keys, min(count, len(keys))))
