"""diffusers integration: the callback contract, the wrapper, batch order, and the demo end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from transformers import CLIPTextConfig, CLIPTextModel

from fastattr_hook.attribution import Attribution
from fastattr_hook.attributor import Attributor
from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import read_attribution
from fastattr_sandbox import models
from integrations.diffusers_callback import AttributionCallback, expand_prompts, save_image, with_attribution


@pytest.fixture(scope="module")
def attributor(micro_sandbox):
    return Attributor.from_bundle(micro_sandbox / "bundle")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """diffusers' own tiny StableDiffusionPipeline test recipe, built offline."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    tok_dir = models.write_tokenizer_files(tmp_path_factory.mktemp("tok"))
    tokenizer = models.load_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length))
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompts, **kwargs):
    return pipe(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def test_callback_attributes_the_final_images_and_changes_nothing(tiny_sd, attributor):
    prompts = ["a red circle", "a blue ring"]
    plain = _run(tiny_sd, prompts)
    callback = AttributionCallback(attributor, prompt=prompts, k=4)
    with_cb = _run(tiny_sd, prompts, callback_on_step_end=callback)
    assert np.array_equal(plain, with_cb)
    assert len(callback.attributions) == 2 and all(len(a.credits) == 4 for a in callback.attributions)
    decoded = np.stack([np.asarray(i) for i in callback.images])
    assert np.abs(decoded.astype(int) - np.round(plain * 255).astype(int)).max() <= 1  # same decode as the pipeline
    expected = attributor.attribute(callback.images, prompts, k=4)
    assert [[c.id for c in a.credits] for a in callback.attributions] == [[c.id for c in a.credits] for a in expected]


def test_callback_inside_multipipelinecallbacks_with_cfg_cutoff(tiny_sd, attributor):
    prompts = ["a red circle"]
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    callback = AttributionCallback(attributor, prompt=prompts, k=3)
    reference = _run(tiny_sd, prompts, callback_on_step_end=MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.4)]))
    images = _run(tiny_sd, prompts, callback_on_step_end=MultiPipelineCallbacks([cutoff, callback]))
    assert np.array_equal(reference, images)
    assert len(callback.attributions) == 1 and callback.attributions[0].prompt == "a red circle"


def test_batch_order_with_several_prompts_and_images_per_prompt(tiny_sd, attributor):
    prompts = ["a red circle", "a green square"]
    callback = AttributionCallback(attributor, prompt=prompts, k=3)
    _run(tiny_sd, prompts, num_images_per_prompt=2, negative_prompt=["blurry", "dark"], callback_on_step_end=callback)
    assert [a.prompt for a in callback.attributions] == ["a red circle", "a red circle", "a green square", "a green square"]
    for image, prompt, attribution in zip(callback.images, expand_prompts(prompts, 4), callback.attributions):
        alone = attributor.attribute([image], [prompt], k=3)[0]
        assert [c.id for c in alone.credits] == [c.id for c in attribution.credits]
    with pytest.raises(FastattrError, match="cannot come from 3 prompts"):
        expand_prompts(["a", "b", "c"], 4)


def test_unsupported_pipeline_family_is_a_clear_error(attributor):
    class KandinskyPipeline:
        num_timesteps = 1

    callback = AttributionCallback(attributor, prompt="x")
    with pytest.raises(FastattrError, match="cannot decode latents of KandinskyPipeline"):
        callback(KandinskyPipeline(), 0, 0, {"latents": torch.zeros(1, 4, 8, 8)})


def _clip_parts(tmp_path_factory, hidden: int = 32):
    tokenizer = models.load_tokenizer(models.write_tokenizer_files(tmp_path_factory.mktemp("tok")))
    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id, hidden_size=hidden, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, projection_dim=hidden, vocab_size=len(tokenizer),
                            max_position_embeddings=tokenizer.model_max_length)
    return tokenizer, config


def _shifted_vae(latent_channels: int):
    # shift_factor and scaling_factor as in diffusers' own SD3/Flux test recipes: decoding without the shift is wrong
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """diffusers' tiny StableDiffusion3Pipeline test recipe, offline (without the optional T5 encoder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, config = _clip_parts(tmp_path_factory)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_shifted_vae(4),
                                    text_encoder=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                    text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """diffusers' tiny FluxPipeline test recipe, offline (the T5 encoder reads our own small vocabulary)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, config = _clip_parts(tmp_path_factory)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_shifted_vae(1),
                        text_encoder=CLIPTextModel(config), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_callback_decodes_sd3_and_flux_exactly_like_the_pipeline(family, request, attributor):
    pipe = request.getfixturevalue(family)
    size = {"height": 16, "width": 24}  # not square: Flux's packed latents need the size
    extra = {"max_sequence_length": 16} if family == "tiny_flux" else {}
    prompts = ["a red circle", "a blue ring"]
    plain = _run(pipe, prompts, **size, **extra)
    callback = AttributionCallback(attributor, prompt=prompts, k=3, **size)
    assert np.array_equal(plain, _run(pipe, prompts, callback_on_step_end=callback, **size, **extra))
    decoded = np.stack([np.asarray(i) for i in callback.images])
    assert decoded.shape == (2, 16, 24, 3)
    assert np.abs(decoded.astype(int) - np.round(plain * 255).astype(int)).max() <= 1  # the shift factor applied
    expected = attributor.attribute(callback.images, prompts, k=3)
    assert [[c.id for c in a.credits] for a in callback.attributions] == [[c.id for c in a.credits] for a in expected]
    latents = with_attribution(pipe, attributor, k=3)(prompts, num_inference_steps=3, output_type="latent",
                                                       generator=torch.Generator().manual_seed(0), **size, **extra)
    assert [[c.id for c in a.credits] for a in latents.attributions] == [[c.id for c in a.credits] for a in expected]


