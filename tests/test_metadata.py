"""Credits carriers: PNG iTXt, XMP, EXIF UserComment, sidecar and C2PA; write, read, inspect."""

from __future__ import annotations

import datetime
import io
import json
import os
import struct
import sys
import tracemalloc
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, PngImagePlugin, TiffImagePlugin, TiffTags

from fastattr_hook import metadata
from fastattr_hook.attribution import Attribution, Credit
from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import (C2paConfig, format_inspection, inspect_image, read_attribution,
                                    save_with_attribution, sidecar_path, write_attribution_in_place)

IPTC = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
NASTY = 'a <b> & "c" \'d\' ]]> é 猫 🎨 \x00\x07\x1b\x7f\ufffe\r\n\tend'


def make_attribution(n: int = 5, caption: str = "a photo", creator: str | None = "alice") -> Attribution:
    shares = [1 / n] * n
    credits = [Credit(rank=i + 1, key=100 + i, id=f"item-{i:05d}", score=1.0 - i / (n + 1),
                      share=shares[i], caption=f"{caption} #{i}", creator=f"{creator}{i % 3}" if creator else None,
                      license="CC-BY-4.0", source_url=f"https://example.org/{i}")
               for i in range(n)]
    return Attribution(prompt="a cat on a mat", credits=credits,
                       encoder={"name": "tiny", "fingerprint": "enc123"},
                       bundle={"name": "b", "fingerprint": "bun456", "items": 1000},
                       share_rule={"name": "softmax", "temperature": 0.05},
                       timing_ms={"encode": 1.0, "search": 0.5, "total": 1.5},
                       created="2025-01-01T00:00:00Z")


