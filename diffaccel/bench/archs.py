"""The full-size architectures the speed suites run, random weights (no download): the SD 1.5 U-Net,
PixArt-alpha XL/2, FLUX.1 at full width with 2 + 4 blocks, FLUX.1-dev's full depth (FLOPs only), and
test-size twins of each for smoke runs."""

from __future__ import annotations

import torch

SD_ARCHS = ("sd15", "tiny-sd")
CACHE_ARCHS = ("pixart-alpha", "flux-2x4", "flux-dev", "tiny-pixart", "tiny-flux")
FLOPS_ONLY = {"flux-dev": "FLUX.1-dev at full depth has 12B parameters; count its FLOPs (--steps 0, on the meta "
                          "device) and time flux-2x4"}


def sd15_unet() -> torch.nn.Module:
    """The SD 1.5 U-Net architecture (860M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()


def build_arch(name: str) -> torch.nn.Module:
    if name == "sd15":
        return sd15_unet()
    from ..testing import sd1_unet

    torch.manual_seed(0)
    return sd1_unet().eval()  # "tiny-sd": the test-size U-Net, for smoke runs


def caching_arch(name: str, size: int | None = None) -> tuple[torch.nn.Module, object]:
    """(model, inputs(batch, step, num_steps, device) -> call kwargs), random weights, in eval mode.
    Built on the current default device (the FLOP count builds on "meta": nothing is computed).
    size: image size in pixels (default 256 for PixArt, 512 for Flux)."""
    if name in ("pixart-alpha", "tiny-pixart"):
        from diffusers import PixArtTransformer2DModel

        big = name == "pixart-alpha"  # PixArt-alpha XL/2: 28 blocks, width 1152, T5 captions
        lat = (size or (256 if big else 64)) // 8
        model = PixArtTransformer2DModel(
            sample_size=lat, num_layers=28 if big else 2, num_attention_heads=16 if big else 2,
            attention_head_dim=72 if big else 8, in_channels=4, out_channels=8, patch_size=2,
            cross_attention_dim=1152 if big else 16, caption_channels=4096 if big else 32,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False)
        text, width = (120, 4096) if big else (8, 32)

        def inputs(batch, step, num_steps, device, pairs=True):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(batch, 4, lat, lat, generator=gen)
            enc = torch.randn(batch, text, width, generator=torch.Generator().manual_seed(-1))
            rows = 2 if pairs else 1
            t = torch.full((rows * batch,), 999 * (1 - step / num_steps))
            return dict(hidden_states=torch.cat([x] * rows).to(device),
                        encoder_hidden_states=torch.cat([enc] * rows).to(device),
                        timestep=t.to(device), added_cond_kwargs={"resolution": None, "aspect_ratio": None})

        return model.eval(), inputs
    from diffusers import FluxTransformer2DModel

    # FLUX.1 at full width (24 heads x 128, T5 width 4096) with 2 double-stream and 4 single-stream
    # blocks; 512 px: 32 x 32 packed latent tokens and 512 text tokens, guidance-distilled (one call per step).
    # "flux-dev": FLUX.1-dev's own depth (19 + 38 blocks) at its 1024 px, for FLOP counts on the meta device.
    big = name != "tiny-flux"  # "tiny-flux": the 2 + 4 layout at test size
    heads, head_dim, text, width, pooled, rope = (24, 128, 512, 4096, 768, (16, 56, 56)) if big else (
        2, 16, 8, 32, 16, (4, 6, 6))
    double, single = (19, 38) if name == "flux-dev" else (2, 4)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=width,
                                   pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=rope)
    side = (size or (1024 if name == "flux-dev" else 512)) // 16

    def inputs(batch, step, num_steps, device, pairs=False):
        gen = torch.Generator().manual_seed(step)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        return dict(hidden_states=torch.randn(batch, side * side, 64, generator=gen).to(device),
                    encoder_hidden_states=torch.randn(batch, text, width, generator=torch.Generator().manual_seed(-1)).to(device),
                    pooled_projections=torch.randn(batch, pooled, generator=torch.Generator().manual_seed(-2)).to(device),
                    timestep=torch.full((batch,), 1 - step / num_steps).to(device),
                    img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3).to(device),
                    guidance=torch.full((batch,), 3.5).to(device))

    return model.eval(), inputs