def test_flux_without_its_size_stops_at_the_first_step(tiny_flux, attributor):
    callback = AttributionCallback(attributor, prompt="a red circle", k=2)
    with pytest.raises(FastattrError, match="pass the pipeline's height= and width="):
        _run(tiny_flux, ["a red circle"], height=16, width=24, max_sequence_length=16, callback_on_step_end=callback)
    square = AttributionCallback(attributor, prompt="a red circle", k=2)  # square images need no size
    _run(tiny_flux, ["a red circle"], height=16, width=16, max_sequence_length=16, callback_on_step_end=square)
    assert square.images[0].size == (16, 16) and len(square.attributions[0].credits) == 2


def test_wrapper_on_the_sandbox_pipeline(micro_pipeline, attributor, tmp_path):
    pipe = with_attribution(micro_pipeline, attributor, k=5)
    assert pipe.unet is micro_pipeline.unet  # everything else passes through
    out = pipe(["a red circle", "a blue ring"], num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    assert len(out.attributions) == 2 and len(out.images) == 2
    carried = Attribution.from_json(out.images[1].info["fastattr"])
    assert carried.prompt == "a blue ring" and [c.id for c in carried.credits] == [c.id for c in out.attributions[1].credits]
    path = save_image(out.images[0], tmp_path / "img.png")
    found = read_attribution(path)
    assert {"png", "xmp", "sidecar"} <= set(found)
    assert [c.id for c in found["png"].credits] == [c.id for c in out.attributions[0].credits]

    images, nsfw, attributions = pipe("a red circle", num_inference_steps=3, return_dict=False)
    assert len(images) == len(attributions) == 1
    latents = pipe("a red circle", num_inference_steps=3, output_type="latent").attributions
    assert len(latents) == 1 and len(latents[0].credits) == 5


def test_demo_end_to_end(micro_sandbox, tmp_path):
    from integrations.demo import run_demo

    report = run_demo(tmp_path / "demo", prompts=["a red circle", "a large blue ring at the top"], k=3, steps=4,
                      sandbox=micro_sandbox)
    html = report.read_text()
    assert html.count("<section>") == 2 and "a large blue ring at the top" in html
    assert html.count('<figure>') == 6 and "data:image/png;base64," in html
    for png in sorted((tmp_path / "demo").glob("*.png")):
        found = read_attribution(png)
        assert found["png"].credits and json.loads((png.with_suffix(".attribution.json")).read_text())["k"] == 3


def test_mistakes_are_caught_before_or_at_the_first_step(tiny_sd, attributor):
    from diffusers.callbacks import PipelineCallback

    for bad in (0, -1, "5", 2.5, True):
        with pytest.raises(FastattrError, match="k must be a positive integer"):
            AttributionCallback(attributor, prompt="a red circle", k=bad)
        with pytest.raises(FastattrError, match="k must be a positive integer"):
            with_attribution(tiny_sd, attributor, k=bad)
    with pytest.raises(FastattrError, match="k=10000 exceeds the 160 training items"):
        AttributionCallback(attributor, prompt="a red circle", k=10_000)

    class Steps(PipelineCallback):
        tensor_inputs = ["latents"]
        seen: list[int] = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.seen.append(step_index)
            return callback_kwargs

    steps = Steps()
    callback = AttributionCallback(attributor, prompt=["a", "b", "c"], k=2)  # 3 prompts for 2 images
    with pytest.raises(FastattrError, match="2 images cannot come from 3 prompts"):
        _run(tiny_sd, ["a red circle", "a blue ring"], callback_on_step_end=MultiPipelineCallbacks([steps, callback]))
    assert steps.seen == [0]  # stopped after the first denoising step, not the last


def test_wrapper_survives_methods_that_return_the_pipeline(tiny_sd, attributor):
    wrapped = with_attribution(tiny_sd, attributor, k=2)
    assert wrapped.to("cpu") is wrapped and wrapped.to(torch.float32) is wrapped
    assert wrapped.unet is tiny_sd.unet  # modules and plain attributes pass through
    out = wrapped.to("cpu")(["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.attributions) == 1 and len(out.attributions[0].credits) == 2


def test_wrapper_keeps_attributing_after_model_cpu_offload(tiny_sd, attributor):
    """``enable_model_cpu_offload()`` works in place (returns None, as in diffusers) and installs
    accelerate hooks on every model; the wrapped pipeline still attributes what it makes."""
    wrapped = with_attribution(tiny_sd, attributor, k=2)
    plain = _run(tiny_sd, ["a red circle"])
    try:
        assert wrapped.enable_model_cpu_offload(device="cpu") is None
        assert hasattr(tiny_sd.unet, "_hf_hook") and hasattr(tiny_sd.vae, "_hf_hook")
        out = wrapped(["a red circle"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np")
    finally:
        tiny_sd.remove_all_hooks()
    assert len(out.attributions) == 1 and len(out.attributions[0].credits) == 2
    assert np.array_equal(out.images, plain)  # offloading changes no pixel
