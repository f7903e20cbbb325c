"""Encoder specs, backbones, the published head layout and score orientation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastattr_hook.encoder import Encoder, Reference
from fastattr_hook.errors import FastattrError
from fastattr_hook.head import AttributionHead, load_head, save_head

ROOT = Path(__file__).resolve().parent.parent


def _published_state_dict(in_features=128, hidden=32, out=16, scale=-3.0):
    """The authors' checkpoint layout: mlp.layers.{i}, mlp.output_layer, scale, bias."""
    g = torch.Generator().manual_seed(0)
    state = {}
    widths = [in_features, hidden, hidden, hidden]
    for i in range(3):
        state[f"mlp.layers.{i}.weight"] = torch.randn(widths[i + 1], widths[i], generator=g) * 0.1
        state[f"mlp.layers.{i}.bias"] = torch.randn(widths[i + 1], generator=g) * 0.1
    state["mlp.output_layer.weight"] = torch.randn(out, hidden, generator=g) * 0.1
    state["mlp.output_layer.bias"] = torch.zeros(out)
    state["scale"] = torch.tensor([scale])
    state["bias"] = torch.tensor([0.5])
    return state


def test_published_head_layout_loads_with_weights_only(tmp_path):
    state = _published_state_dict()
    torch.save(state, tmp_path / "head.pt")
    head = load_head(tmp_path / "head.pt")
    assert (head.in_features, head.out_features) == (128, 16)
    x = torch.randn(4, 128)
    expected = x
    for i in range(3):
        expected = torch.relu(expected @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"])
    expected = expected @ state["mlp.output_layer.weight"].T + state["mlp.output_layer.bias"]
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert head.scale.item() == -3.0 and head.bias.item() == 0.5
    save_head(head, tmp_path / "head.safetensors")
    again = load_head(tmp_path / "head.safetensors")
    assert torch.equal(again(x), head(x))


def test_head_refuses_pickled_objects_and_wrong_layouts(tmp_path):
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2), "payload": object()}, tmp_path / "evil.pt")
    with pytest.raises(FastattrError, match="not a loadable torch state_dict"):
        load_head(tmp_path / "evil.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(FastattrError, match="not an attribution head"):
        load_head(tmp_path / "other.pt")


def test_untuned_encoder_concatenates_normalised_features(micro_sandbox):
    encoder = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu")
    assert encoder.dim == 128 and encoder.head is None
    image = Image.open(next((micro_sandbox / "data" / "images").glob("*.png")))
    vectors = encoder.embed([image, np.asarray(image), torch.from_numpy(np.asarray(image) / 255.0)],
                            ["a red circle"] * 3)
    assert vectors.shape == (3, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[1], atol=1e-6) and np.allclose(vectors[0], vectors[2], atol=1e-3)
    # each backbone contributes half of the unit vector
    assert np.allclose(np.linalg.norm(vectors[:, :64], axis=1), np.sqrt(0.5), atol=1e-5)


def _absolute_spec(sandbox) -> dict:
    """The sandbox's untuned spec with absolute paths, to be written anywhere."""
    spec = yaml.safe_load((sandbox / "encoder.yaml").read_text())
    for b in spec["backbones"]:
        b["model"] = "local-dir:" + str(sandbox / "clip")
        if b.get("tokenizer"):
            b["tokenizer"] = str(sandbox / "pipeline" / "tokenizer")
    return spec


def _spec_with_head(sandbox, tmp_path, scale):
    head = AttributionHead(128, 32, 16)
    with torch.no_grad():
        head.scale.fill_(scale)
    save_head(head, tmp_path / f"head{scale}.safetensors")
    spec = _absolute_spec(sandbox)
    spec["head"] = str(tmp_path / f"head{scale}.safetensors")
    path = tmp_path / f"encoder{scale}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_orientation_higher_score_means_more_influence(micro_sandbox, tmp_path):
    image = Image.open(next((micro_sandbox / "data" / "images").glob("*.png")))
    negative = Encoder.from_yaml(_spec_with_head(micro_sandbox, tmp_path, -2.0), device="cpu")
    positive = Encoder.from_yaml(_spec_with_head(micro_sandbox, tmp_path, 2.0), device="cpu")
    assert negative.orientation == 1.0 and positive.orientation == -1.0
    for encoder in (negative, positive):
        item = encoder.embed([image], ["a caption"], role="item")
        query = encoder.embed([image], ["a caption"], role="query")
        # identical inputs: cosine 1. With a positive scale a HIGH cosine means LOW influence (label = rank
        # fraction), so the oriented score of an identical item must be the lowest possible.
        assert float((query @ item.T)[0, 0]) == pytest.approx(encoder.orientation, abs=1e-5)


def test_tower_tokens_are_what_each_tower_holds_before_its_projection(micro_sandbox, tmp_path):
    def encoder(name, **outputs):
        spec = _absolute_spec(micro_sandbox)
        for b in spec["backbones"]:
            b.update(outputs.get(b["kind"], {}))
        (tmp_path / name).write_text(yaml.safe_dump(spec))
        return Encoder.from_yaml(tmp_path / name, device="cpu")

    plain, tokens = encoder("plain.yaml"), encoder("tokens.yaml", open_clip_image={"output": "tokens"})
    visual = tokens.backbones[0].model.visual
    width = visual.transformer.width
    assert tokens.feature_dim == 2 * width + 64 and plain.feature_dim == 64 + 64
    image = Image.open(next((micro_sandbox / "data" / "images").glob("*.png")))
    batch = [x[None] for x in tokens.preprocess(image, "a red circle")]
    got, want = tokens.features_prepared(batch), plain.features_prepared(batch)
    with torch.inference_mode():
        torch.testing.assert_close(got[:, :width] @ visual.proj, want[:, :64])  # the class token CLIP projects
        visual.output_tokens = True
        try:
            _, patches = visual(batch[0])
        finally:
            visual.output_tokens = False
    torch.testing.assert_close(got[:, width:2 * width], patches.mean(dim=1))
    assert torch.equal(got[:, 2 * width:], want[:, 64:])  # the text tower is untouched
    assert tokens.backbone_fingerprint != plain.backbone_fingerprint
    assert encoder("default.yaml", open_clip_image={"output": "embedding"}).fingerprint == plain.fingerprint
    # the default leaves fingerprints as they were before the key existed: a record made then still matches
    from fastattr_sandbox.build import DEFAULT_SANDBOX

    made_before = json.loads((ROOT / "benchmarks/results/distill_experiments/top50_4k_2runs_train.json").read_text())
    assert Encoder.from_yaml(DEFAULT_SANDBOX / "encoder.yaml", device="cpu").backbone_fingerprint == \
        made_before["backbones"]

    # the text tower: its end token (what CLIP projects) and the mean token over the prompt, padding left out
    text = encoder("text.yaml", open_clip_text={"output": "tokens"})
    model = text.backbones[1].model
    text_width = model.transformer.width
    assert text.feature_dim == 64 + 2 * text_width
    prompts = ["a red circle", "a small blue square at the top on a dotted beige background"]
    ids = torch.stack([text.backbones[1].prepare(image, p) for p in prompts])
    got = text.backbones[1].forward(ids)
    with torch.inference_mode():
        torch.testing.assert_close(got[:, :text_width] @ model.text_projection, model.encode_text(ids))
        repadded = ids.clone()
        for row in repadded:  # the padding after the first end token is the same id; other padding, same tokens
            row[int(row.argmax()) + 1:] = 0
        assert not torch.equal(repadded, ids)
        torch.testing.assert_close(text.backbones[1].forward(repadded), got)
        # the mean is over the prompt: a hand-made mean over every position differs
        x = model.ln_final(model.transformer(model.token_embedding(ids) + model.positional_embedding,
                                             attn_mask=model.attn_mask))
        assert not torch.allclose(got[:, text_width:], x.mean(dim=1))
    assert torch.equal(text.features_prepared([x[None] for x in text.preprocess(image, "a red circle")])[:, :64],
                       want[:, :64])  # the image tower is untouched

    spec = _absolute_spec(micro_sandbox)
    spec["backbones"] = [{"kind": "timm_image", "model": "vit_tiny_patch16_224", "output": "tokens"}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FastattrError, match="backbone timm_image has no output 'tokens'; only open_clip backbones"):
        Encoder.from_yaml(tmp_path / "bad.yaml", device="cpu")


def test_head_width_mismatch_is_a_clear_error(micro_sandbox, tmp_path):
    save_head(AttributionHead(99, 8, 8), tmp_path / "bad.safetensors")
    spec = yaml.safe_load(_spec_with_head(micro_sandbox, tmp_path, -1.0).read_text())
    spec["head"] = str(tmp_path / "bad.safetensors")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FastattrError, match="expects 99-d input but the backbones give 128-d"):
        Encoder.from_yaml(tmp_path / "bad.yaml", device="cpu")