def rgb(size=(24, 16)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([(x * 10 % 256, y * 15 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    return image


def xmp_of(path: Path) -> ET.Element:
    with Image.open(path) as image:
        return ET.fromstring(image.info["xmp"])


def png_chunk_types(path: Path) -> list[bytes]:
    data, pos, types = path.read_bytes(), 8, []
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        types.append(ctype)
        pos += 12 + length
    return types


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def user_comment(path: Path) -> bytes:
    """The raw UserComment (character code + text) of an image's EXIF."""
    with Image.open(path) as image:
        return image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]


def exif_ifd_types(path: Path, which: int = ExifTags.IFD.Exif) -> dict[int, int]:
    """Tag -> TIFF type as stored in a sub-IFD (Pillow's Exif API does not expose types)."""
    with Image.open(path) as image:
        block = image.info["exif"].removeprefix(b"Exif\x00\x00")
        pointer = image.getexif()[which]
    ifd = TiffImagePlugin.ImageFileDirectory_v2(block[:8])
    stream = io.BytesIO(block)
    stream.seek(pointer)
    ifd.load(stream)
    return dict(ifd.tagtype)


def tiff(entries: list[tuple[int, int, int, int]], order: str = "<", tail: bytes = b"") -> bytes:
    """An EXIF block: IFD0 at offset 8 holding (tag, type, count, value/offset) entries, then ``tail``."""
    return (b"Exif\x00\x00" + (b"II*\x00" if order == "<" else b"MM\x00*")
            + struct.pack(order + "IH", 8, len(entries)) + b"".join(struct.pack(order + "HHII", *e) for e in entries)
            + struct.pack(order + "I", 0) + tail)


def a1111_exif(comment: bytes) -> bytes:
    """EXIF laid out as A1111 writes it (piexif): big-endian, IFD0 holding only the Exif IFD pointer,
    whose one entry is an UNDEFINED UserComment."""
    exif_ifd = struct.pack(">HHHII", 1, 0x9286, 7, len(comment), 44) + struct.pack(">I", 0)
    return tiff([(0x8769, 4, 1, 26)], ">", exif_ifd + comment)


# ----------------------------------------------------------------------------- round trips

def test_png_round_trip(tmp_path):
    attribution = make_attribution()
    out = save_with_attribution(rgb(), tmp_path / "out.png", attribution)
    found = read_attribution(out)
    assert set(found) == {"png", "xmp", "sidecar"} | ({"c2pa"} & set(found))
    assert found["png"].to_dict() == attribution.to_dict()
    assert found["sidecar"].to_dict() == attribution.to_dict()
    assert [c["id"] for c in found["xmp"]["credits"]] == [c.id for c in attribution.credits]
    assert found["xmp"]["k"] == 5 and found["xmp"]["bundle_fingerprint"] == "bun456"
    with Image.open(out) as image:  # what any PNG reader sees
        assert json.loads(image.text["fastattr"])["schema"] == "fastattr/attribution@1"
        assert image.tobytes() == rgb().tobytes()
    assert sidecar_path(out) == tmp_path / "out.attribution.json"


def test_credits_are_not_written_into_a_png_with_a_damaged_chunk(tmp_path):
    """A chunk failing its CRC would be copied into the credited file as it is: refused by name, the
    file untouched."""
    path = tmp_path / "damaged.png"
    rgb().save(path)
    body = b"Comment\x00kept"  # after the image data, where Pillow reads no CRC; stored with one of "Kept"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXtComment\x00Kept"))
    data = path.read_bytes()[:-12] + chunk + path.read_bytes()[-12:]
    path.write_bytes(data)
    with pytest.raises(FastattrError, match=rf"^{path}: its PNG 'tEXt' chunk fails its CRC .*re-save the image"):
        write_attribution_in_place(path, make_attribution())
    assert path.read_bytes() == data and not sidecar_path(path).exists()


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_webp_round_trip_keeps_exif(tmp_path, suffix):
    image = rgb()
    exif = Image.Exif()
    exif[0x013B] = "Jane Artist"  # Artist
    exif[0x8298] = "(c) Jane"     # Copyright
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] = b"\x01maker\x00note"
    image.info["exif"] = exif.tobytes()
    attribution = make_attribution()
    out = save_with_attribution(image, tmp_path / f"out{suffix}", attribution)
    found = read_attribution(out)
    assert found["exif"].to_dict() == attribution.to_dict()
    assert found["xmp"]["digital_source_type"] == metadata.DIGITAL_SOURCE_TYPE
    assert found["sidecar"].to_dict() == attribution.to_dict()
    with Image.open(out) as reread:
        kept = reread.getexif()
        assert kept[0x013B] == "Jane Artist" and kept[0x8298] == "(c) Jane"
        assert kept.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] == b"\x01maker\x00note"
        assert reread.size == image.size
    assert user_comment(out).startswith(b"ASCII\x00\x00\x00")  # the JSON here is pure ASCII
    types = exif_ifd_types(out)  # UNDEFINED, as the EXIF spec types them (not Pillow's default, BYTE)
    assert types[ExifTags.Base.UserComment] == types[ExifTags.Base.MakerNote] == TiffTags.UNDEFINED


@pytest.mark.parametrize("name", ["a.jpg", "a.webp"])
def test_non_ascii_text_in_exif_sub_ifds_survives_writing_credits(tmp_path, name):
    """Pillow reads EXIF ASCII entries as Latin-1 and writes them as ASCII, '?' for the rest: the
    camera's own UTF-8 text in the Exif and GPS IFDs is kept byte for byte, still typed ASCII."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.CameraOwnerName] = "Zo__ Owner"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.LensModel] = "Objektiv CAT"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSMapDatum] = "Wo_rld"
    block = exif.tobytes()
    for placeholder, text in (("Zo__", "Zoë"), ("CAT", "猫"), ("Wo_", "Wö")):  # as many bytes in UTF-8
        block = block.replace(placeholder.encode(), text.encode())
    out = tmp_path / name
    rgb().save(out, exif=block)
    attribution = make_attribution(creator="Zoë")
    write_attribution_in_place(out, attribution, sidecar=False)
    assert read_attribution(out)["exif"].to_dict() == attribution.to_dict()
    with Image.open(out) as image:
        kept = image.getexif()
    exif_ifd, gps_ifd = kept.get_ifd(ExifTags.IFD.Exif), kept.get_ifd(ExifTags.IFD.GPSInfo)
    assert exif_ifd[ExifTags.Base.CameraOwnerName].encode("latin-1").decode() == "Zoë Owner"
    assert exif_ifd[ExifTags.Base.LensModel].encode("latin-1").decode() == "Objektiv 猫"
    assert gps_ifd[ExifTags.GPS.GPSMapDatum].encode("latin-1").decode() == "Wörld"
    types = exif_ifd_types(out)
    assert types[ExifTags.Base.CameraOwnerName] == types[ExifTags.Base.LensModel] == TiffTags.ASCII
    assert exif_ifd_types(out, ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSMapDatum] == TiffTags.ASCII


def test_special_characters_survive_every_carrier(tmp_path):
    attribution = make_attribution(caption=NASTY, creator=NASTY)
    attribution.prompt = NASTY
    attribution.credits[0].id = "id " + NASTY
    for name in ("out.png", "out.jpg", "out.webp"):
        out = save_with_attribution(rgb(), tmp_path / name, attribution)
        found = read_attribution(out)
        embedded = found["png" if name.endswith(".png") else "exif"]
        assert embedded.to_dict() == attribution.to_dict(), name
        assert found["sidecar"].to_dict() == attribution.to_dict()
        summary = found["xmp"]  # XML 1.0 cannot hold NUL/ESC/U+FFFE: those are dropped, the rest kept
        cleaned = NASTY.replace("\x00", "").replace("\x07", "").replace("\x1b", "").replace("\ufffe", "")
        assert summary["credits"][0]["id"] == "id " + cleaned
        assert summary["credits"][0]["creator"] == cleaned + "0"
        report = inspect_image(out)
        assert report["agree"] is True
        text = format_inspection(report)
        assert "\x1b" not in text and "\\x1b" in text and "猫" in text  # terminal-safe, still readable
    with Image.open(tmp_path / "out.jpg") as image:
        assert image.info["exif"].startswith(b"Exif\x00\x00MM")  # big-endian: UTF-16BE is its byte order
    comment = user_comment(tmp_path / "out.jpg")
    assert comment.startswith(b"UNICODE\x00")
    assert json.loads(comment[8:].decode("utf-16-be"))["prompt"] == NASTY


def test_long_credit_list_is_truncated_keeping_top_ranks(tmp_path):
    attribution = make_attribution(n=1500, caption="x" * 80)
    assert len(attribution.to_json().encode()) > 150_000
    for name in ("big.png", "big.jpg"):
        out = save_with_attribution(rgb(), tmp_path / name, attribution)
        found = read_attribution(out)
        embedded = found["png" if name.endswith(".png") else "exif"]
        assert embedded.truncated is True and embedded.credits_total == 1500 and embedded.k == 1500
        assert 0 < len(embedded.credits) < 1500
        assert [c.rank for c in embedded.credits] == list(range(1, len(embedded.credits) + 1))
        assert len(embedded.to_json().encode()) <= 65536
        assert len(found["sidecar"].credits) == 1500 and not found["sidecar"].truncated
        report = inspect_image(out)
        assert report["agree"] is True and report["attribution"]["k"] == 1500
        assert len(report["attribution"]["credits"]) == 1500  # the untruncated copy wins
    with Image.open(tmp_path / "big.png") as image:
        assert json.loads(image.text["fastattr"])["truncated"] is True  # valid JSON as stored


# ----------------------------------------------------------------------------- other tools' metadata

def comfy_png(path: Path) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}))
    info.add_text("workflow", json.dumps({"nodes": [{"id": 3, "title": "<K&S>"}]}))
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    info.add_itxt("Comment", "ünïcode comment", lang="de", tkey="Kommentar")
    rgb().save(path, pnginfo=info)
    return path


def test_comfyui_and_a1111_chunks_are_kept(tmp_path):
    source = comfy_png(tmp_path / "comfy.png")
    with Image.open(source) as image:
        expected = dict(image.text)
        out = save_with_attribution(image, tmp_path / "out.png", make_attribution(),
                                    extra_text={"fastattr_note": "hello"})
    with Image.open(out) as image:
        for key, value in expected.items():
            assert image.text[key] == value
        assert image.text["Comment"].lang == "de" and image.text["fastattr_note"] == "hello"
    report = inspect_image(out)
    assert report["other_metadata"] == {"parameters": expected["parameters"], "prompt": True, "workflow": True}

    fresh = save_with_attribution(rgb(), tmp_path / "fresh.png", make_attribution(),
                                  pnginfo_from=Image.open(source))
    with Image.open(fresh) as image:
        assert image.text["workflow"] == expected["workflow"]


def test_comfyui_text_in_webp_exif_follows_comfyui_convention(tmp_path):
    extra = {"prompt": '{"3": {}}', "workflow": '{"nodes": ["é 猫"]}'}
    out = save_with_attribution(rgb(), tmp_path / "out.webp", make_attribution(), extra_text=extra)
    write_attribution_in_place(out, make_attribution(n=3))  # the text is kept, and its UTF-8 not mangled
    with Image.open(out) as image:
        exif = image.getexif()
    assert exif[0x0110] == "prompt:" + extra["prompt"]
    assert exif[0x010F].encode("latin-1").decode() == "workflow:" + extra["workflow"]  # Pillow reads Latin-1
    assert inspect_image(out)["other_metadata"]["workflow"] is True


def test_a1111_user_comment_in_jpeg_is_not_overwritten(tmp_path):
    parameters = "a cat\nSteps: 20, Sampler: Euler a"
    path = tmp_path / "a1111.jpg"
    rgb().save(path, quality=90, exif=a1111_exif(b"UNICODE\x00" + parameters.encode("utf-16-be")))
    write_attribution_in_place(path, make_attribution())
    found = read_attribution(path)
    assert "exif" not in found and found["xmp"]["k"] == 5 and "sidecar" in found
    assert inspect_image(path)["other_metadata"]["parameters"] == parameters
    assert user_comment(path) == b"UNICODE\x00" + parameters.encode("utf-16-be")  # kept byte for byte


def test_xmp_carries_digital_source_type(tmp_path):
    for name in ("a.png", "a.jpg", "a.webp"):
        out = save_with_attribution(rgb(), tmp_path / name, make_attribution())
        root = xmp_of(out)
        values = [e.text for e in root.iter(f"{IPTC}DigitalSourceType")]
        assert values == [metadata.DIGITAL_SOURCE_TYPE], name
        assert inspect_image(out)["carriers"]["xmp"]["digital_source_type"] == metadata.DIGITAL_SOURCE_TYPE


RIGHTS_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
   xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/">
  <dc:creator><rdf:Seq><rdf:li>Ana Artist</rdf:li></rdf:Seq></dc:creator>
  <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) Ana Artist</rdf:li></rdf:Alt></dc:rights>
  <xmpRights:UsageTerms><rdf:Alt><rdf:li xml:lang="x-default">No AI training</rdf:li></rdf:Alt></xmpRights:UsageTerms>
  <plus:DataMining>http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED</plus:DataMining>
 </rdf:Description></rdf:RDF></x:xmpmeta>
<?xpacket end="w"?>"""


def with_rights_xmp(path: Path, packet: str = RIGHTS_XMP) -> Path:
    """An image at ``path`` whose own XMP is ``packet`` (by default: a creator, rights and data-mining fields)."""
    if path.suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", packet)
        rgb().save(path, pnginfo=info)
    else:
        rgb().save(path, xmp=packet.encode())
    return path


def assert_rights_kept_once(root) -> None:
    texts = [e.text for e in root.iter() if e.text and e.text.strip()]
    for kept in ("Ana Artist", "(c) Ana Artist", "No AI training", "http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED"):
        assert texts.count(kept) == 1, (kept, texts)


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_writing_credits_keeps_the_images_own_rights_metadata(tmp_path, name):
    out = tmp_path / name
    out.write_bytes(with_rights_xmp(tmp_path / ("src-" + name)).read_bytes())
    for n in (3, 4):  # written twice: ours is replaced, theirs kept once
        write_attribution_in_place(out, make_attribution(n=n))
    root = xmp_of(out)
    assert_rights_kept_once(root)
    assert [e.text for e in root.iter(f"{IPTC}DigitalSourceType")] == [metadata.DIGITAL_SOURCE_TYPE]
    report = inspect_image(out)
    assert report["agree"] is True and report["carriers"]["xmp"]["credits"] == 4


def test_xmp_with_entities_is_refused_not_expanded(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", bomb)
    rgb().save(tmp_path / "bomb.png", pnginfo=info)
    report = inspect_image(tmp_path / "bomb.png")
    assert "DTD or entities is refused" in report["carriers"]["xmp"]["error"]
    original = (tmp_path / "bomb.png").read_bytes()
    with pytest.raises(FastattrError, match="bomb.png: its XMP packet cannot be parsed .*DTD or entities"):
        write_attribution_in_place(tmp_path / "bomb.png", make_attribution())  # neither expanded nor dropped
    assert (tmp_path / "bomb.png").read_bytes() == original


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_saving_an_opened_image_keeps_its_xmp_rights(tmp_path, name):
    """An image opened from disk (an img2img source, a re-save) keeps its own XMP through
    save_with_attribution, with our credits merged in as in place."""
    with Image.open(with_rights_xmp(tmp_path / ("src-" + name))) as image:
        out = save_with_attribution(image, tmp_path / name, make_attribution())
    assert_rights_kept_once(xmp_of(out))
    assert [e.text for e in xmp_of(out).iter(f"{IPTC}DigitalSourceType")] == [metadata.DIGITAL_SOURCE_TYPE]
    assert inspect_image(out)["agree"] is True


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_xmp_that_cannot_be_parsed_is_refused_not_replaced(tmp_path, name):
    """A stray '&' makes the packet unparseable: replacing it would silently destroy the rights it
    holds, so writing credits is refused by name (in place: the file unchanged), and the error says
    what to do."""
    path = with_rights_xmp(tmp_path / name, RIGHTS_XMP.replace("(c) Ana Artist", "(c) Ana & Co"))
    original = path.read_bytes()
    with pytest.raises(FastattrError, match=rf"^{path}: its XMP packet cannot be parsed \(not well-formed.*"
                                            r"would lose .*rights.*strip it"):
        write_attribution_in_place(path, make_attribution())
    assert path.read_bytes() == original and not sidecar_path(path).exists() and leftovers(tmp_path) == []
    with Image.open(path) as image, pytest.raises(FastattrError, match=rf"^{tmp_path / 'out.png'}: the XMP packet "
                                                                      rf"of {path} cannot be parsed"):
        save_with_attribution(image, tmp_path / "out.png", make_attribution())
    assert not (tmp_path / "out.png").exists()


def test_xmp_without_rdf_gets_ours_and_other_roots_are_refused(tmp_path):
    path = tmp_path / "a.jpg"
    rgb().save(path, xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Tool 1.0"/>')
    write_attribution_in_place(path, make_attribution())
    assert xmp_of(path).get("{adobe:ns:meta/}xmptk") == "Tool 1.0" and inspect_image(path)["agree"] is True
    rgb().save(path, xmp=b"<notes>keep me</notes>")
    with pytest.raises(FastattrError, match="its XMP packet is not XMP \\(its root element is 'notes'\\)"):
        write_attribution_in_place(path, make_attribution())


# ----------------------------------------------------------------------------- inspect

def test_inspect_agreement_and_tampering(tmp_path):
    attribution = make_attribution()
    out = save_with_attribution(rgb(), tmp_path / "out.png", attribution)
    report = inspect_image(out)
    assert report["agree"] is True and report["disagreements"] == []
    assert report["format"] == "PNG"
    assert report["carriers"]["png"] == {"present": True, "credits": 5, "k": 5, "truncated": False}
    assert report["carriers"]["exif"] == {"present": False}
    assert report["attribution"]["credits"][0]["id"] == "item-00000"
    text = format_inspection(report)
    assert "carriers agree: yes" in text and "item-00000" in text and "trainedAlgorithmicMedia" in text

    side = sidecar_path(out)
    tampered = json.loads(side.read_text())
    tampered["credits"][0], tampered["credits"][1] = tampered["credits"][1], tampered["credits"][0]
    side.write_text(json.dumps(tampered))
    report = inspect_image(out)
    assert report["agree"] is False
    assert any(p.startswith("sidecar:") for p in report["disagreements"])
    assert "carriers agree: NO" in format_inspection(report)

    side.write_text("{not json")
    report = inspect_image(out)
    assert report["agree"] is False and read_attribution(out)["sidecar"] is None


def test_inspect_detects_tampered_xmp(tmp_path):
    out = save_with_attribution(rgb(), tmp_path / "out.jpg", make_attribution())
    data = out.read_bytes()
    out.write_bytes(data.replace(b"<fastattr:id>item-00001<", b"<fastattr:id>item-99999<"))
    report = inspect_image(out)
    assert report["agree"] is False and report["disagreements"] == ["xmp: credit 2 id 'item-99999' instead of 'item-00001'"]


def test_inspect_names_every_forged_field_and_says_unauthenticated(tmp_path):
    attribution = make_attribution()
    out = save_with_attribution(rgb(), tmp_path / "out.jpg", attribution)
    creator = attribution.credits[0].creator
    assert creator and inspect_image(out)["authenticated"] is False
    assert "credits authenticated: NO" in format_inspection(inspect_image(out))

    data, forged = out.read_bytes(), "M" * len(creator)  # a forged creator in the XMP summary (same length)
    out.write_bytes(data.replace(f"<fastattr:creator>{creator}<".encode(), f"<fastattr:creator>{forged}<".encode(), 1))
    report = inspect_image(out)
    assert report["agree"] is False
    assert report["disagreements"] == [f"xmp: credit 1 creator '{forged}' instead of '{creator}'"]

    out = save_with_attribution(rgb(), tmp_path / "again.png", attribution)
    side = sidecar_path(out)  # forged share and caption in the full JSON of the sidecar
    forged = json.loads(side.read_text())
    forged["credits"][2]["share"], forged["credits"][3]["caption"] = 0.9, "a forged caption"
    side.write_text(json.dumps(forged))
    problems = inspect_image(out)["disagreements"]
    assert f"sidecar: credit 3 share 0.9 instead of {attribution.credits[2].share}" in problems
    assert any(p.startswith("sidecar: credit 4 caption 'a forged caption'") for p in problems)


def test_a_credit_deleted_from_the_xmp_summary_is_a_disagreement(tmp_path):
    out = save_with_attribution(rgb(), tmp_path / "out.png", make_attribution(n=5))
    with Image.open(out) as image:
        texts = dict(image.text)
    last = texts["XML:com.adobe.xmp"].rindex('<rdf:li rdf:parseType="Resource">')
    end = texts["XML:com.adobe.xmp"].index("</rdf:li>", last) + len("</rdf:li>")
    texts["XML:com.adobe.xmp"] = texts["XML:com.adobe.xmp"][:last] + texts["XML:com.adobe.xmp"][end:]
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_itxt(key, value)
    rgb().save(out, pnginfo=info)
    report = inspect_image(out)
    assert report["carriers"]["xmp"]["credits"] == 4
    assert report["agree"] is False and report["disagreements"] == ["xmp: 4 credits instead of 5"]


def test_edits_outside_the_credits_are_named(tmp_path):
    """Bundle, encoder, share rule and creation time are part of the credits' provenance: a sidecar
    that changes them disagrees, field by field."""
    out = save_with_attribution(rgb(), tmp_path / "out.png", make_attribution())
    side = sidecar_path(out)
    forged = json.loads(side.read_text())
    forged["bundle"]["name"], forged["encoder"]["name"] = "Forged bundle", "evil"
    forged["share_rule"]["temperature"], forged["created"] = 99.0, "1999-01-01"
    side.write_text(json.dumps(forged))
    assert sorted(inspect_image(out)["disagreements"]) == [
        "sidecar: bundle name 'Forged bundle' instead of 'b'", "sidecar: created '1999-01-01' instead of "
        "'2025-01-01T00:00:00Z'", "sidecar: encoder name 'evil' instead of 'tiny'",
        "sidecar: share_rule temperature 99.0 instead of 0.05"]


def test_image_without_credits(tmp_path):
    path = tmp_path / "plain.png"
    rgb().save(path)
    assert read_attribution(path) == {}
    report = inspect_image(path)
    assert report["attribution"] is None and not any(c["present"] for c in report["carriers"].values())
    assert "no attribution found" in format_inspection(report)


# ----------------------------------------------------------------------------- in place

def add_private_chunk(path: Path) -> None:
    data = path.read_bytes()
    body = b"opaque private data"
    chunk = struct.pack(">I", len(body)) + b"prVt" + body + struct.pack(">I", zlib.crc32(b"prVt" + body))
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + chunk + data[iend:])


def test_write_in_place_png_keeps_everything_else(tmp_path):
    path = comfy_png(tmp_path / "img.png")
    add_private_chunk(path)
    with Image.open(path) as image:
        before_text, before_pixels = dict(image.text), image.tobytes()
    write_attribution_in_place(path, make_attribution(n=3))
    write_attribution_in_place(path, make_attribution(n=4))  # again: replaces, never duplicates
    with Image.open(path) as image:
        assert image.tobytes() == before_pixels
        assert {k: image.text[k] for k in before_text} == before_text
    types = png_chunk_types(path)
    assert types.count(b"prVt") == 1 and types.count(b"iTXt") == 3  # fastattr, XMP, Comment
    found = read_attribution(path)
    assert len(found["png"].credits) == 4 and len(found["sidecar"].credits) == 4
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_write_in_place_does_not_reencode(tmp_path, suffix):
    path = tmp_path / f"img{suffix}"
    rgb().save(path, quality=80)
    with Image.open(path) as image:
        before = image.tobytes()
    original = path.read_bytes()
    write_attribution_in_place(path, make_attribution())
    with Image.open(path) as image:
        assert image.tobytes() == before
    if suffix == ".jpg":  # the compressed scan itself is byte-identical
        assert path.read_bytes().endswith(original[original.index(b"\xff\xda"):])
    assert read_attribution(path)["exif"].to_dict() == make_attribution().to_dict()


def test_write_in_place_is_atomic(tmp_path, monkeypatch):
    path = comfy_png(tmp_path / "img.png")
    original = path.read_bytes()
    os.chmod(path, 0o644)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_attribution_in_place(path, make_attribution())
    assert path.read_bytes() == original
    assert leftovers(tmp_path) == []
    assert not sidecar_path(path).exists()

    monkeypatch.undo()
    write_attribution_in_place(path, make_attribution())
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(tmp_path) == [] and "png" in read_attribution(path)


# ----------------------------------------------------------------------------- errors

def test_unsupported_formats_and_unreadable_files(tmp_path):
    with pytest.raises(FastattrError, match=r"out\.gif.*\.png"):
        save_with_attribution(rgb(), tmp_path / "out.gif", make_attribution())
    with pytest.raises(FastattrError, match="'bmp'"):
        save_with_attribution(rgb(), tmp_path / "out.png", make_attribution(), format="bmp")
    gif = tmp_path / "in.gif"
    rgb().save(gif)
    with pytest.raises(FastattrError, match="GIF images are not supported"):
        read_attribution(gif)
    with pytest.raises(FastattrError, match="GIF"):
        write_attribution_in_place(gif, make_attribution())
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(FastattrError, match="junk.png: not a readable image"):
        inspect_image(junk)
    with pytest.raises(FastattrError, match="no such file"):
        read_attribution(tmp_path / "missing.png")
    with pytest.raises(FastattrError, match="PNG text keyword"):
        save_with_attribution(rgb(), tmp_path / "k.png", make_attribution(), extra_text={" bad": "x"})
    with pytest.raises(FastattrError, match="cannot write .*JPEG"):
        save_with_attribution(Image.new("RGBA", (4, 4)), tmp_path / "alpha.jpg", make_attribution())
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- C2PA

def make_signing_credentials(directory: Path, common_name: str = "fastattr test signer",
                             organization: str = "fastattr tests") -> C2paConfig:
    """Throwaway CA + end-entity certificate, made offline (extensions C2PA validators require); the
    CA's certificate, the trust anchor to give ``inspect_image``, is ``root.pem`` beside the chain."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastattr test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    chain, private = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    (directory / "root.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return C2paConfig(cert_chain=chain, private_key=private)


@pytest.mark.parametrize("name", ["signed.png", "signed.jpg", "signed.webp"])
def test_c2pa_round_trip(tmp_path, name):
    c2pa = pytest.importorskip("c2pa")
    config = make_signing_credentials(tmp_path)
    attribution = make_attribution(caption=NASTY)
    out = save_with_attribution(rgb(), tmp_path / name, attribution, c2pa=config)
    found = read_attribution(out)
    assert found["c2pa"].to_dict() == attribution.to_dict()
    assert set(found) == {"png" if name.endswith(".png") else "exif", "xmp", "sidecar", "c2pa"}
    with c2pa.Reader(str(out)) as reader:
        manifest = reader.get_active_manifest()
        assert reader.get_validation_state() == "Valid"  # signature fine, test CA not trusted
    actions = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    created = actions[0]["data"]["actions"][0]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == metadata.DIGITAL_SOURCE_TYPE
    report = inspect_image(out)
    assert report["agree"] is True and report["carriers"]["c2pa"]["validation_state"] == "Valid"


def trust_anchors_of(config: C2paConfig) -> Path:
    return Path(config.cert_chain).with_name("root.pem")


def test_a_self_signed_manifest_validates_but_is_not_authenticated(tmp_path):
    """The forgery trust anchors are for: Mallory replaces the credits and signs them with a
    certificate she made, naming whom she likes. The signature validates; the report names the
    signer and authenticates only a signer that chains to the anchors the user gave."""
    pytest.importorskip("c2pa")
    genuine = make_signing_credentials(tmp_path)
    (tmp_path / "mallory").mkdir()
    mallory = make_signing_credentials(tmp_path / "mallory", "Ana Artist", "Stability AI Ltd")
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution())
    write_attribution_in_place(out, make_attribution(creator="Mallory"), c2pa=mallory)
    for anchors, trust, words in ((trust_anchors_of(genuine), "untrusted", "signer not in your trust anchors"),
                                  (None, "unchecked", "signer not checked against a trust list")):
        report = inspect_image(out, trust_anchors=anchors)
        c2pa_report = report["carriers"]["c2pa"]
        assert (c2pa_report["validation_state"], c2pa_report["trust"]) == ("Valid", trust)
        assert c2pa_report["signer"] == "CN=Ana Artist, O=Stability AI Ltd"
        assert report["agree"] is True and report["authenticated"] is False
        assert ("credits authenticated: NO (C2PA manifest signed by CN=Ana Artist, O=Stability AI Ltd: valid "
                f"signature, {words}") in format_inspection(report)

    signed = save_with_attribution(rgb(), tmp_path / "g.png", make_attribution(), c2pa=genuine)
    report = inspect_image(signed, trust_anchors=trust_anchors_of(genuine))
    assert report["authenticated"] is True and report["carriers"]["c2pa"]["trust"] == "trusted"
    assert report["carriers"]["c2pa"]["validation_state"] == "Trusted"
    assert ("credits authenticated: yes (C2PA manifest signed by CN=fastattr test signer, O=fastattr tests, whose "
            "certificate chains to your trust anchors") in format_inspection(report)


def test_trust_anchors_that_cannot_be_used_are_refused_by_name(tmp_path):
    pytest.importorskip("c2pa")
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution(), c2pa=make_signing_credentials(tmp_path))
    (tmp_path / "text.pem").write_text("hello")
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for name, words in (("missing.pem", "cannot be read"), ("text.pem", "is not PEM"), ("garbage.pem", "cannot be used")):
        with pytest.raises(FastattrError, match=rf"^C2PA trust anchors {tmp_path / name} {words}"):
            inspect_image(out, trust_anchors=tmp_path / name)


def test_a_valid_manifest_is_the_reference_and_carriers_forged_beside_it_are_flagged(tmp_path):
    """What a validating manifest signed cannot have been edited since: the other carriers are checked
    against it and the credits shown are its own, whether its signer is trusted or not."""
    pytest.importorskip("c2pa")
    from fastattr_hook.metadata.c2pa import _sign_c2pa

    config = make_signing_credentials(tmp_path)
    genuine = make_attribution()
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution(creator="Mallory"))  # all forged ...
    out.write_bytes(_sign_c2pa(out.read_bytes(), "PNG", genuine, config, out))  # ... but what is signed
    for anchors in (None, trust_anchors_of(config)):
        report = inspect_image(out, trust_anchors=anchors)
        assert report["attribution"] == genuine.to_dict()
        assert report["authenticated"] is (anchors is not None) and report["agree"] is False
        for carrier in ("png", "xmp", "sidecar"):
            assert f"{carrier}: credit 1 creator 'Mallory0' instead of 'alice0'" in report["disagreements"]
        assert not any(problem.startswith("c2pa") for problem in report["disagreements"])


def test_c2pa_resign_in_place_and_tamper(tmp_path):
    pytest.importorskip("c2pa")
    config = make_signing_credentials(tmp_path)
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution(n=3), c2pa=config)
    write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    assert png_chunk_types(out).count(b"caBX") == 1
    assert len(read_attribution(out)["c2pa"].credits) == 4 and inspect_image(out)["agree"] is True

    write_attribution_in_place(out, make_attribution(n=4))  # unsigned rewrite drops the stale manifest
    assert b"caBX" not in png_chunk_types(out) and "c2pa" not in read_attribution(out)

    signed = save_with_attribution(rgb(), tmp_path / "t.jpg", make_attribution(), c2pa=config)
    data = signed.read_bytes()  # change the file outside the manifest (JPEG has no chunk CRCs)
    signed.write_bytes(data.replace(b'<?xpacket end="w"?>', b'<?xpacket end="r"?>'))
    report = inspect_image(signed)
    assert report["carriers"]["c2pa"]["validation_state"] == "Invalid"
    assert report["agree"] is False and report["disagreements"] == [
        "c2pa: manifest does not validate (the file changed after signing)"]


def test_c2pa_errors(tmp_path, monkeypatch):
    pytest.importorskip("c2pa")
    config = make_signing_credentials(tmp_path)
    with pytest.raises(FastattrError, match=r"missing\.pem cannot be read"):
        save_with_attribution(rgb(), tmp_path / "a.png", make_attribution(),
                              c2pa=C2paConfig(cert_chain=config.cert_chain, private_key=tmp_path / "missing.pem"))
    with pytest.raises(FastattrError, match="'rs1'"):
        save_with_attribution(rgb(), tmp_path / "a.png", make_attribution(),
                              c2pa=C2paConfig(config.cert_chain, config.private_key, alg="rs1"))
    with pytest.raises(FastattrError, match="C2PA signing of .*a.png failed"):
        save_with_attribution(rgb(), tmp_path / "a.png", make_attribution(),
                              c2pa=C2paConfig(config.cert_chain, config.private_key, alg="ps256"))
    monkeypatch.setitem(sys.modules, "c2pa", None)  # as if c2pa-python were not installed
    with pytest.raises(FastattrError, match=r"pip install 'fastattr\[c2pa\]'"):
        save_with_attribution(rgb(), tmp_path / "a.png", make_attribution(), c2pa=config)
    assert not (tmp_path / "a.png").exists() and leftovers(tmp_path) == []
    plain = save_with_attribution(rgb(), tmp_path / "b.png", make_attribution())
    report = inspect_image(plain)
    assert report["carriers"]["c2pa"] == {"present": False, "checked": False}
    assert "pip install 'fastattr[c2pa]'" in format_inspection(report)


def test_c2pa_assertion_signed_before_the_exact_json_copy_still_reads():
    from fastattr_hook.metadata.c2pa import _assertion_attribution

    attribution = make_attribution(caption=NASTY)
    assert _assertion_attribution(attribution.to_dict()).to_dict() == attribution.to_dict()


def _png_with_chunks(path: Path, chunks: list[tuple[bytes, bytes]]) -> Path:
    """A valid PNG with extra chunks inserted before IEND (CRCs computed)."""
    buffer = __import__("io").BytesIO()
    rgb().save(buffer, format="PNG")
    data = buffer.getvalue()
    extra = b"".join(struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))
                     for ctype, body in chunks)
    path.write_bytes(data[:-12] + extra + data[-12:])
    return path


def test_hostile_files_are_reported_and_a_batch_continues(tmp_path, capsys):
    from fastattr_cli import main

    good = save_with_attribution(rgb(), tmp_path / "good.png", make_attribution())
    bomb = zlib.compress(b"a" * 8_000_000, 9)  # each zTXt inflates to 8 MB; 30 of them: capped in total
    many = _png_with_chunks(tmp_path / "many.png", [(b"zTXt", b"k%d\x00\x00" % n + bomb) for n in range(30)])
    deep = _png_with_chunks(tmp_path / "deep.png", [(b"iTXt", b"fastattr\x00\x00\x00\x00\x00" + b"[" * 200_000)])
    wrong = _png_with_chunks(tmp_path / "wrong.png", [(b"iTXt", b"fastattr\x00\x00\x00\x00\x00" + json.dumps(
        {"schema": "fastattr/attribution@1", "prompt": 3, "credits": [{"rank": "x"}]}).encode())])
    fifo = tmp_path / "fifo.png"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    files = [many, deep, wrong, *([fifo] if fifo.exists() else []), good]
    assert main(["inspect", *map(str, files)]) == 1  # disagreements and errors, but no traceback and no hang
    out = capsys.readouterr().out
    assert "inflate beyond" in out and "nested too deeply" in out and str(good) in out
    assert out.count("carriers agree: yes") == 1  # the good file after the bad ones still gets its report
    if fifo.exists():
        assert "not a regular file" in out


def test_fuzzed_exif_claiming_gigabytes_is_refused_before_pillow_parses_it(tmp_path):
    """A 1 KB JPEG whose EXIF entry claims 0x40000000 LONGs: refused by our bounds walk, no allocation."""
    good = save_with_attribution(rgb(), tmp_path / "good.jpg", make_attribution())
    rgb().save(tmp_path / "fuzzed.jpg", exif=tiff([(0x010F, 4, 0x40000000, 26)]))
    with pytest.raises(FastattrError, match="EXIF block is corrupt .*claims 4294967296 bytes"):
        inspect_image(tmp_path / "fuzzed.jpg")
    assert inspect_image(good)["agree"] is True  # a sound block still reads


@pytest.mark.parametrize("block, problem", [
    # 4000 entries each claiming the same 40 KB: each fits, but a parser copies each (160 MB)
    (tiff([(0x1000 + n, 7, 40_000, 8) for n in range(4000)]), r"entries claim \d+ bytes in all"),
    # an Exif IFD pointer typed SHORT: Pillow would follow its first 2 bytes, the walk its 4
    (tiff([(0x8769, 3, 1, 0x00020000)]), "0x8769 is not one LONG offset"),
    (tiff([(0x8769, 4, 1, 8)]), "IFD loop"),  # the Exif IFD is IFD0 again
], ids=["overlapping", "short-pointer", "loop"])
def test_hostile_exif_is_refused_in_bounded_memory(tmp_path, block, problem):
    path = tmp_path / "hostile.webp"  # WebP: Pillow does not parse EXIF on open, so this is all ours
    rgb().save(path, exif=block)
    original = path.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(FastattrError, match=f"hostile.webp: its EXIF block is corrupt .*{problem}.*strip it"):
            inspect_image(path)
        with pytest.raises(FastattrError, match=problem):
            write_attribution_in_place(path, make_attribution())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    assert path.read_bytes() == original and leftovers(tmp_path) == []


def test_exif_interoperates_with_piexif(tmp_path):
    """piexif (what A1111 reads and wrote with, and what fastattr wrote with before Pillow) as a second
    reader of ours, and as the writer of a file fastattr must still read and rewrite."""
    piexif = pytest.importorskip("piexif")
    from piexif.helper import UserComment

    text = {"prompt": '{"3": "é"}', "workflow": "wörk"}
    plain = make_attribution()
    nasty = make_attribution(caption=NASTY)
    for name, attribution in (("a.jpg", plain), ("b.webp", plain), ("c.jpg", nasty), ("d.webp", nasty)):
        out = save_with_attribution(rgb(), tmp_path / name, attribution, extra_text=text)
        with Image.open(out) as image:
            block = image.info["exif"]
        loaded = piexif.load(block if block.startswith(b"Exif") else b"Exif\x00\x00" + block)
        assert Attribution.from_json(UserComment.load(loaded["Exif"][piexif.ExifIFD.UserComment])).to_dict() \
            == attribution.to_dict(), name
        assert loaded["0th"][piexif.ImageIFD.Model] == 'prompt:{"3": "é"}'.encode()
        assert loaded["0th"][piexif.ImageIFD.Make] == "workflow:wörk".encode()

    old = tmp_path / "old.jpg"  # exactly what the piexif-based writer put in a JPEG
    rgb().save(old, exif=piexif.dump({
        "0th": {piexif.ImageIFD.Model: 'prompt:{"3": "é"}'.encode(), piexif.ImageIFD.Make: "workflow:wörk".encode()},
        "Exif": {piexif.ExifIFD.UserComment: UserComment.dump(nasty.to_json(), "unicode")}}))
    assert read_attribution(old)["exif"].to_dict() == nasty.to_dict()
    assert inspect_image(old)["other_metadata"] == {"parameters": None, "prompt": True, "workflow": True}
    write_attribution_in_place(old, plain)
    assert read_attribution(old)["exif"].to_dict() == plain.to_dict()
    loaded = piexif.load(str(old))
    assert loaded["0th"][piexif.ImageIFD.Make] == "workflow:wörk".encode()  # not '?' for the non-ASCII
    assert UserComment.load(loaded["Exif"][piexif.ExifIFD.UserComment]) == plain.to_json()
