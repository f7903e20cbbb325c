"""Reading: every carrier of a file, whether they agree, and the ``fastattr inspect`` report."""

from __future__ import annotations

from pathlib import Path

from ..attribution import Attribution
from .c2pa import _c2pa_available, _read_c2pa
from .common import DIGITAL_SOURCE_TYPE, _open_image, _parse_record, _supported_format
from .exif import _OUR_JSON_PREFIX, _exif_texts, _load_exif, _user_comment
from .png import PNG_KEY, XMP_KEY, _png_text
from .sidecar import sidecar_path
from .xmp import XMP_TOP, _parse_xmp, _xml_clean

CARRIERS = ("png", "xmp", "exif", "sidecar", "c2pa")


def read_attribution(path: str | Path) -> dict[str, Attribution | dict | None]:
    """One entry per carrier found; ``None`` marks a carrier that is present but unreadable.

    ``xmp`` is a summary dict (top credits only); the others are full ``Attribution`` objects
    (``png``/``exif`` possibly truncated). ``c2pa`` is only looked for when c2pa-python is installed.
    """
    _, records, _ = _scan(Path(path))
    return {name: record["value"] for name, record in records.items()}


def inspect_image(path: str | Path) -> dict:
    """Everything ``fastattr inspect`` shows: carriers, whether they agree, the best attribution."""
    path = Path(path)
    fmt, records, others = _scan(path)
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
        lines.extend(f"  - {problem}" for problem in report["disagreements"])
    lines.append("credits authenticated: yes (a valid C2PA manifest; the other carriers were checked against it)"
                 if report["authenticated"] else
                 "credits authenticated: NO (no valid C2PA manifest: anyone can write or edit these credits)")
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


def _scan(path: Path) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Format, carrier records (``{"value", "error", ...}``) and other text metadata of ``path``."""
    damaged: dict[str, str] = {}  # PNG text chunks that cannot be decoded: keyword -> why
    with _open_image(path) as image:
        fmt = _supported_format(image, path)
        if fmt == "PNG":
            others = _png_text(path.read_bytes(), path, damaged)
            json_text, xmp = others.get(PNG_KEY), others.get(XMP_KEY)
        else:
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
        records["sidecar"] = {"path": str(side),
                              **_parse_record(lambda: Attribution.from_json(side.read_bytes()))}
    if _c2pa_available():
        record = _read_c2pa(path)
        if record is not None:
            records["c2pa"] = record
    return fmt, {name: records[name] for name in CARRIERS if name in records}, others


def _authenticated(records: dict[str, dict]) -> bool:
    """A C2PA manifest that validates and carries our assertion: the only carrier nobody can edit
    without the signer's key."""
    record = records.get("c2pa", {})
    return record.get("value") is not None and record.get("validation_state") in ("Valid", "Trusted")


def _best_attribution(records: dict[str, dict]) -> Attribution | None:
    """The reference the other carriers are checked against: a validating C2PA manifest, else
    embedded, then sidecar; an untruncated copy beats a truncated one."""
    if _authenticated(records):
        return records["c2pa"]["value"]
    found = [records[name]["value"] for name in ("png", "exif", "sidecar")
             if name in records and records[name]["value"] is not None]
    return next((a for a in found if not a.truncated), found[0] if found else None)


CREDIT_FIELDS = ("id", "rank", "share", "creator", "caption", "license", "source_url", "score")


def _differences(name: str, copy: Attribution, reference: Attribution) -> list[str]:
    """Every field that carrier ``name`` gives otherwise than the reference, named (a truncated
    copy may hold fewer credits)."""
    out = [f"{name}: {label} {_shown(x)} instead of {_shown(y)}" for label, x, y in (
        ("prompt", copy.prompt, reference.prompt), ("k", copy.k, reference.k),
        ("encoder fingerprint", copy.encoder.get("fingerprint"), reference.encoder.get("fingerprint")),
        ("bundle fingerprint", copy.bundle.get("fingerprint"), reference.bundle.get("fingerprint"))) if x != y]
    shorter = copy if len(copy.credits) < len(reference.credits) else reference
    if len(copy.credits) != len(reference.credits) and not shorter.truncated:
        out.append(f"{name}: {len(copy.credits)} credits instead of {len(reference.credits)}")
    for mine, theirs in zip(copy.credits, reference.credits):
        out += [f"{name}: credit {theirs.rank} {field} {_shown(getattr(mine, field))} instead of "
                f"{_shown(getattr(theirs, field))}"
                for field in CREDIT_FIELDS if getattr(mine, field) != getattr(theirs, field)]
    return out


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
            for mine, theirs in zip(summary["credits"], best.credits[:XMP_TOP]):
                expected = {"rank": theirs.rank, "id": _xml_clean(theirs.id), "share": theirs.share,
                            "creator": None if theirs.creator is None else _xml_clean(theirs.creator)}
                problems += [f"xmp: credit {theirs.rank} {field} {_shown(mine[field])} instead of "
                             f"{_shown(value)}" for field, value in expected.items() if mine[field] != value]
    return problems


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
    for key in ("validation_state", "parent", "path", "note", "error"):
        if info.get(key):
            parts.append(f"{key.replace('_', ' ')}: {printable(info[key])}")
    return ", ".join(parts)


def _shown(value: object) -> str:
    """A value in a disagreement message: quoted text (control characters escaped), bare numbers."""
    return repr(printable(value)) if isinstance(value, str) else repr(value)


def printable(value: object) -> str:
    """Escape newlines and terminal control sequences that captions/creators may carry."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
