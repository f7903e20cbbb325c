"""Reading: every carrier of a file, whether they agree, and the ``fastattr inspect`` report."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..attribution import Attribution
from .c2pa import _c2pa_available, _read_c2pa
from .common import DIGITAL_SOURCE_TYPE, _open_image, _parse_record, _read_capped, _read_image, _supported_format
from .exif import _OUR_JSON_PREFIX, _exif_texts, _load_exif, _user_comment
from .png import _PNG_SIGNATURE, PNG_KEY, XMP_KEY, _check_png_chunks, _png_text
from .sidecar import sidecar_path
from .webp import _riff_chunks
from .xmp import XMP_TOP, _parse_xmp, _xml_clean

CARRIERS = ("png", "xmp", "exif", "sidecar", "c2pa")
_MAX_SIDECAR_BYTES = 16 << 20  # ~150,000 credits; more is no sidecar of ours, and parsing costs ~10x its size


def read_attribution(path: str | Path) -> dict[str, Attribution | dict | None]:
    """One entry per carrier found; ``None`` marks a carrier that is present but unreadable.

    ``xmp`` is a summary dict (top credits only); the others are full ``Attribution`` objects
    (``png``/``exif`` possibly truncated). ``c2pa`` is only looked for when c2pa-python is installed.
    """
    _, records, _ = _scan(Path(path), None)
    return {name: record["value"] for name, record in records.items()}


def inspect_image(path: str | Path, *, trust_anchors: str | Path | None = None) -> dict:
    """Everything ``fastattr inspect`` shows: carriers, whether they agree, the best attribution.

    The credits are ``authenticated`` only when a C2PA manifest carrying them validates and its
    signing certificate chains to one of ``trust_anchors`` (a PEM file of root certificates you
    trust): anyone can sign a valid manifest with a certificate they made, naming anyone.
    """
    path = Path(path)
    fmt, records, others = _scan(path, trust_anchors)
    best = _best_attribution(records)
    problems = _disagreements(records, best)
    carriers = {name: _carrier_report(name, records.get(name)) for name in CARRIERS}
    if "c2pa" not in records and not _c2pa_available():
        carriers["c2pa"]["checked"] = False
    return {
        "path": str(path),
        "format": fmt,
        "carriers": carriers,
        "agree": not problems,
        "disagreements": problems,
        "authenticated": _authenticated(records),
        "attribution": best.to_dict() if best else None,
        "other_metadata": {"parameters": others.get("parameters"), "prompt": "prompt" in others,
                           "workflow": "workflow" in others},
    }


def format_inspection(report: dict) -> str:
    """Human-readable text of an ``inspect_image`` report; control characters are shown escaped."""
    lines = [f"{printable(report['path'])} ({report['format']})", "carriers:"]
    for name, info in report["carriers"].items():
        lines.append(f"  {name:<8} {_describe_carrier(name, info)}")
    if report["agree"]:
        lines.append("carriers agree: yes")
    else:
        lines.append("carriers agree: NO")
        lines.extend(f"  - {printable(problem)}" for problem in report["disagreements"])
    lines.append(_authentication_line(report))
    attribution = report["attribution"]
    if attribution is None:
        lines.append("no attribution found")
    else:
        shown = attribution["credits"][:XMP_TOP]
        lines.append(f"top credits ({len(shown)} of {attribution['k']}):")
        for credit in shown:
            creator = f" by {printable(credit['creator'])}" if credit["creator"] else ""
            lines.append(f"  {credit['rank']:>3}. {credit['share']:6.1%}  {printable(credit['id'])}{creator}")
        creators = [c for c in attribution["creators"] if c["creator"]][:5]
        if creators:
            lines.append("top creators: " + ", ".join(f"{printable(c['creator'])} {c['share']:.1%}"
                                                      for c in creators))
    other = report["other_metadata"]
    lines.append(f"other metadata: A1111 parameters: {'yes' if other['parameters'] else 'no'}, "
                 f"ComfyUI prompt: {'yes' if other['prompt'] else 'no'}, "
                 f"workflow: {'yes' if other['workflow'] else 'no'}")
    return "\n".join(lines)


def _authentication_line(report: dict) -> str:
    """Whether the credits are authenticated, and who signed them: a valid signature by a signer
    nobody vouches for authenticates nothing."""
    c2pa = report["carriers"]["c2pa"]
    signer = printable(c2pa.get("signer") or "an unnamed certificate")
    if report["authenticated"]:
        return (f"credits authenticated: yes (C2PA manifest signed by {signer}, whose certificate chains to "
                "your trust anchors; the other carriers were checked against it)")
    if c2pa.get("credits") is not None and c2pa.get("trust") == "untrusted":
        return (f"credits authenticated: NO (C2PA manifest signed by {signer}: valid signature, signer not "
                "in your trust anchors; anyone can sign with a certificate they made)")
    if c2pa.get("credits") is not None and c2pa.get("trust") == "unchecked":
        return (f"credits authenticated: NO (C2PA manifest signed by {signer}: valid signature, signer not "
                "checked against a trust list; give trust anchors to check it)")
    return "credits authenticated: NO (no valid C2PA manifest with the credits: anyone can write or edit them)"


def _open_bounded(path: Path) -> tuple[bytes, Image.Image]:
    """The bytes of ``path`` (within the size cap) and the image Pillow opens from them; absurd PNG
    chunk counts are refused before Pillow walks the chunks one by one (2 million: 30 s)."""
    data = _read_image(path)
    if data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(data, path)
    return data, _open_image(path, data)


def _scan(path: Path, trust_anchors: str | Path | None) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Format, carrier records (``{"value", "error", ...}``) and other text metadata of ``path``.
    The file is read once, within bounds (size, chunk count), and every carrier read from those bytes."""
    data, opened = _open_bounded(path)
    damaged: dict[str, str] = {}  # PNG text chunks that cannot be decoded: keyword -> why
    with opened as image:
        fmt = _supported_format(image, path)
        if fmt == "PNG":
            others = _png_text(data, path, damaged)
            json_text, xmp = others.get(PNG_KEY), others.get(XMP_KEY)
        else:
            if fmt == "WEBP":
                _riff_chunks(data, path)  # refuses absurd chunk counts before c2pa walks them
            exif = _load_exif(image.info.get("exif"), path)
            comment, xmp, others = _user_comment(exif), image.info.get("xmp"), _exif_texts(exif)
            json_text = comment if comment and comment.startswith(_OUR_JSON_PREFIX) else None
            if comment and json_text is None:
                others["parameters"] = comment  # A1111 keeps its parameters in UserComment
    records: dict[str, dict] = {}
    if json_text is not None:
        records["png" if fmt == "PNG" else "exif"] = _parse_record(lambda: Attribution.from_json(json_text))
    for key, name in ((PNG_KEY, "png"), (XMP_KEY, "xmp")):
        if key in damaged and key not in others:  # ours, unreadable: reported, not taken for absent
            records[name] = {"value": None, "error": damaged[key]}
    if xmp:
        record = _parse_record(lambda: _parse_xmp(xmp))
        if record["value"] is not None or record["error"]:
            records["xmp"] = record
    side = sidecar_path(path)
    if side.is_file():
        records["sidecar"] = {"path": str(side), **_parse_record(
            lambda: Attribution.from_json(_read_capped(side, _MAX_SIDECAR_BYTES, "from a sidecar")))}
    if _c2pa_available():
        record = _read_c2pa(data, fmt, trust_anchors)
        if record is not None:
            records["c2pa"] = record
    return fmt, {name: records[name] for name in CARRIERS if name in records}, others


