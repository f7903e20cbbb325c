"""The sandbox world: deterministic data, a genuine diffusers pipeline, shipped artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fastattr_hook.files import sha256_file
from fastattr_hook.errors import FastattrError
from fastattr_sandbox import build, world


def test_generator_is_deterministic(tmp_path):
    config = world.WorldConfig(seed=3, num_images=40, num_creators=20, motif_images=3, num_query_prompts=10)
    world.generate(config, tmp_path / "a")
    world.generate(config, tmp_path / "b")
    world.generate(world.WorldConfig(seed=4, num_images=40, num_creators=20, motif_images=3), tmp_path / "c")
    a, b, c = ((tmp_path / d / "manifest.jsonl").read_text() for d in "abc")
    assert a == b and a != c
    for row in map(json.loads, a.splitlines()):
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()


def test_manifest_is_valid_and_held_out_prompts_are_unseen(micro_sandbox):
    data = micro_sandbox / "data"
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == build.models.SCALES["micro"]["world"]["num_images"]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert {"id", "image", "caption", "creator", "license", "source_url", "sha256"} <= set(row)
        assert row["caption"] and row["creator"] and row["license"] in world.LICENSES
        assert sha256_file(data / row["image"]) == row["sha256"]
    assert 20 <= len({r["creator"] for r in rows}) <= 50
    motifs = [r["attributes"]["motif"] for r in rows if r["attributes"]["motif"]]
    assert {m: motifs.count(m) for m in world.MOTIFS} == {m: 4 for m in world.MOTIFS}  # rare: a handful each
    seen = {(r["attributes"]["colour"], r["attributes"]["shape"], r["attributes"]["bg"]) for r in rows}
    queries = [json.loads(line) for line in (data / "query_prompts.jsonl").read_text().splitlines()]
    assert queries
    for q in queries:
        a = q["attributes"]
        assert (a["colour"], a["shape"], a["bg"]) not in seen


def test_pipeline_exposes_cross_attention_kv(micro_pipeline):
    names = [n for n, _ in micro_pipeline.unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("attn2.to_v") for n in names)
    assert type(micro_pipeline).__name__ == "StableDiffusionPipeline"


def test_callback_called_every_step_with_requested_tensors(micro_pipeline):
    calls = []

    def callback(pipe, step_index, timestep, kwargs):
        calls.append((step_index, sorted(kwargs)))
        return kwargs

    micro_pipeline(["a red circle"], num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                   output_type="latent")
    assert [c[0] for c in calls] == list(range(6))
    assert all(c[1] == ["latents", "prompt_embeds"] for c in calls)


def test_last_step_latents_replacement_is_honoured(micro_pipeline):
    def replace_last(pipe, step_index, timestep, kwargs):
        if step_index == pipe.num_timesteps - 1:
            kwargs["latents"] = torch.full_like(kwargs["latents"], 0.25)
        return kwargs

    out = micro_pipeline(["a red circle", "a blue square"], num_inference_steps=4, output_type="latent",
                         generator=torch.Generator().manual_seed(0), callback_on_step_end=replace_last,
                         callback_on_step_end_tensor_inputs=["latents"])
    assert torch.equal(out.images, torch.full_like(out.images, 0.25))


def test_generation_is_deterministic_for_a_seed(micro_sandbox):
    first = build.generate(["a small green ring on the left"], root=micro_sandbox, seed=5, steps=4)
    second = build.generate(["a small green ring on the left"], root=micro_sandbox, seed=5, steps=4)
    assert first[0].size == (world.RESOLUTION, world.RESOLUTION)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_resume_runs_only_missing_stages(micro_sandbox, tmp_path):
    copy = tmp_path / "sbx"
    shutil.copytree(micro_sandbox, copy)
    state = yaml.safe_load((copy / "sandbox.yaml").read_text())
    del state["stages"]["eval"]
    (copy / "sandbox.yaml").write_text(yaml.safe_dump(state))
    unet_file = next((copy / "pipeline" / "unet").glob("*.safetensors"))
    before = unet_file.stat().st_mtime_ns
    with pytest.raises(FastattrError, match="incomplete"):
        build.sandbox_dir(copy)
    build.build(copy, scale="micro")
    assert unet_file.stat().st_mtime_ns == before  # the trained model was not redone
    assert "eval" in yaml.safe_load((copy / "sandbox.yaml").read_text())["stages"]
    build.verify(copy)


def test_corrupted_or_missing_files_name_the_file_and_the_fix(micro_sandbox, tmp_path):
    copy = tmp_path / "sbx"
    shutil.copytree(micro_sandbox, copy)
    target = next((copy / "clip").glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(FastattrError, match=r"open_clip_model\.safetensors: checksum mismatch.*fastattr sandbox build"):
        build.load_pipeline(copy)
    shutil.rmtree(copy / "pipeline")
    with pytest.raises(FastattrError, match="missing"):
        build.verify(copy)
    (copy / "sandbox.yaml").write_bytes(b"scale: \xe9")
    with pytest.raises(FastattrError, match=r"sandbox\.yaml: not UTF-8 \(byte 7 is 0xe9\); .*fastattr sandbox build"):
        build.read_state(copy)
    with pytest.raises(FastattrError, match="no sandbox"):
        build.sandbox_dir(tmp_path / "nowhere")


def test_scale_or_seed_mismatch_refuses_to_mix(micro_sandbox):
    with pytest.raises(FastattrError, match="--force"):
        build.build(micro_sandbox, scale="micro", seed=1)


def test_shipped_default_sandbox_loads_and_matches_checksums():
    files = build.verify()  # the default, shipped in the package
    assert any(f.startswith("pipeline/unet/") for f in files) and "data/manifest.jsonl" in files
    state = build.read_state(build.DEFAULT_SANDBOX)
    assert state["scale"] == "default" and set(state["stages"]) == set(build.STAGES)
    images = build.generate(["a large red circle in the center on a plain white background"], steps=10)
    assert images[0].size == (world.RESOLUTION, world.RESOLUTION)


def test_cli_generate_offline(tmp_path, micro_sandbox):
    result = subprocess.run(
        [sys.executable, "-m", "fastattr_cli", "sandbox", "generate", "--prompt", "a red circle",
         "--prompt", "a blue ring", "--out", str(tmp_path / "out"), "--sandbox", str(micro_sandbox), "--steps", "3"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "001.png"]


def test_classify_colours_on_a_drawn_scene():
    rng = np.random.default_rng(0)
    scene = world.Scene("square", "red", "navy", "large", "in the center", "plain")
    assert build.classify_colours(world.render(scene, rng)) == ("red", "navy")


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from fastattr_sandbox import train

    monkeypatch.setattr(train, "CHECKPOINT_EVERY", 2)
    images = torch.rand(8, 3, world.RESOLUTION, world.RESOLUTION) * 2 - 1
    reference, _ = train.train_vae(images, steps=4, batch_size=4, seed=0, work=tmp_path / "a")

    real_save = train._Checkpoint.maybe_save

    def save_then_die(self, step, total, state):
        real_save(self, step, total, state)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train._Checkpoint, "maybe_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(images, steps=4, batch_size=4, seed=0, work=tmp_path / "b")
    monkeypatch.setattr(train._Checkpoint, "maybe_save", real_save)
    resumed, _ = train.train_vae(images, steps=4, batch_size=4, seed=0, work=tmp_path / "b")
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "b" / "vae.ckpt").exists()
