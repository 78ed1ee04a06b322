"""Testing utilities, public so that a contributor's method or a downstream project can be checked
the way ours are (as `diffusers.utils.testing_utils` serves diffusers):

- tiny random-weight pipelines for every supported family, built offline from configs (`tiny_case`,
  `FAMILIES`): widths are tiny, token grids are real (hundreds of image tokens, several frames for
  video), so merging, pruning and caching have something to act on; text encoders are skipped, calls
  pass prompt embeddings;
- `snapshot(pipe)`: everything acceleration may touch, to check that removal or a refused call left
  a pipeline exactly as it was;
- `registered(cls)`: a method registered for the duration of a block, so that a test can run a
  method it defines through the whole contract suite without leaving it in the registry.

Also the CLI's `--family` option and the main job's embedded default (`default_pipeline`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

# image tokens only, with plain attention processors
PLAIN_FAMILIES = ("sd1", "sdxl", "animatediff", "pixart", "dit")
# joint text+image sequences or rotary embeddings
JOINT_FAMILIES = ("sd3", "sd35", "flux", "cogvideox", "wan", "wan22", "hunyuan_video", "ltx")
FAMILIES = PLAIN_FAMILIES + JOINT_FAMILIES


def snapshot(pipe: Any) -> dict:
    """Everything acceleration may touch: the attributes of the pipeline, its scheduler and its
    denoisers, and of every module its hooks, processor and forward."""
    from diffaccel.pipelines import DENOISER_ATTRS

    state = {"pipe": sorted(pipe.__dict__), "scheduler": sorted(pipe.scheduler.__dict__)}
    for attr in DENOISER_ATTRS:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        state[attr] = sorted(model.__dict__)
        for name, m in model.named_modules():
            state[f"{attr}.{name}"] = (
                tuple(m._forward_pre_hooks), tuple(m._forward_hooks), id(getattr(m, "processor", None)),
                type(m).forward is m.forward.__func__ if hasattr(m.forward, "__func__") else False,
            )
    return state


@contextlib.contextmanager
def registered(*classes: type) -> Iterator[None]:
    """Register method configs for the duration of the block (a method a test defines)."""
    from .methods.base import _REGISTRY, register

    before = dict(_REGISTRY)
    try:
        for cls in classes:
            register(cls)
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(before)


@dataclass
class TinyCase:
    """A pipeline plus how to call it: `run(steps, size, batch, guidance, seed)` returns latents."""

    family: str
    pipe: Any
    call: Callable[..., Any]
    size: int  # default pixel size
    size_alt: int | None  # another valid size (None: the pipeline has a fixed size)
    cfg: bool  # whether the family's pipeline has classifier-free guidance to switch

    def run(self, steps: int = 3, size: int | None = None, batch: int = 1, guidance: bool = True,
            seed: int = 0, **extra) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = self.call(self.pipe, steps=steps, size=size or self.size, batch=batch, guidance=guidance,
                            generator=gen, **extra)
        return out


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seeded(seed: int):
    torch.manual_seed(seed)


def _quiet(pipe):
    """No progress bars; every module in eval mode, as from_pretrained leaves them."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# -- U-Nets -----------------------------------------------------------------------------------


def sd1_unet(width: int = 32, cross: int = 32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, norm_num_groups=8, attention_head_dim=8)


def _sd1(seed: int) -> TinyCase:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    _seeded(seed)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=sd1_unet(),
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        emb = _embeds(1, batch, 8, 32)
        neg = _embeds(2, batch, 8, 32)
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, height=size,
                    width=size, guidance_scale=5.0 if guidance else 1.0, generator=generator, output_type="latent",
                    **extra).images

    return TinyCase("sd1", _quiet(pipe), call, 256, 192, True)


