"""XMP carrier: IPTC DigitalSourceType and the top credits, merged into the image's own packet."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..attribution import SCHEMA, Attribution
from ..errors import FastattrError
from .common import DIGITAL_SOURCE_TYPE
from .jpeg import _JPEG_XMP_HEADER, _jpeg_segments
from .png import XMP_KEY, _png_text
from .webp import _riff_chunks

XMP_TOP = 10  # credits summarised in XMP; the full list lives in the JSON carriers

FASTATTR_NS = "https://fastattr.dev/ns/1.0/"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_XMPMETA_NS = "adobe:ns:meta/"

_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_clean(value: object) -> str:
    """``value`` without the characters XML 1.0 cannot hold (control characters, U+FFFE, ...)."""
    return _XML_ILLEGAL.sub("", str(value))


def _xml_text(value: object) -> str:
    escaped = _xml_clean(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace('"', "&quot;").replace("\r", "&#13;")


def _xmp_packet(attribution: Attribution) -> bytes:
    """IPTC DigitalSourceType + a summary of the top credits; UTF-8 XMP packet."""
    def prop(name: str, value: object) -> str:
        return f"<fastattr:{name}>{_xml_text(value)}</fastattr:{name}>"

    items = []
    for credit in attribution.credits[:XMP_TOP]:
        fields = [prop("rank", credit.rank), prop("id", credit.id), prop("share", repr(credit.share))]
        if credit.creator is not None:
            fields.append(prop("creator", credit.creator))
        items.append(f'     <rdf:li rdf:parseType="Resource">{"".join(fields)}</rdf:li>')
    lines = [
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">',
        f' <rdf:RDF xmlns:rdf="{RDF_NS}">',
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT_NS}" xmlns:fastattr="{FASTATTR_NS}">',
        f"   <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>",
        "   " + prop("schema", SCHEMA),
        "   " + prop("k", attribution.k),
        "   " + prop("encoderFingerprint", attribution.encoder.get("fingerprint", "")),
        "   " + prop("bundleFingerprint", attribution.bundle.get("fingerprint", "")),
        "   <fastattr:credits>",
        "    <rdf:Seq>",
        *items,
        "    </rdf:Seq>",
        "   </fastattr:credits>",
        "  </rdf:Description>",
        " </rdf:RDF>",
        "</x:xmpmeta>",
        '<?xpacket end="w"?>',
    ]
    return "\n".join(lines).encode()


def _existing_xmp(data: bytes, fmt: str, path: Path) -> bytes | None:
    """The XMP packet the image already carries (its rights and IPTC fields must survive)."""
    if fmt == "PNG":
        value = _png_text(data, path).get(XMP_KEY)
        return value.encode() if value else None
    if fmt == "JPEG":
        segments, _ = _jpeg_segments(data, path)
        return next((seg[4:][len(_JPEG_XMP_HEADER):] for seg in segments
                     if seg[1] == 0xE1 and seg[4:].startswith(_JPEG_XMP_HEADER)), None)
    return next((body for fourcc, body in _riff_chunks(data, path) if fourcc == b"XMP "), None)


def _safe_xml(packet: str | bytes) -> ET.Element:
    """Parse XMP, refusing DTDs and entities (XMP needs neither; they are how XML bombs expand)."""
    raw = packet.encode() if isinstance(packet, str) else packet
    markup = raw.replace(b"\x00", b"")  # UTF-16 and UTF-32 spell "<!DOCTYPE" with NULs in between
    if b"<!DOCTYPE" in markup or b"<!ENTITY" in markup:
        raise ET.ParseError("XMP with a DTD or entities is refused")
    return ET.fromstring(raw)


def _merged_xmp(existing: bytes | None, attribution: Attribution, label: str) -> bytes:
    """Our XMP merged into the image's own packet: every other property (dc:creator, dc:rights,
    xmpRights:UsageTerms, IPTC data-mining fields, ...) is kept; ours and DigitalSourceType are
    replaced. A packet that cannot be read cannot be merged, and replacing it would destroy rights
    metadata unseen: refused (``label`` names it in the message, e.g. ``"a.png: its XMP packet"``)."""
    ours = _xmp_packet(attribution)
    if not existing:
        return ours
    try:
        root = _safe_xml(existing)
        names = {uri: prefix for _, (prefix, uri) in ET.iterparse(io.BytesIO(existing), events=("start-ns",))}
    except ET.ParseError as exc:
        raise _unmergeable(label, f"cannot be parsed ({exc})") from None
    rdf = root if root.tag == f"{{{RDF_NS}}}RDF" else root.find(f"{{{RDF_NS}}}RDF")
    if rdf is None and root.tag != f"{{{_XMPMETA_NS}}}xmpmeta":
        raise _unmergeable(label, f"is not XMP (its root element is {root.tag[:80]!r})")
    if rdf is None:  # x:xmpmeta without RDF (empty, say): ours becomes its RDF
        rdf = ET.SubElement(root, f"{{{RDF_NS}}}RDF")
    replaced = (f"{{{IPTC_EXT_NS}}}DigitalSourceType",)
    for desc in rdf.findall(f"{{{RDF_NS}}}Description"):
        for child in list(desc):
            if child.tag.startswith(f"{{{FASTATTR_NS}}}") or child.tag in replaced:
                desc.remove(child)
        for key in [k for k in desc.attrib if k.startswith(f"{{{FASTATTR_NS}}}") or k in replaced]:
            del desc.attrib[key]
        if not len(desc) and set(desc.attrib) <= {f"{{{RDF_NS}}}about"}:
            rdf.remove(desc)
    rdf.append(ET.fromstring(ours).find(f".//{{{RDF_NS}}}Description"))
    names.update({_XMPMETA_NS: "x", RDF_NS: "rdf", IPTC_EXT_NS: "Iptc4xmpExt", FASTATTR_NS: "fastattr"})
    for uri, prefix in names.items():
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n{body}\n<?xpacket end="w"?>'.encode()


def _unmergeable(label: str, problem: str) -> FastattrError:
    return FastattrError(f"{label} {problem}, so the credits cannot be merged into it, and replacing it "
                         "would lose whatever rights metadata it holds (dc:rights, xmpRights:UsageTerms, ...); "
                         "repair it, or strip it (exiftool -xmp:all= FILE), then write the credits")


def _parse_xmp(packet: str | bytes) -> dict | None:
    """Our summary from an XMP packet, or None when it has neither our data nor DigitalSourceType."""
    root = _safe_xml(packet)
    source_type, ours = None, None
    for desc in root.iter(f"{{{RDF_NS}}}Description"):
        element = desc.find(f"{{{IPTC_EXT_NS}}}DigitalSourceType")
        if element is not None:
            source_type = element.get(f"{{{RDF_NS}}}resource") or (element.text or "").strip()
        source_type = source_type or desc.get(f"{{{IPTC_EXT_NS}}}DigitalSourceType")
        if desc.find(f"{{{FASTATTR_NS}}}schema") is not None:
            ours = desc
    if ours is None and source_type is None:
        return None
    summary: dict = {"digital_source_type": source_type}
    if ours is not None:
        def get(element: ET.Element, name: str) -> str | None:
            return element.findtext(f"{{{FASTATTR_NS}}}{name}")

        summary.update(
            schema=get(ours, "schema"), k=int(get(ours, "k")),
            encoder_fingerprint=get(ours, "encoderFingerprint") or "",
            bundle_fingerprint=get(ours, "bundleFingerprint") or "",
            credits=[{"rank": int(get(li, "rank")), "id": get(li, "id") or "",
                      "creator": get(li, "creator"), "share": float(get(li, "share"))}
                     for li in ours.iter(f"{{{RDF_NS}}}li")])
    return summary
