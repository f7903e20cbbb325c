"""Property-based round trips: arbitrary credits come back exactly from every carrier, or are refused.

Every carrier that holds the full JSON (PNG iTXt, EXIF UserComment, sidecar, C2PA) must give back
``to_dict()`` unchanged; the XMP summary must give back its fields (rank, id, creator, share, k,
fingerprints) less the characters XML 1.0 cannot hold, nothing else. What standard JSON cannot hold
(lone surrogates, NaN, infinity) must be refused with a FastattrError before anything is written.
A damaged EXIF block must be read, rewritten or refused with a FastattrError, in bounded memory.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from fastattr_hook.attribution import SCHEMA, Attribution, Credit
from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import (DIGITAL_SOURCE_TYPE, XMP_TOP, C2paConfig, inspect_image, read_attribution,
                                    save_with_attribution, write_attribution_in_place)
from fastattr_hook.metadata.exif import _OUR_JSON_PREFIX, _exif_bytes, _exif_texts, _load_exif, _user_comment

# What XML 1.0 cannot hold (its Char production); the XMP summary drops these, nothing else.
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Short pieces that break naive writers: markup, JSON and EXIF look-alikes, controls, non-characters.
PIECES = ["", "<", ">", "&", "&amp;", "]]>", "<![CDATA[", "<!--", "<!DOCTYPE", '"', "'", "\\", "\\u0000",
          "\x00", "\x07", "\x1b", "\x7f", "\x85", "\t", "\n", "\r", "\r\n", " ", "\ufeff", "\ufffe", "\uffff",
          "\u2028", "é", "猫", "\U0001f3a8", '{"schema": "fastattr/attribution@1"}', "ASCII\x00\x00\x00"]
# Bounded so the JSON stays under the 64 KB a JPEG segment holds: truncation has its own test.
TEXT = st.text(max_size=24) | st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
INT = st.integers(-2**63, 2**63 - 1)

CREDIT = st.builds(Credit, rank=INT, key=INT, id=TEXT, score=FLOAT, share=FLOAT, caption=TEXT,
                   creator=st.none() | TEXT, license=st.none() | TEXT, source_url=st.none() | TEXT)
ATTRIBUTION = st.builds(
    Attribution, prompt=TEXT, credits=st.lists(CREDIT, min_size=1, max_size=20),
    encoder=st.fixed_dictionaries({}, optional={"name": TEXT, "fingerprint": TEXT}),
    bundle=st.fixed_dictionaries({}, optional={"name": TEXT, "fingerprint": TEXT, "items": INT}),
    share_rule=st.fixed_dictionaries({"name": TEXT, "temperature": FLOAT}),
    timing_ms=st.dictionaries(TEXT, FLOAT, max_size=3), created=TEXT, truncated=st.booleans(),
    credits_total=st.none() | st.integers(0, 2**31))

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}
SUFFIXES = list(FORMATS)
_PLAIN: dict[str, bytes] = {}


def plain_image(suffix: str) -> bytes:
    """A 16x16 file without metadata, for writing in place."""
    if suffix not in _PLAIN:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, FORMATS[suffix])
        _PLAIN[suffix] = buffer.getvalue()
    return _PLAIN[suffix]


def write(directory: Path, suffix: str, attribution: Attribution, in_place: bool, **options) -> Path:
    path = directory / f"out{suffix}"
    if in_place:
        path.write_bytes(plain_image(suffix))
        return write_attribution_in_place(path, attribution, **options)
    return save_with_attribution(Image.new("RGB", (16, 16), (200, 30, 90)), path, attribution, **options)


def xml_clean(value: str) -> str:
    return NOT_XML.sub("", value)


def expected_xmp(attribution: Attribution) -> dict:
    """The summary the XMP carrier documents: top credits' rank/id/creator/share, k, fingerprints."""
    return {
        "digital_source_type": DIGITAL_SOURCE_TYPE, "schema": SCHEMA, "k": attribution.k,
        "encoder_fingerprint": xml_clean(attribution.encoder.get("fingerprint", "")),
        "bundle_fingerprint": xml_clean(attribution.bundle.get("fingerprint", "")),
        "credits": [{"rank": c.rank, "id": xml_clean(c.id), "share": c.share,
                     "creator": None if c.creator is None else xml_clean(c.creator)}
                    for c in attribution.credits[:XMP_TOP]],
    }