def test_fingerprint_follows_content_not_location(micro_sandbox, tmp_path):
    copy = tmp_path / "moved"
    for part in ("clip", "pipeline/tokenizer"):
        shutil.copytree(micro_sandbox / part, copy / part)
    shutil.copy(micro_sandbox / "encoder.yaml", copy / "encoder.yaml")
    original = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu").fingerprint
    assert Encoder.from_yaml(copy / "encoder.yaml", device="cpu").fingerprint == original
    config = copy / "clip" / "open_clip_config.json"
    config.write_text(config.read_text().replace('"interpolation": "bicubic"', '"interpolation": "bilinear"'))
    assert Encoder.from_yaml(copy / "encoder.yaml", device="cpu").fingerprint != original


def test_timm_backbone_loads_local_weights_with_method_preprocessing(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    (tmp_path / "enc.yaml").write_text(yaml.safe_dump({
        "name": "tiny-vit", "batch_size": 2,
        "backbones": [{"kind": "timm_image", "model": "vit_tiny_patch16_224", "weights": "vit.safetensors"}]}))
    encoder = Encoder.from_yaml(tmp_path / "enc.yaml", device="cpu")
    transform = encoder.backbones[0].transform.transforms
    assert transform[0].size == 256 and transform[0].interpolation.value == "bicubic"
    assert transform[1].size == (224, 224)
    assert tuple(transform[3].mean) == (0.485, 0.456, 0.406)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval()(encoder.backbones[0].prepare(image, "")[None]), dim=-1)
    got = encoder.embed([image], [""])
    assert np.allclose(got, expected.numpy(), atol=1e-5)


