"""``Attributor``: one encoder forward pass plus one nearest-neighbour search per image."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .attribution import Attribution, Credit, softmax_shares
from .bundle import Bundle, BundleManifest
from .encoder import Encoder
from .errors import FastattrError
from .inputs import check_text
from .items import ItemStore


class Attributor:
    """Answers "which training images made this image?" from an index bundle.

    Thread-safe: the encoder runs in inference mode, the index is read-only and item lookups
    are serialised, so one instance can serve concurrent callers.
    """

    def __init__(self, bundle_dir: Path, manifest: BundleManifest, encoder: Encoder, index, store: ItemStore):
        self.bundle_dir, self.manifest, self.encoder, self.index, self.store = bundle_dir, manifest, encoder, index, store
        self._removed = np.array(sorted(store.removed_keys()), dtype=np.int64)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | None = None,
                    encoder: str | Path | Encoder | None = None) -> "Attributor":
        """Open a bundle for serving (index memory-mapped where the backend allows).

        ``encoder`` overrides the bundle's ``encoder.yaml`` (e.g. weights moved elsewhere); its
        fingerprint must still match the one the bundle was built with.
        """
        bundle = Bundle.open(path)
        index, store = bundle.serve()
        manifest = bundle.manifest
        if not isinstance(encoder, Encoder):
            encoder = Encoder.from_yaml(encoder, device=device) if encoder else bundle.encoder(device)
        if encoder.fingerprint != manifest.encoder.fingerprint:
            raise FastattrError(
                f"{path}: refusing to serve with encoder '{encoder.spec.name}' ({encoder.fingerprint[:19]}...): "
                f"the bundle was built with '{manifest.encoder.name}' ({manifest.encoder.fingerprint[:19]}...). "
                "Use the encoder the bundle was built with, or rebuild the bundle with this encoder.")
        return cls(bundle.path, manifest, encoder, index, store)

    def refresh(self) -> None:
        """Follow what other processes changed: opt-outs (``fastattr index remove``) and a bundle
        replaced by ``fastattr index add`` (its new index and items store are opened)."""
        bundle = Bundle.open(self.bundle_dir)
        if bundle.manifest.seal != self.manifest.seal or bundle.manifest.files != self.manifest.files:
            if bundle.manifest.encoder.fingerprint != self.encoder.fingerprint:
                raise FastattrError(f"{self.bundle_dir}: now built with encoder '{bundle.manifest.encoder.name}'; "
                                    f"open it again with Attributor.from_bundle")
            index, store = bundle.serve()
            # Readers in other threads keep the objects they hold; the old ones close when released.
            self.index, self.store, self.manifest = index, store, bundle.manifest
        self._removed = np.array(sorted(self.store.removed_keys()), dtype=np.int64)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (keys, scores) per query vector, never returning removed items."""
        return self.index.search(vectors, k, exclude=self._removed)

    def attribute(self, images: Sequence, prompts: str | Sequence[str], k: int = 10) -> list[Attribution]:
        """Attribute a batch: PIL images, HxWxC uint8/float arrays or tensors, one prompt each (or one for all)."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise FastattrError(f"got {len(images)} images but {len(prompts)} prompts")
        if k < 1:
            raise FastattrError(f"k must be >= 1, got {k}")
        for i, prompt in enumerate(prompts):  # what a tokenizer would choke on, named (the manifest's rule)
            check_text(prompt, f"prompts[{i}]", "the prompt")
        start = time.perf_counter()
        vectors = self.encoder.embed(list(images), list(prompts), role="query")
        encoded = time.perf_counter()
        keys, scores = self.search(vectors, k)
        searched = time.perf_counter()
        items = self.store.get(int(x) for x in np.unique(keys) if x >= 0)
        rule = self.manifest.share_rule
        credit_lists = []
        for row_keys, row_scores in zip(keys, scores):
            valid = [(int(key), float(score)) for key, score in zip(row_keys, row_scores) if key >= 0]
            shares = softmax_shares([s for _, s in valid], rule.temperature)
            credit_lists.append([
                Credit(rank=rank, key=key, id=items[key].id, score=round(score, 6), share=round(share, 6),
                       caption=items[key].caption, creator=items[key].creator, license=items[key].license,
                       source_url=items[key].source_url)
                for rank, ((key, score), share) in enumerate(zip(valid, shares), start=1)])
        n = max(1, len(images))  # total: everything but building the result objects below
        timing = {"encode": round(1e3 * (encoded - start) / n, 3), "search": round(1e3 * (searched - encoded) / n, 3),
                  "total": round(1e3 * (time.perf_counter() - start) / n, 3), "batch_size": len(images)}
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        encoder = {"name": self.encoder.spec.name, "fingerprint": self.encoder.fingerprint,
                   "tuned": self.encoder.head is not None}
        bundle = {"name": self.manifest.name, "fingerprint": self.manifest.fingerprint, "items": self.manifest.items}
        share_rule = {"name": rule.name, "temperature": rule.temperature}
        results = [Attribution(prompt=prompt, credits=credits, encoder=dict(encoder), bundle=dict(bundle),
                               share_rule=dict(share_rule), timing_ms=dict(timing), created=created)
                   for prompt, credits in zip(prompts, credit_lists)]
        return results