def _animatediff(seed: int) -> TinyCase:
    """The tiny SD U-Net with a motion adapter (AnimateDiff's UNetMotionModel), 2 frames of 24 x 24 latents."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    _seeded(seed)
    unet = sd1_unet()
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8)
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False))

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), negative_prompt_embeds=_embeds(2, batch, 8, 32),
                    num_frames=2, num_inference_steps=steps, height=size, width=size,
                    guidance_scale=5.0 if guidance else 1.0, generator=generator, output_type="latent",
                    **extra).frames

    return TinyCase("animatediff", _quiet(pipe), call, 192, 128, True)


def _sdxl(seed: int) -> TinyCase:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    _seeded(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1),
                                     add_watermarker=False)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return pipe(prompt_embeds=_embeds(1, batch, 8, 64), negative_prompt_embeds=_embeds(2, batch, 8, 64),
                    pooled_prompt_embeds=_embeds(3, batch, 32), negative_pooled_prompt_embeds=_embeds(4, batch, 32),
                    num_inference_steps=steps, height=size, width=size, guidance_scale=5.0 if guidance else 1.0,
                    generator=generator, output_type="latent", **extra).images

    return TinyCase("sdxl", _quiet(pipe), call, 512, 384, True)


# -- image DiTs -------------------------------------------------------------------------------


def _pixart(seed: int, num_layers: int = 2) -> TinyCase:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    _seeded(seed)
    tr = PixArtTransformer2DModel(
        sample_size=32, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        mask = torch.ones(batch, 8)
        return pipe(negative_prompt=None, prompt_embeds=_embeds(1, batch, 8, 32), prompt_attention_mask=mask,
                    negative_prompt_embeds=_embeds(2, batch, 8, 32), negative_prompt_attention_mask=mask,
                    num_inference_steps=steps, height=size, width=size, guidance_scale=4.5 if guidance else 1.0,
                    generator=generator, output_type="latent", use_resolution_binning=False, **extra).images

    return TinyCase("pixart", _quiet(pipe), call, 256, 192, True)


def _dit(seed: int) -> TinyCase:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    _seeded(seed)
    tr = DiTTransformer2DModel(sample_size=32, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=8, num_layers=2, patch_size=2, norm_type="ada_norm_zero",
                               num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"})

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return torch.as_tensor(pipe(class_labels=[1] * batch, num_inference_steps=steps,
                                    guidance_scale=4.0 if guidance else 1.0, generator=generator, output_type="np",
                                    **extra).images)

    return TinyCase("dit", _quiet(pipe), call, 32, None, True)


def _sd3(seed: int, dual: bool = False) -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seeded(seed)
    extra_cfg = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual else {}
    tr = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4, **extra_cfg)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), negative_prompt_embeds=_embeds(2, batch, 8, 32),
                    pooled_prompt_embeds=_embeds(3, batch, 64), negative_pooled_prompt_embeds=_embeds(4, batch, 64),
                    num_inference_steps=steps, height=size, width=size, guidance_scale=5.0 if guidance else 1.0,
                    generator=generator, output_type="latent", **extra).images

    return TinyCase("sd35" if dual else "sd3", _quiet(pipe), call, 256, 192, True)


def _flux(seed: int, num_layers: int = 1, num_single_layers: int = 1) -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seeded(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        cfg = dict(negative_prompt_embeds=_embeds(2, batch, 8, 32), negative_pooled_prompt_embeds=_embeds(4, batch, 32),
                   true_cfg_scale=4.0) if guidance else {}
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), pooled_prompt_embeds=_embeds(3, batch, 32),
                    num_inference_steps=steps, height=size, width=size, generator=generator, output_type="latent",
                    **cfg, **extra).images

    return TinyCase("flux", _quiet(pipe), call, 256, 192, True)


# -- video DiTs -------------------------------------------------------------------------------


def _cogvideox(seed: int) -> TinyCase:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    _seeded(seed)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                     time_embed_dim=2, text_embed_dim=32, num_layers=2, sample_width=16,
                                     sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=8, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3,
                                 down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
                                 block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                             scheduler=CogVideoXDDIMScheduler())

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), negative_prompt_embeds=_embeds(2, batch, 8, 32),
                    num_inference_steps=steps, height=size, width=size, num_frames=9,
                    guidance_scale=6.0 if guidance else 1.0, generator=generator, output_type="latent",
                    **extra).frames

    return TinyCase("cogvideox", _quiet(pipe), call, 32, 24, True)


def _wan(seed: int, two: bool = False) -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    _seeded(seed)

    def make():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=make(), transformer_2=make() if two else None,
                       boundary_ratio=0.5 if two else None)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), negative_prompt_embeds=_embeds(2, batch, 8, 32),
                    num_inference_steps=steps, height=size, width=size, num_frames=5,
                    guidance_scale=5.0 if guidance else 1.0, guidance_scale_2=5.0 if (two and guidance) else None,
                    generator=generator, output_type="latent", **extra).frames

    return TinyCase("wan22" if two else "wan", _quiet(pipe), call, 256, 192, True)


def _hunyuan(seed: int) -> TinyCase:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    _seeded(seed)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        mask = torch.ones(batch, 8, dtype=torch.int64)
        cfg = dict(negative_prompt_embeds=_embeds(2, batch, 8, 16), negative_pooled_prompt_embeds=_embeds(4, batch, 8),
                   negative_prompt_attention_mask=mask, true_cfg_scale=4.0) if guidance else {}
        return pipe(prompt_embeds=_embeds(1, batch, 8, 16), pooled_prompt_embeds=_embeds(3, batch, 8),
                    prompt_attention_mask=mask, num_inference_steps=steps, height=size, width=size, num_frames=5,
                    generator=generator, output_type="latent", **cfg, **extra).frames

    return TinyCase("hunyuan_video", _quiet(pipe), call, 128, 96, True)


def _ltx(seed: int) -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    _seeded(seed)
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                    num_layers=1, caption_channels=32)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=tr)

    def call(pipe, steps, size, batch, guidance, generator, **extra):
        mask = torch.ones(batch, 8, dtype=torch.int64)
        return pipe(prompt_embeds=_embeds(1, batch, 8, 32), prompt_attention_mask=mask,
                    negative_prompt_embeds=_embeds(2, batch, 8, 32), negative_prompt_attention_mask=mask,
                    num_inference_steps=steps, height=size, width=size, num_frames=9,
                    guidance_scale=3.0 if guidance else 1.0, generator=generator, output_type="latent",
                    **extra).frames

    return TinyCase("ltx", _quiet(pipe), call, 512, 384, True)


_BUILDERS: dict[str, Callable[..., TinyCase]] = {
    "sd1": _sd1, "sdxl": _sdxl, "animatediff": _animatediff, "pixart": _pixart, "dit": _dit, "sd3": _sd3,
    "sd35": lambda s: _sd3(s, dual=True), "flux": _flux, "cogvideox": _cogvideox, "wan": _wan,
    "wan22": lambda s: _wan(s, two=True), "hunyuan_video": _hunyuan, "ltx": _ltx,
}


def tiny_case(family: str, seed: int = 0, **depth: int) -> TinyCase:
    """A tiny random-weight pipeline of `family` (one of FAMILIES) and how to call it. `depth`: block
    counts of the denoiser where its builder takes them (pixart: num_layers; flux: num_layers,
    num_single_layers), for schedules that depend on the depth."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; available: {list(FAMILIES)}")
    return _BUILDERS[family](seed, **depth)