def is_json(attribution: Attribution) -> bool:
    """Standard JSON in UTF-8 can hold it: no NaN/infinity (creator shares are sums), no lone surrogates."""
    try:
        json.dumps(attribution.to_dict(), ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # UnicodeEncodeError is one too
        return False
    return True


def check_round_trip(suffix: str, attribution: Attribution, in_place: bool, c2pa: C2paConfig | None = None) -> None:
    """Every carrier gives the attribution back exactly, or the writer refuses it and writes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        if not is_json(attribution):
            with pytest.raises(FastattrError, match="NaN or infinity|lone surrogate"):
                write(Path(tmp), suffix, attribution, in_place, c2pa=c2pa)
            assert sorted(p.name for p in Path(tmp).iterdir()) == ([f"out{suffix}"] if in_place else [])
            assert not in_place or (Path(tmp) / f"out{suffix}").read_bytes() == plain_image(suffix)
            return
        out = write(Path(tmp), suffix, attribution, in_place, c2pa=c2pa)
        found = read_attribution(out)
        embedded = "png" if suffix == ".png" else "exif"
        assert set(found) == {embedded, "xmp", "sidecar", *(["c2pa"] if c2pa else [])}
        for name in (embedded, "sidecar", *(["c2pa"] if c2pa else [])):
            assert found[name].to_dict() == attribution.to_dict(), name
        assert found["xmp"] == expected_xmp(attribution)
        report = inspect_image(out, trust_anchors=c2pa and Path(c2pa.cert_chain).with_name("root.pem"))
        assert report["agree"] is True, report["disagreements"]
        assert report["authenticated"] is (c2pa is not None)


# Shares this large make a creator's summed share infinite, which JSON cannot hold: refused.
OVERFLOW = Attribution(prompt="", credits=[Credit(rank=n, key=n, id="", score=0.0, share=1.7976931348623157e308)
                                           for n in (1, 2)])


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(max_examples=30, deadline=None)
@given(attribution=ATTRIBUTION, in_place=st.booleans())
@example(attribution=OVERFLOW, in_place=False)
def test_every_carrier_round_trips_arbitrary_credits(suffix, attribution, in_place):
    check_round_trip(suffix, attribution, in_place)


@pytest.fixture(scope="module")
def c2pa_config(tmp_path_factory) -> C2paConfig:
    pytest.importorskip("c2pa")
    from test_metadata import make_signing_credentials

    return make_signing_credentials(tmp_path_factory.mktemp("c2pa"))


# c2pa re-parses its manifest: 1 float in ~10 moved by one ulp, arrays of numbers turned into bytes.
C2PA_LOSSY = Attribution(prompt="", credits=[Credit(rank=1, key=0, id="", score=0.012345678901234567, share=0.0)],
                         bundle={"shards": [1, 2, 3]}, share_rule={"name": "", "temperature": 5.908735849795736e-67})


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(max_examples=8, deadline=None)  # signing: ~0.1 s an example
@given(attribution=ATTRIBUTION, in_place=st.booleans())
@example(attribution=C2PA_LOSSY, in_place=False)
def test_c2pa_round_trips_arbitrary_credits(suffix, attribution, in_place, c2pa_config):
    check_round_trip(suffix, attribution, in_place, c2pa=c2pa_config)


TEXT_FIELDS = ["prompt", "id", "caption", "creator", "license", "source_url"]
POISON = (st.tuples(st.sampled_from(TEXT_FIELDS), st.characters(categories=["Cs"]))
          | st.tuples(st.sampled_from(["score", "share"]), st.sampled_from([math.nan, math.inf, -math.inf])))


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(max_examples=15, deadline=None)
@given(attribution=ATTRIBUTION, poison=POISON, which=st.integers(0, 19), in_place=st.booleans())
@example(attribution=Attribution(prompt="", credits=[Credit(rank=1, key=0, id="", score=0.0, share=0.0)]),
         poison=("caption", "\udc80"), which=0, in_place=False)  # was a raw UnicodeEncodeError
def test_text_that_is_not_unicode_and_numbers_that_are_not_json_are_refused(suffix, attribution, poison, which,
                                                                         in_place):
    field, bad = poison
    attribution = copy.deepcopy(attribution)  # the explicit example is shared by every suffix
    target = attribution if field == "prompt" else attribution.credits[which % len(attribution.credits)]
    setattr(target, field, (getattr(target, field) or "") + bad if isinstance(bad, str) else bad)
    check_round_trip(suffix, attribution, in_place)


SEED_CREDITS = Attribution(prompt="é", credits=[Credit(rank=1, key=1, id="a", score=1.0, share=1.0)])


def camera_exif() -> bytes:
    """What cameras and tools write (IFD0 text and numbers, an Exif IFD with a MakerNote, a GPS IFD),
    plus our UNICODE UserComment and ComfyUI-style text: the block that fuzzing damages."""
    exif = Image.Exif()
    exif[ExifTags.Base.Artist], exif[ExifTags.Base.Orientation], exif[ExifTags.Base.XResolution] = "Jane", 3, 72.0
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[ExifTags.Base.DateTimeOriginal], sub[ExifTags.Base.ExposureTime] = "2024:01:01 00:00:00", 0.01
    sub[ExifTags.Base.MakerNote], sub[ExifTags.Base.ExifVersion] = b"MAKER" * 10, b"0232"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", (1.0, 2.0, 3.0)
    return _exif_bytes(exif.tobytes(), SEED_CREDITS, {"workflow": "wörk"}, 65536, None, Path("seed"))


SEED = camera_exif()
WORDS = st.sampled_from([0, 1, 2, 4, 7, 8, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]).map(lambda w: struct.pack(">I", w))
# Overwrites after the "Exif\0\0" header: single bytes, or counts/types/offsets that bite.
EDITS = st.lists(st.tuples(st.integers(6, len(SEED) - 4), st.binary(min_size=1, max_size=1) | WORDS),
                 min_size=1, max_size=8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damaged entries it is given
@settings(max_examples=150, deadline=None)
@given(edits=EDITS)
def test_fuzzed_exif_is_read_and_rewritten_or_refused_in_bounded_memory(edits):
    """Any damage to a real block: reading gives text or a FastattrError; rewriting gives a block
    whose UserComment is the new credits (or a foreign comment, kept) or a FastattrError; ~1 KB in,
    never more than a few MB allocated."""
    block = bytearray(SEED)
    for at, value in edits:
        block[at:at + len(value)] = value
    attribution = Attribution(prompt="new", credits=[Credit(rank=1, key=2, id="b", score=0.5, share=1.0)])
    tracemalloc.start()
    try:
        try:
            exif = _load_exif(bytes(block), Path("fuzzed.jpg"))
            _user_comment(exif)
            _exif_texts(exif)
            rewritten = _exif_bytes(bytes(block), attribution, {}, 65536, 65533, Path("fuzzed.jpg"))
        except FastattrError as exc:
            assert str(exc).startswith("fuzzed.jpg: its EXIF") and "strip it" in str(exc)
        else:
            comment = _user_comment(_load_exif(rewritten, Path("rewritten.jpg")))
            assert comment == attribution.to_json() or (comment and not comment.startswith(_OUR_JSON_PREFIX))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
