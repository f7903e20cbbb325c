"""Writing credits into a file that already carries a C2PA manifest chains that manifest as the
parentOf ingredient of ours, instead of dropping it (issue 15, "Trust")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_metadata import make_attribution, make_signing_credentials, rgb, trust_anchors_of

from fastattr_hook import __version__
from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import (DIGITAL_SOURCE_TYPE, C2paConfig, format_inspection, inspect_image,
                                    read_attribution, save_with_attribution, write_attribution_in_place)

c2pa = pytest.importorskip("c2pa")

DIGITAL_CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> C2paConfig:
    return make_signing_credentials(tmp_path_factory.mktemp("c2pa"))


def store(path: Path) -> tuple[str, dict, str]:
    """Active manifest label, all manifests by label, validation state."""
    with c2pa.Reader(str(path)) as reader:
        data = json.loads(reader.json())
        return data["active_manifest"], data["manifests"], reader.get_validation_state()


def parents(manifest: dict) -> list[dict]:
    return [i for i in manifest.get("ingredients", []) if i.get("relationship") == "parentOf"]


def action_names(manifest: dict) -> list[str]:
    return [action["action"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")
            for action in a["data"]["actions"]]


@pytest.mark.parametrize("name", ["s.png", "s.jpg", "s.webp"])
def test_signing_again_chains_the_previous_manifest_as_parent(tmp_path, config, name):
    out = save_with_attribution(rgb(), tmp_path / name, make_attribution(n=3), c2pa=config)
    first, _, _ = store(out)

    write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    active, manifests, state = store(out)
    assert active != first and state == "Valid"  # signature fine, test CA not trusted
    manifest = manifests[active]
    [parent] = parents(manifest)
    assert parent["active_manifest"] == first and parent["title"] == name
    assert action_names(manifest) == ["c2pa.opened", "c2pa.edited.metadata"]
    opened = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"][0]
    assert len(opened["parameters"]["ingredients"]) == 1  # it points at the parent

    assert len(read_attribution(out)["c2pa"].credits) == 4  # our (active) manifest is the reference
    report = inspect_image(out, trust_anchors=trust_anchors_of(config))
    c2pa_report = report["carriers"]["c2pa"]
    assert report["agree"] is True and report["authenticated"] is True
    assert c2pa_report["validation_state"] == "Trusted"
    assert c2pa_report["parent"] == f"{name} (fastattr {__version__})"
    assert c2pa_report["digital_source_type"] == DIGITAL_SOURCE_TYPE  # from the manifest that created it
    assert f"parent: {name} (fastattr {__version__})" in format_inspection(report)


def test_each_signing_adds_a_link(tmp_path, config):
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution(n=2), c2pa=config)
    write_attribution_in_place(out, make_attribution(n=3), c2pa=config)
    second, _, _ = store(out)
    write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    active, manifests, state = store(out)
    assert state == "Valid" and len(manifests) == 3
    [parent] = parents(manifests[active])
    assert parent["active_manifest"] == second and len(parents(manifests[second])) == 1
    assert len(read_attribution(out)["c2pa"].credits) == 4 and inspect_image(out)["agree"] is True


def test_another_tools_manifest_becomes_the_parent(tmp_path, config):
    """The case the chain is for: a camera or another tool signed the image first."""
    camera = tmp_path / "photo.jpg"
    rgb().save(camera, format="JPEG")
    manifest = {"claim_generator_info": [{"name": "Camera", "version": "1.0"}], "title": "photo.jpg",
                "format": "image/jpeg",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": DIGITAL_CAPTURE}]}}]}
    info = c2pa.C2paSignerInfo(alg="es256", sign_cert=Path(config.cert_chain).read_bytes(),
                               private_key=Path(config.private_key).read_bytes(), ta_url=None)
    signed = io.BytesIO()
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/jpeg", io.BytesIO(camera.read_bytes()), signed)
    camera.write_bytes(signed.getvalue())
    first, _, _ = store(camera)

    write_attribution_in_place(camera, make_attribution(), c2pa=config)
    active, manifests, state = store(camera)
    assert state == "Valid" and parents(manifests[active])[0]["active_manifest"] == first
    report = inspect_image(camera, trust_anchors=trust_anchors_of(config))
    assert report["agree"] is True and report["authenticated"] is True
    assert report["carriers"]["c2pa"]["parent"] == "photo.jpg (Camera 1.0)"
    assert report["carriers"]["c2pa"]["digital_source_type"] == DIGITAL_CAPTURE


def test_no_previous_manifest_no_ingredient(tmp_path, config):
    out = save_with_attribution(rgb(), tmp_path / "s.png", make_attribution())
    write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    active, manifests, state = store(out)
    assert state == "Valid" and len(manifests) == 1 and parents(manifests[active]) == []
    assert action_names(manifests[active]) == ["c2pa.created"]
    assert "parent" not in inspect_image(out)["carriers"]["c2pa"]

    # a new encoding is not derived from the file it replaces: nothing to chain
    again = save_with_attribution(rgb(), out, make_attribution(), c2pa=config)
    assert len(store(again)[1]) == 1


def test_an_unreadable_previous_manifest_is_an_error_not_silently_dropped(tmp_path, config):
    out = save_with_attribution(rgb(), tmp_path / "s.jpg", make_attribution(), c2pa=config)
    data = out.read_bytes()
    at = data.index(b"c2pa.signature") + 200  # garble the claim signature box inside APP11
    broken = data[:at] + bytes(50) + data[at + 50:]
    out.write_bytes(broken)
    with pytest.raises(FastattrError, match=r"manifest already in .*s\.jpg cannot be read.*without a C2paConfig"):
        write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    assert out.read_bytes() == broken
    write_attribution_in_place(out, make_attribution(n=4))  # the remedy the error names
    write_attribution_in_place(out, make_attribution(n=4), c2pa=config)
    report = inspect_image(out, trust_anchors=trust_anchors_of(config))
    assert report["authenticated"] is True and "parent" not in report["carriers"]["c2pa"]