# -- the embedded default: a complete text-to-image pipeline, no downloads ----------------------


def byte_clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over bytes (no merges), built in memory."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = printable + [256 + i for i, b in enumerate(b for b in range(256) if b not in printable)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in map(chr, symbols):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def default_pipeline(seed: int = 0):
    """The main job's embedded default: an SD-architecture StableDiffusionPipeline (tokenizer, text
    encoder, VAE with scale 8, U-Net whose top level attends over 64x64 latent tokens at 512 px),
    random weights from a fixed seed."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    tokenizer = byte_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        norm_num_groups=16, attention_head_dim=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _quiet(pipe)


# -- what a run did, read from public surfaces ----------------------------------------------------


def last_geometry(pipe: Any, denoiser: int = 0):
    """The token geometry of the last denoiser call of an accelerated pipeline, from describe()."""
    from .describe import describe
    from .sites import Geometry

    call = describe(pipe)["denoisers"][denoiser]["last_call"]
    return None if call is None or call["geometry"] is None else Geometry(**call["geometry"])


@contextlib.contextmanager
def recorded_reductions(config_cls: type) -> Iterator[list]:
    """Within the block, every token reduction a cell-reduction method (ToMe, SiTo) builds for a site
    call, as (site name, whether the call was a batched CFG pair, the reduction) in call order."""
    seen, real = [], config_cls.reduction_for
    own = "reduction_for" in config_cls.__dict__

    def recording(self, site, ctx, *args, **kwargs):
        reduction = real(self, site, ctx, *args, **kwargs)
        seen.append((site.name, ctx.cfg_batched, reduction))
        return reduction

    config_cls.reduction_for = recording
    try:
        yield seen
    finally:
        if own:
            config_cls.reduction_for = real
        else:
            del config_cls.reduction_for