def _validates(records: dict[str, dict]) -> bool:
    """A C2PA manifest that validates and carries our assertion: the only carrier nobody can edit
    without the signer's key (though anyone can sign one with a key of their own)."""
    record = records.get("c2pa", {})
    return record.get("value") is not None and record.get("validation_state") in ("Valid", "Trusted")


def _authenticated(records: dict[str, dict]) -> bool:
    """A validating manifest whose signer chains to the trust anchors the user gave."""
    return _validates(records) and records["c2pa"]["trust"] == "trusted"


def _best_attribution(records: dict[str, dict]) -> Attribution | None:
    """The reference the other carriers are checked against: a validating C2PA manifest (trusted
    or not: what it signed cannot have been edited since), else embedded, then sidecar; an
    untruncated copy beats a truncated one."""
    if _validates(records):
        return records["c2pa"]["value"]
    found = [records[name]["value"] for name in ("png", "exif", "sidecar")
             if name in records and records[name]["value"] is not None]
    return next((a for a in found if not a.truncated), found[0] if found else None)


CREDIT_FIELDS = ("id", "rank", "share", "creator", "caption", "license", "source_url", "score")


def _differences(name: str, copy: Attribution, reference: Attribution) -> list[str]:
    """Every field that carrier ``name`` gives otherwise than the reference, named (a truncated
    copy may hold fewer credits)."""
    out = [f"{name}: {label} {_shown(x)} instead of {_shown(y)}" for label, x, y in _fields(copy, reference)
           if x != y]
    shorter = copy if len(copy.credits) < len(reference.credits) else reference
    if len(copy.credits) != len(reference.credits) and not shorter.truncated:
        out.append(f"{name}: {len(copy.credits)} credits instead of {len(reference.credits)}")
    for mine, theirs in zip(copy.credits, reference.credits):
        out += [f"{name}: credit {theirs.rank} {field} {_shown(getattr(mine, field))} instead of "
                f"{_shown(getattr(theirs, field))}"
                for field in CREDIT_FIELDS if getattr(mine, field) != getattr(theirs, field)]
    return out


