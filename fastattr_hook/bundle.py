"""Index bundles: a directory holding everything needed to answer attribution queries.

    bundle.yaml     schema version, encoder fingerprint, backend + params, metric, dim, counts,
                    share-rule calibration, tool version, sha256 of every other file
    encoder.yaml    the encoder spec (paths relative to the bundle where possible)
    index/          the vector index file(s) of the backend
    items.sqlite    key -> id, caption, creator, license, source_url, sha256, thumbnail, removed flag
    rejects.jsonl   manifest rows the build skipped, with the reason
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._io import sha256_file
from .config import from_dict, save_yaml
from .errors import FastattrError

SCHEMA = "fastattr/bundle@1"


@dataclass
class EncoderInfo:
    name: str
    fingerprint: str
    dim: int
    tuned: bool = False


@dataclass
class ManifestInfo:
    path: str  # relative to the bundle folder
    fingerprint: str
    accepted: int
    rejected: int


@dataclass
class ShareRule:
    name: str = "softmax"
    temperature: float = 0.05
    calibration: str = ""


@dataclass
class BundleManifest:
    schema: str
    name: str
    created: str
    tool_version: str
    encoder: EncoderInfo
    backend: str
    backend_params: dict
    metric: str
    dim: int
    dtype: str
    items: int
    manifest: ManifestInfo
    share_rule: ShareRule = field(default_factory=ShareRule)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's content: the checksum of its vector index and items."""
        import hashlib

        digest = hashlib.sha256()
        for rel in sorted(self.files):
            digest.update(f"{rel}={self.files[rel]}".encode())
        return "sha256:" + digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / "bundle.yaml"
    if not path.is_file():
        raise FastattrError(f"{path}: not found; {bundle_dir} is not an index bundle "
                            "(build one with `fastattr index build`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FastattrError(f"{path}: corrupted ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise FastattrError(f"{path}: schema {data.get('schema') if isinstance(data, dict) else None!r} "
                            f"is not {SCHEMA}; rebuild the bundle with this version of fastattr")
    return from_dict(BundleManifest, data, source=str(path))


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    save_yaml(manifest, Path(bundle_dir) / "bundle.yaml")


def bundle_files(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in the bundle except bundle.yaml itself."""
    root = Path(bundle_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "bundle.yaml"
            and not p.name.startswith(".")}
