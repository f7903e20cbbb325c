"""The result type: an ``Attribution`` and its versioned JSON schema ``fastattr/attribution@1``.

This is what every carrier (PNG/JPEG/WebP metadata, sidecar, C2PA, the CLI, the ComfyUI nodes)
writes and reads, so it lives apart from the machinery that computes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .errors import FastattrError

SCHEMA = "fastattr/attribution@1"


@dataclass
class Credit:
    """One training item credited for an image. ``score``: higher = more influential."""

    rank: int
    key: int
    id: str
    score: float
    share: float
    caption: str = ""
    creator: str | None = None
    license: str | None = None
    source_url: str | None = None


@dataclass
class CreatorCredit:
    creator: str
    share: float
    count: int


@dataclass
class Attribution:
    prompt: str
    credits: list[Credit]
    encoder: dict = field(default_factory=dict)   # {"name", "fingerprint"}
    bundle: dict = field(default_factory=dict)    # {"name", "fingerprint", "items"}
    share_rule: dict = field(default_factory=dict)  # {"name": "softmax", "temperature": T}
    timing_ms: dict = field(default_factory=dict)   # {"encode", "search", "total"}
    created: str = ""
    truncated: bool = False
    credits_total: int | None = None  # set when ``truncated``: how many credits there were

    @property
    def k(self) -> int:
        return self.credits_total if self.truncated and self.credits_total else len(self.credits)

    @property
    def creators(self) -> list[CreatorCredit]:
        """Per-creator totals of the shares, largest first (unknown creators grouped as '')."""
        totals: dict[str, CreatorCredit] = {}
        for credit in self.credits:
            name = credit.creator or ""
            entry = totals.setdefault(name, CreatorCredit(name, 0.0, 0))
            entry.share += credit.share
            entry.count += 1
        for entry in totals.values():  # rounded like the credits' own shares
            entry.share = round(entry.share, 6)
        return sorted(totals.values(), key=lambda c: (-c.share, c.creator))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "prompt": self.prompt,
            "k": self.k,
            "credits": [asdict(c) for c in self.credits],
            "creators": [asdict(c) for c in self.creators],
            "truncated": self.truncated,
            **({"credits_total": self.credits_total} if self.truncated else {}),
            "encoder": self.encoder,
            "bundle": self.bundle,
            "share_rule": self.share_rule,
            "timing_ms": self.timing_ms,
            "created": self.created,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Attribution":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise FastattrError(f"not a {SCHEMA} document (schema: {found!r})")
        try:
            return cls(
                prompt=data["prompt"],
                credits=[Credit(**c) for c in data["credits"]],
                encoder=data.get("encoder", {}), bundle=data.get("bundle", {}),
                share_rule=data.get("share_rule", {}), timing_ms=data.get("timing_ms", {}),
                created=data.get("created", ""), truncated=bool(data.get("truncated", False)),
                credits_total=data.get("credits_total"),
            )
        except (KeyError, TypeError) as exc:
            raise FastattrError(f"malformed {SCHEMA} document: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "Attribution":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise FastattrError(f"attribution JSON does not parse: {exc}") from None

    def truncated_to(self, max_bytes: int) -> "Attribution":
        """A copy whose JSON fits ``max_bytes``: drops the lowest-ranked credits, never the structure."""
        if len(self.to_json().encode()) <= max_bytes:
            return self
        total = self.k
        lo, hi = 0, len(self.credits)
        while lo < hi:  # largest prefix that fits
            mid = (lo + hi + 1) // 2
            candidate = Attribution(**{**self.__dict__, "credits": self.credits[:mid], "truncated": True,
                                       "credits_total": total})
            if len(candidate.to_json().encode()) <= max_bytes:
                lo = mid
            else:
                hi = mid - 1
        result = Attribution(**{**self.__dict__, "credits": self.credits[:lo], "truncated": True,
                                "credits_total": total})
        if len(result.to_json().encode()) > max_bytes:
            raise FastattrError(f"attribution does not fit {max_bytes} bytes even with no credits "
                                f"(prompt is {len(self.prompt)} characters); raise the size limit")
        return result


def softmax_shares(scores: list[float], temperature: float) -> list[float]:
    """The share rule: softmax of the top-k scores at the bundle's calibrated temperature.

    The temperature is calibrated when the bundle is built (see ``index_tools``), so shares are
    comparable across queries of one bundle; they always sum to 1 over the credits returned.
    """
    if not scores:
        return []
    if temperature <= 0:
        raise FastattrError(f"share temperature must be > 0, got {temperature}")
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]
