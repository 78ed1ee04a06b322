"""Everyday diffusers workflows around an accelerated pipeline: img2img and SDXL's denoising_start /
denoising_end (only part of the schedule runs), pipelines sharing the denoiser (`from_pipe`), copies,
processors changed after patching, a denoiser compiled before patching, families we do not handle,
and a default that acts nowhere. Each was tried as a new user would; each test failed before."""

import copy
import warnings

import pytest
import torch

import diffaccel
from diffaccel import (
    Policy,
    Rule,
    Selector,
    ToMeConfig,
    Window,
    accelerate_pipeline,
    describe,
    is_accelerated,
    remove_acceleration,
)
from diffaccel.api import installation

# ToMe on the finest level, acting only in the second half of the run
SECOND_HALF = ToMeConfig(policy=Policy((Rule(Selector(kind="self_attn", level=0), {"ratio": 0.5}, Window(0.5, 1.0)),)))


def embeds(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def top_attn1(pipe):
    """{step: tokens computed} of the first finest-level self-attention in the last run."""
    site = next(s for s in describe(pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    return {int(k): v["computed"] for k, v in site["last_run"].items()}


def sd_call(pipe, prompt=1, steps=6, **extra):
    return pipe(prompt_embeds=embeds(prompt, 1, 8, 32), negative_prompt_embeds=embeds(2, 1, 8, 32),
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                **extra).images


# -- only part of the schedule runs ------------------------------------------------------------


def test_img2img_plans_over_the_steps_that_run_and_releases_its_caches(make_case):
    from diffusers import StableDiffusionImg2ImgPipeline

    case = make_case("sd1")
    accelerate_pipeline(case.pipe, ["fora", SECOND_HALF])
    i2i = StableDiffusionImg2ImgPipeline(**case.pipe.components)
    i2i.set_progress_bar_config(disable=True)
    sd_call(i2i, steps=10, image=embeds(5, 1, 4, 32, 32), strength=0.5)  # runs 5 of the 10 steps
    assert describe(i2i)["denoisers"][0]["last_call"]["num_steps"] == 5
    # the window over the second half acts in the second half of the five steps; FORA computes step 0,
    # reuses 1 and 2, computes 3 and the last
    assert top_attn1(i2i) == {0: 1024, 1: 0, 2: 0, 3: 512, 4: 512}
    cache = describe(i2i)["denoisers"][0]["cache"]
    assert cache["entries"] == 0 and cache["bytes"] == 0 and cache["peak_bytes"] > 0  # released on return


def test_pndm_extra_step_is_planned_and_the_caches_released(make_case):
    """PNDM (SD 1.5's scheduler) runs one step more than num_inference_steps: the run counts it."""
    from diffusers import PNDMScheduler

    case = make_case("sd1")
    case.pipe.scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    accelerate_pipeline(case.pipe, "fora")
    sd_call(case.pipe, steps=6)
    den = describe(case.pipe)["denoisers"][0]
    assert den["last_call"]["num_steps"] == 7 and den["cache"]["entries"] == 0
    assert [s for s, c in top_attn1(case.pipe).items() if c] == [0, 3, 6]  # the last step is computed


def test_sdxl_denoising_end_and_denoising_start_plan_over_their_part(make_case):
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline

    case = make_case("sdxl")
    accelerate_pipeline(case.pipe, ["fora", SECOND_HALF])
    case.run(steps=10, denoising_end=0.6)  # the base model runs the first 6 steps
    assert describe(case.pipe)["denoisers"][0]["last_call"]["num_steps"] == 6
    # SDXL's finest attention level: 32 x 32 tokens; the window's half of 6 steps is 3, 4, 5
    assert top_attn1(case.pipe) == {0: 1024, 1: 0, 2: 0, 3: 512, 4: 0, 5: 512}
    assert describe(case.pipe)["denoisers"][0]["cache"]["entries"] == 0
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8)  # read for its config only: latents go in
    refiner = StableDiffusionXLImg2ImgPipeline(**{**case.pipe.components, "vae": vae}, requires_aesthetics_score=False)
    refiner.set_progress_bar_config(disable=True)
    refiner(prompt_embeds=embeds(1, 1, 8, 64), negative_prompt_embeds=embeds(2, 1, 8, 64),
            pooled_prompt_embeds=embeds(3, 1, 32), negative_pooled_prompt_embeds=embeds(4, 1, 32),
            image=embeds(5, 1, 4, 64, 64), num_inference_steps=10, denoising_start=0.6, output_type="latent")
    assert describe(refiner)["denoisers"][0]["last_call"]["num_steps"] == 4  # the last 4 of 10
    assert describe(refiner)["denoisers"][0]["cache"]["entries"] == 0


# -- pipelines sharing the denoiser, copies ------------------------------------------------------


def test_from_pipe_with_another_scheduler_is_accelerated_and_never_stale(make_case):
    """A pipeline made with from_pipe shares the accelerated U-Net: it behaves as an accelerated
    pipeline of its own (its scheduler drives the steps, a new prompt starts a new run)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def shared(case):
        other = StableDiffusionPipeline.from_pipe(case.pipe, scheduler=DDIMScheduler.from_config(case.pipe.scheduler.config))
        other.set_progress_bar_config(disable=True)
        return other

    case = make_case("sd1")
    accelerate_pipeline(case.pipe, ["fora", SECOND_HALF])
    other = shared(case)
    sd_call(other, prompt=1)
    later = sd_call(other, prompt=3)
    sd_call(case.pipe, prompt=1)  # the original between them
    again = sd_call(other, prompt=3)
    fresh = make_case("sd1")
    accelerate_pipeline(fresh.pipe, ["fora", SECOND_HALF])
    want = sd_call(shared(fresh), prompt=3)
    assert torch.equal(later, want) and torch.equal(again, want)
    assert top_attn1(other) == {0: 1024, 1: 0, 2: 0, 3: 512, 4: 0, 5: 512}
    assert installation(other) is installation(case.pipe)
    remove_acceleration(other)  # the shared denoiser's acceleration is removed from both
    assert not is_accelerated(case.pipe) and "set_timesteps" not in other.scheduler.__dict__
    assert "progress_bar" not in other.__dict__


def test_the_first_call_of_a_shared_img2img_pipeline_plans_over_its_part(make_case):
    """Its first call is met mid-loop (its progress bar was not known yet): the run is still laid over
    the steps that loop runs, and released at its end; later calls equal it."""
    from diffusers import AutoPipelineForImage2Image, DDIMScheduler

    case = make_case("sd1")
    accelerate_pipeline(case.pipe, ["fora", SECOND_HALF])
    i2i = AutoPipelineForImage2Image.from_pipe(case.pipe, scheduler=DDIMScheduler.from_config(case.pipe.scheduler.config))
    i2i.set_progress_bar_config(disable=True)
    image = embeds(5, 1, 4, 32, 32)
    first = sd_call(i2i, steps=10, image=image, strength=0.5)
    den = describe(i2i)["denoisers"][0]
    assert den["last_call"]["num_steps"] == 5 and den["cache"]["entries"] == 0
    assert top_attn1(i2i) == {0: 1024, 1: 0, 2: 0, 3: 512, 4: 512}
    assert torch.equal(sd_call(i2i, steps=10, image=image, strength=0.5), first)


def test_deepcopy_is_an_independent_accelerated_pipeline(make_case):
    case = make_case("sd1")
    base = sd_call(case.pipe)
    accelerate_pipeline(case.pipe, ["fora", SECOND_HALF])
    out = sd_call(case.pipe)
    twin = copy.deepcopy(case.pipe)
    assert torch.equal(sd_call(twin), out)
    assert torch.equal(sd_call(case.pipe), out)  # running the copy left the original as it was
    remove_acceleration(twin)
    assert torch.equal(sd_call(twin), base)
    assert torch.equal(sd_call(case.pipe), out)  # the original is still accelerated
    assert is_accelerated(case.pipe) and not is_accelerated(twin)
    remove_acceleration(case.pipe)
    assert torch.equal(sd_call(case.pipe), base)


# -- processors changed after patching, a compiled denoiser ----------------------------------------


def test_todo_keeps_pooling_after_fused_projections_and_a_lora(make_case):
    from peft import LoraConfig

    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo", factor=2)
    case.pipe.unet.fuse_qkv_projections()  # FusedAttnProcessor2_0 everywhere
    out = case.run(steps=2)
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    assert site["last_run_note"] is None and all(v["keys_values"] == 256 for v in site["last_run"].values())
    remove_acceleration(case.pipe)
    assert not torch.equal(case.run(steps=2), out)
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo", factor=2)
    case.pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    case.run(steps=2)
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    assert all(v["keys_values"] == 256 for v in site["last_run"].values())


def test_todo_warns_where_a_new_processor_does_not_reach_sdpa(make_case):
    from diffusers.models.attention_processor import AttnProcessor

    class Custom(AttnProcessor):  # no scaled_dot_product_attention, and not a processor ToDo knows
        pass

    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo", factor=2)
    case.pipe.unet.set_attn_processor(Custom())
    with pytest.warns(UserWarning, match=r"todo: .*attn1 runs attention that does not call scaled_dot_product"):
        case.run(steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        case.run(steps=2)  # once
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    assert "keys/values not pooled" in site["last_run_note"]
    assert all(v["keys_values"] == v["tokens"] for v in site["last_run"].values())


def test_a_denoiser_compiled_before_patching_keeps_its_family(make_case):
    case, plain = make_case("sd1"), make_case("sd1")
    accelerate_pipeline(plain.pipe, "tome", ratio=0.5)
    want = plain.run(steps=2)
    case.pipe.unet = torch.compile(case.pipe.unet, backend="eager")
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    den = describe(case.pipe)["denoisers"][0]
    assert den["family"] == "SD 1.x"
    assert [s["name"] for s in den["sites"]] == [s["name"] for s in describe(plain.pipe)["denoisers"][0]["sites"]]
    torch.testing.assert_close(case.run(steps=2), want)
    remove_acceleration(case.pipe)
    assert not is_accelerated(case.pipe) and not is_accelerated(case.pipe.unet)
    torch.testing.assert_close(case.run(steps=2), make_case("sd1").run(steps=2))
    accelerate_pipeline(case.pipe.unet, "todo", factor=2)  # the bare compiled denoiser, and off again
    assert is_accelerated(case.pipe.unet)
    remove_acceleration(case.pipe.unet)
    assert not is_accelerated(case.pipe)


# -- families we do not handle -----------------------------------------------------------------------


def kandinsky_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", down_block_types=("ResnetDownsampleBlock2D",
                                                                                      "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64), layers_per_block=1, encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
        cross_attention_dim=32, attention_head_dim=4, resnet_time_scale_shift="scale_shift", norm_num_groups=8)


def video_unet():
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))


@pytest.mark.parametrize("model,match", [
    ("kandinsky", r"UNet2DConditionModel: it has no transformer blocks a family adapter knows \(Kandinsky 2.x"),
    ("video-unet", r"UNet3DConditionModel: a text-to-video U-Net that runs frames as a batch"),
])
def test_families_we_do_not_handle_are_refused_clearly(model, match):
    module = kandinsky_unet() if model == "kandinsky" else video_unet()
    hooks = [(m._forward_pre_hooks.copy(), m._forward_hooks.copy()) for m in module.modules()]
    with pytest.raises(diffaccel.UnsupportedModelError, match=match + r".*supported families: SD 1.x/2.x"):
        accelerate_pipeline(module, "tome")
    assert not is_accelerated(module)
    assert hooks == [(m._forward_pre_hooks, m._forward_hooks) for m in module.modules()]


def test_animatediff_acts_on_each_frame_and_leaves_the_motion_modules_alone(make_case):
    """AnimateDiff's UNetMotionModel (it was taken for a generic model, and ToMe / ToDo did nothing):
    the spatial blocks' sub-layers are sites on each frame's grid, the motion modules run untouched."""
    case = make_case("animatediff")
    base = case.run(steps=2)
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    den = describe(case.pipe)["denoisers"][0]
    assert den["family"] == "AnimateDiff (SD 1.x)"
    assert den["sites"] and not any("motion_modules" in s["name"] for s in den["sites"])
    out = case.run(steps=2)
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    assert site["grid"] == [1, 24, 24] and all(v["computed"] == 288 for v in site["last_run"].values())
    assert not torch.equal(out, base) and out.shape == base.shape
    motion = [m for n, m in case.pipe.unet.named_modules() if "motion_modules" in n]
    assert motion and not any(m._forward_pre_hooks or m._forward_hooks for m in motion)
    remove_acceleration(case.pipe)
    assert torch.equal(case.run(steps=2), base)


# -- a default that acts nowhere, an image alone or in a batch -----------------------------------------


def test_a_default_the_cost_model_skips_everywhere_warns_once(make_case):
    case = make_case("pixart")  # 256 tokens of width 24: below the cost model's threshold
    accelerate_pipeline(case.pipe, "sito")
    with pytest.warns(UserWarning, match=r"sito acted on no site in this run: at its default strength the cost "
                                         r"model found no site where it saves time \(cost model: saves"):
        case.run(steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        case.run(steps=2)
    remove_acceleration(case.pipe)
    with warnings.catch_warnings():  # an explicit strength acts: nothing to say
        warnings.simplefilter("error", UserWarning)
        accelerate_pipeline(case.pipe, "sito", ratio=0.5)
        case.run(steps=2)


@pytest.mark.parametrize("method", ["sito", "tome"])
def test_an_image_does_not_change_when_another_prompt_joins_its_batch(make_case, method):
    """SiTo's noise was drawn per batch row: an image came out different when another prompt went
    before it in the batch (rel. 1.7e-2 here). One draw per token now serves every row."""
    def image_of_prompt_1(case, prompts):
        b = len(prompts)
        out = case.pipe(prompt_embeds=torch.cat([embeds(p, 1, 8, 32) for p in prompts]),
                        negative_prompt_embeds=embeds(2, 1, 8, 32).expand(b, -1, -1), num_inference_steps=3,
                        generator=[torch.Generator().manual_seed(0) for _ in prompts], output_type="latent").images
        return out[prompts.index(1)]

    def change(case):
        alone = image_of_prompt_1(case, [1])
        return (image_of_prompt_1(case, [3, 1]) - alone).norm() / alone.norm()

    base = change(make_case("sd1"))  # the pipeline's own batch-size rounding
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, method, ratio=0.5)
    assert change(case) <= 10 * base + 1e-5