def test_unknown_spec_key_names_key_and_file(tmp_path):
    (tmp_path / "enc.yaml").write_text("name: x\nbackbones: []\nheads: h.safetensors\n")
    with pytest.raises(FastattrError, match=r"enc\.yaml: unknown key 'heads'"):
        Encoder.from_yaml(tmp_path / "enc.yaml")


def test_one_rule_resolves_every_weights_reference(tmp_path):
    from fastattr_hook.encoder import resolve_reference

    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "clip").mkdir()
    assert resolve_reference(tmp_path, "openai") == Reference("name", "openai")  # an open_clip pretrained tag
    assert resolve_reference(tmp_path, "ViT-B-32").kind == "name"
    assert resolve_reference(tmp_path, "hf-hub:org/model") == Reference("hub", "hf-hub:org/model")
    assert resolve_reference(tmp_path, "w.safetensors") == Reference("path", str(tmp_path / "w.safetensors"))
    assert resolve_reference(tmp_path, "sub/other.bin") == Reference("path", str(tmp_path / "sub" / "other.bin"))
    assert resolve_reference(tmp_path, "local-dir:clip") == Reference("dir", str(tmp_path / "clip"))
    assert str(resolve_reference(tmp_path, "local-dir:clip")) == f"local-dir:{tmp_path / 'clip'}"


def test_a_pretrained_tag_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    """README: `weights: openai` for open_clip towers; offline and not cached, the error says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    spec = tmp_path / "encoder.yaml"
    spec.write_text("name: x\nbackbones:\n  - {kind: open_clip_text, model: RN50, weights: openai}\n")
    with pytest.raises(FastattrError, match="weights: openai.*local Hugging Face cache"):
        Encoder.from_yaml(spec, device="cpu")