def _fields(copy: Attribution, reference: Attribution) -> list[tuple[str, object, object]]:
    """(label, copy's value, reference's) of every field but the credits; objects key by key (every
    carrier is written from one attribution, so any difference is an edit)."""
    pairs: list[tuple[str, object, object]] = [("prompt", copy.prompt, reference.prompt), ("k", copy.k, reference.k),
                                               ("created", copy.created, reference.created)]
    for field in ("encoder", "bundle", "share_rule", "timing_ms"):
        mine, theirs = getattr(copy, field), getattr(reference, field)
        pairs += [(f"{field} {printable(key)}", mine.get(key), theirs.get(key)) for key in {**theirs, **mine}]
    return pairs


def _disagreements(records: dict[str, dict], best: Attribution | None) -> list[str]:
    problems = [f"{name}: {record['error']}" for name, record in records.items() if record.get("error")]
    if records.get("c2pa", {}).get("validation_state") == "Invalid":
        problems.append("c2pa: manifest does not validate (the file changed after signing)")
    if best is None:
        return problems
    for name in ("png", "exif", "sidecar", "c2pa"):
        value = records.get(name, {}).get("value")
        if value is not None and value is not best:
            problems += _differences(name, value, best)
    summary = records.get("xmp", {}).get("value")
    if summary is not None:
        if summary["digital_source_type"] != DIGITAL_SOURCE_TYPE:
            problems.append(f"xmp: DigitalSourceType is {summary['digital_source_type']!r}")
        if "credits" in summary:
            for label, x, y in (("k", summary["k"], best.k),
                                ("encoder fingerprint", summary["encoder_fingerprint"],
                                 _xml_clean(best.encoder.get("fingerprint", ""))),
                                ("bundle fingerprint", summary["bundle_fingerprint"],
                                 _xml_clean(best.bundle.get("fingerprint", "")))):
                if x != y:
                    problems.append(f"xmp: {label} {_shown(x)} instead of {_shown(y)}")
            problems += _xmp_count_problem(len(summary["credits"]), best)
            for mine, theirs in zip(summary["credits"], best.credits[:XMP_TOP]):
                expected = {"rank": theirs.rank, "id": _xml_clean(theirs.id), "share": theirs.share,
                            "creator": None if theirs.creator is None else _xml_clean(theirs.creator)}
                problems += [f"xmp: credit {theirs.rank} {field} {_shown(mine[field])} instead of "
                             f"{_shown(value)}" for field, value in expected.items() if mine[field] != value]
    return problems


def _xmp_count_problem(shown: int, best: Attribution) -> list[str]:
    """The summary holds the top ``XMP_TOP`` credits of all: as many as the reference's first ones, or
    more when the reference is a truncated copy holding fewer (up to its ``k``)."""
    least = min(XMP_TOP, len(best.credits))
    most = max(least, min(XMP_TOP, best.k)) if best.truncated else least
    if least <= shown <= most:
        return []
    return [f"xmp: {shown} credits instead of {least if shown < least else most}"]


def _carrier_report(name: str, record: dict | None) -> dict:
    if record is None:
        return {"present": False}
    report = {"present": True, **{k: v for k, v in record.items() if k != "value" and v is not None}}
    value = record["value"]
    if isinstance(value, Attribution):
        report.update(credits=len(value.credits), k=value.k, truncated=value.truncated)
    elif isinstance(value, dict):
        report.update(digital_source_type=value["digital_source_type"],
                      credits=len(value.get("credits", [])), k=value.get("k"))
    return report


def _describe_carrier(name: str, info: dict) -> str:
    if not info["present"]:
        return "not checked (pip install 'fastattr[c2pa]')" if info.get("checked") is False else "absent"
    parts = ["present"]
    if "credits" in info:
        truncated = " (truncated)" if info.get("truncated") else ""
        parts.append(f"{info['credits']} of {info['k']} credits{truncated}")
    if name in ("xmp", "c2pa") and info.get("digital_source_type"):
        parts.append("DigitalSourceType " + info["digital_source_type"].rsplit("/", 1)[-1])
    for key in ("validation_state", "signer", "trust", "parent", "path", "note", "error"):
        if info.get(key):
            parts.append(f"{key.replace('_', ' ')}: {printable(info[key])}")
    return ", ".join(parts)


def _shown(value: object) -> str:
    """A value in a disagreement message: quoted text (control characters escaped), bare numbers."""
    return repr(printable(value)) if isinstance(value, str) else repr(value)


def printable(value: object) -> str:
    """Escape newlines and terminal control sequences that captions/creators may carry."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
