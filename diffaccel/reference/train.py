"""Train the reference models from scratch on the procedural shapes dataset.

    python -m diffaccel.reference.train                 # all stages, about an hour on 2 CPU cores
    python -m diffaccel.reference.train --scale 0.01    # a smoke run: 1% of the steps

Stages, in order: the word-level tokenizer; the text encoder, pretrained to make each caption's scene
readable by cross-attention (a reader with one query per grid cell must recover every cell's colour,
kind and size and the background) and then frozen; the VAE, first on
64x64 crops mostly centred on shapes (cheap, as it is fully convolutional), then on whole images so
that its group-norm statistics and borders are those of whole images; a cache of VAE latents of
training scenes; the U-Net; the DiT. `--stages` runs some of them and reads the others back.
Denoisers learn v-prediction (as SD 2) on SD's scaled-linear schedule, with timesteps drawn with a
density rising towards pure noise and loss weights that never fall below the plain v loss there
(see `train_denoiser`), 10% empty captions (for classifier-free guidance), bf16 autocast where the
CPU computes bf16 natively (float32 elsewhere: emulated bf16 convolutions ran 30x slower), AdamW with
warm-up and cosine decay, and an EMA of the weights, which is what gets saved. Text embeddings come from each pipeline's own
`encode_prompt`, so training sees exactly what inference feeds. Writes `save_pretrained` folders
(safetensors), `training_log.json` and a loss plot (`loss.svg`).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..metrics import psnr
from . import data
from .models import IMAGE_SIZE, make_text_encoder, make_tokenizer, make_transformer, make_unet, make_vae

# steps at --scale 1, chosen to take about an hour in all on 2 CPU cores
STEPS = {"text": 1500, "vae": 1200, "vae_full": 300, "unet": 2400, "dit": 1800}
BATCH = {"text": 128, "vae": 16, "vae_full": 4, "unet": 16, "dit": 16}
LR = {"text": 2e-3, "vae": 1e-3, "vae_full": 3e-4, "unet": 1e-3, "dit": 2e-3}
PLOTTED = ("text", "vae", "vae_full", "unet", "dit")
STAGES = ("text", "vae", "unet", "dit")
N_LATENTS = 6_000
CROP = 64
SHAPE_CROP_P = 0.75
INITIAL_LOGVAR = -6.0
EMPTY_CAPTION_P = 0.1
MIN_SNR = 5.0
HIGH_NOISE_POWER = 2.0  # t = T (1 - u^p), u uniform: about a third of the samples at t >= 0.9 T


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction", steps_offset=1)


def inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(train_scheduler().config)


def sd_pipeline(text_encoder, tokenizer, vae, unet, scheduler=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def pixart_pipeline(text_encoder, tokenizer, vae, transformer, scheduler=None):
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler or inference_scheduler())


def _lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of a model's parameters, warming up as (1+n)/(10+n)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


@functools.cache
def bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (oneDNN's check); where it does not, bf16 autocast is
    emulated: the VAE encoding 16 scenes took 43 s under it on an AVX2 machine and 1.4 s in float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision() -> str:
    return "bf16" if bf16_native() else "fp32"


def mixed_precision():
    """bf16 autocast where the CPU has it natively, else float32 (a context that does nothing)."""
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision() == "bf16" else contextlib.nullcontext()


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True)


def _optimise(model, stage: str, steps: int, loss_fn, log: dict, quiet: bool, ema: EMA | None = None):
    opt = torch.optim.AdamW(model.parameters(), lr=LR[stage], weight_decay=0.01)
    losses: list[float] = []
    start = time.time()
    bar = _progress(steps, stage, quiet)
    smooth = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, LR[stage], warmup=min(100, max(1, steps // 10)))
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        value = float(loss.detach())  # one sync per step: the progress bar and the plot need it
        losses.append(value)
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}")
    bar.close()
    log[stage] = {"steps": steps, "batch": BATCH[stage], "lr": LR[stage], "seconds": round(time.time() - start, 1),
                  "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:]),
                  "losses": [round(v, 5) for v in losses]}


def _mean(xs):
    return round(sum(xs) / len(xs), 5) if xs else None


# -- stages -------------------------------------------------------------------------------------


class SceneReader(torch.nn.Module):
    """Reads a scene back from text-encoder outputs, as a denoiser's cross-attention would: one
    learned query per grid cell and one for the background attend over the caption's tokens, and
    each predicts that cell's colour, kind and size (or "empty") or the background's two colours.
    """

    SLOTS = len(data.POSITIONS) + 1

    def __init__(self, width: int, heads: int = 4):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(self.SLOTS, width) * 0.5)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        n = len(data.COLOURS)
        self.sizes = (n + 1, len(data.SHAPES) + 1, len(data.SIZES) + 1, n, n)
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, sum(self.sizes)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        q = self.queries.expand(tokens.shape[0], -1, -1)
        read, _ = self.attn(q, tokens, tokens, key_padding_mask=~mask.bool(), need_weights=False)
        return list(self.out(read).split(self.sizes, dim=-1))


def scene_targets(scenes: list[data.Scene]) -> torch.Tensor:
    """(B, slots, 5) class indices: per cell colour/kind/size with 0 = empty (and -100, ignored, for
    the background columns); for the background slot its top and bottom colours."""
    colours, positions = list(data.COLOURS), list(data.POSITIONS)
    t = torch.full((len(scenes), SceneReader.SLOTS, 5), -100, dtype=torch.long)
    t[:, :-1, :3] = 0
    for b, scene in enumerate(scenes):
        for s in scene.shapes:
            t[b, positions.index(s.position), :3] = torch.tensor(
                [1 + colours.index(s.colour), 1 + data.SHAPES.index(s.kind), 1 + list(data.SIZES).index(s.size)])
        t[b, -1, 3:] = torch.tensor([colours.index(scene.background[0]), colours.index(scene.background[-1])])
    return t


def train_text_encoder(tokenizer, steps: int, seed: int, log: dict, quiet: bool):
    """Pretrain the text encoder to make each caption's scene readable by cross-attention (as CLIP
    is pretrained before SD freezes it). A randomly initialised encoder keeps the words apart but not
    which colour belongs to which place: its attention averages every earlier word alike, so the
    "red" of "a red circle at the top left" looks the same as that of "on a red background", and
    denoisers trained on it learned to ignore the captions. Returns the encoder, frozen."""
    torch.manual_seed(seed)
    encoder = make_text_encoder(len(tokenizer))
    reader = SceneReader(encoder.config.hidden_size)
    model = torch.nn.ModuleList([encoder, reader]).train()
    stream = data.scenes(seed + 20)

    def encode(scenes):
        ids = tokenizer([s.caption for s in scenes], padding=True, return_tensors="pt")
        return encoder(ids.input_ids).last_hidden_state, ids.attention_mask

    def loss_fn(step):
        scenes = [next(stream) for _ in range(BATCH["text"])]
        tokens, mask = encode(scenes)
        target = scene_targets(scenes)
        return sum(F.cross_entropy(lg.flatten(0, 1), target[..., i].flatten(), ignore_index=-100)
                   for i, lg in enumerate(reader(tokens, mask)))

    _optimise(model, "text", steps, loss_fn, log, quiet)
    model.eval()
    held_stream = data.scenes(seed + 21, held_out=True)
    held = [next(held_stream) for _ in range(512)]
    with torch.no_grad():
        logits = reader(*encode(held))
    target = scene_targets(held)
    right = [(lg.argmax(-1) == target[..., i]) | (target[..., i] < 0) for i, lg in enumerate(logits)]
    scene_ok = torch.stack(right).all(0).all(-1).float().mean()
    log["text"]["held_out_scene_accuracy"] = round(float(scene_ok), 4)
    if not quiet:
        print(f"text encoder: held-out captions read back whole {float(scene_ok):.1%}", flush=True)
    return encoder.eval().requires_grad_(False)


def train_vae(steps: int, full_steps: int, seed: int, log: dict, quiet: bool):
    torch.manual_seed(seed)
    vae = make_vae()
    with torch.no_grad():  # posterior std starts at exp(-3), not ~1: unit noise would drown the early latents
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(INITIAL_LOGVAR)
    vae.train()
    stream = data.scenes(seed)
    rng = random.Random(seed)

    def crop(scene: data.Scene, img: torch.Tensor) -> torch.Tensor:
        """A CROP x CROP window; most are centred (with jitter) on one of the scene's shapes, because
        windows of plain background teach little, and small shapes are what a VAE loses first."""
        hi = IMAGE_SIZE - CROP
        if rng.random() < SHAPE_CROP_P:
            cx, cy = rng.choice(scene.shapes).centre(IMAGE_SIZE)
            jx, jy = rng.uniform(-CROP / 4, CROP / 4), rng.uniform(-CROP / 4, CROP / 4)
            x, y = (min(hi, max(0, round(c + j - CROP / 2))) for c, j in ((cx, jx), (cy, jy)))
        else:
            x, y = rng.randrange(hi + 1), rng.randrange(hi + 1)
        return img[:, y:y + CROP, x:x + CROP]

    def loss_fn(stage, step):
        scenes = [next(stream) for _ in range(BATCH[stage])]
        images = torch.stack([data.render(s, IMAGE_SIZE) for s in scenes])
        if stage == "vae":
            images = torch.stack([crop(s, img) for s, img in zip(scenes, images)])
        with mixed_precision():
            post = vae.encode(images).latent_dist
            rec = vae.decode(post.sample()).sample
        return (rec.float() - images).abs().mean() + 0.5 * F.mse_loss(rec.float(), images) + 1e-6 * post.kl().mean()

    _optimise(vae, "vae", steps, lambda step: loss_fn("vae", step), log, quiet)
    _optimise(vae, "vae_full", full_steps, lambda step: loss_fn("vae_full", step), log, quiet)
    vae.eval()
    # scaling factor: unit variance of the scaled latents, as SD's 0.18215 was chosen
    images, _ = data.batch(data.scenes(seed + 1), 64, IMAGE_SIZE)
    held, _ = data.batch(data.scenes(seed + 2, held_out=True), 32, IMAGE_SIZE)
    # the caption-following bar of the denoisers, on ground truth passed through the VAE: their ceiling
    eval_scenes = data.evaluation_scenes(48)
    eval_images = torch.stack([data.render(s, IMAGE_SIZE) for s in eval_scenes])
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        rec = vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1)
        eval_rec = vae.decode(vae.encode(eval_images).latent_dist.mode()).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=round(float(1 / z.std()), 5))
    log["vae"]["scaling_factor"] = vae.config.scaling_factor
    log["vae"]["held_out_psnr_db"] = round(psnr(rec, held, data_range=2.0), 2)  # images in [-1, 1]
    log["vae"]["caption_score_of_reconstructions"] = round(
        float(data.follows_caption(eval_rec, eval_scenes).float().mean()), 3)
    if not quiet:
        print(f"VAE: held-out PSNR {log['vae']['held_out_psnr_db']} dB, caption score of reconstructions "
              f"{log['vae']['caption_score_of_reconstructions']}, scaling factor {vae.config.scaling_factor}",
              flush=True)
    return vae


@torch.no_grad()
def cache_latents(vae, n: int, seed: int, log: dict, quiet: bool):
    """Mean and std of the VAE posterior for `n` training scenes (fp16), and their captions."""
    stream = data.scenes(seed + 10)
    means, stds, captions = [], [], []
    bar = _progress(n, "latents", quiet)
    start = time.time()
    while len(captions) < n:
        images, caps = data.batch(stream, min(64, n - len(captions)), IMAGE_SIZE)
        with mixed_precision():
            post = vae.encode(images).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
        captions += caps
        bar.update(len(caps))
    bar.close()
    log["latents"] = {"count": n, "seconds": round(time.time() - start, 1)}
    return torch.cat(means), torch.cat(stds), captions


def train_denoiser(stage: str, model, pipe, cache, steps: int, seed: int, log: dict, quiet: bool):
    """v-prediction; `pipe` supplies encode_prompt. Returns the EMA model.

    Where a caption's shapes go is decided at high noise, where the input shows nothing of them and
    only the caption can say. These choices made the denoisers learn that mapping:
    - v-prediction rather than epsilon: at high noise an epsilon loss hardly depends on the image,
      while v there is mostly the clean latent;
    - timesteps drawn as T (1 - u^2): a third of the samples at t >= 0.9 T instead of a tenth (a
      half, with u^3, made the U-Net follow less: 0.29 against 0.36 of 96 held-out captions), and
      loss weights clamp(SNR, 1, 5) / (SNR + 1): min-SNR-5 at low noise, the plain v loss at high
      noise (min-SNR alone weights t ~ T by about 0.005);
    - a learning rate of 2e-3 for the DiT: at 5e-4 a run trained only at t >= 0.9 T stays on the
      plateau of a right background without shapes. The U-Net trains at 1e-3 (at 2e-3 without
      warm-up its high-noise loss rose);
    - positions in the U-Net's cross-attention queries (`models.ReferenceUNet2DConditionModel`):
      without them its queries know no place at high noise, and no learning rate, width or depth
      tried got it off that plateau;
    - for the U-Net, a mid-block of four transformer blocks (`models.make_unet`) and 2400 steps:
      with one mid-block transformer and 1800 steps it followed 0.36 of 96 held-out captions, with
      four 0.55, with four and 2400 steps 0.69 (its loss was still falling at 1800)."""
    means, stds, captions = cache
    sched = train_scheduler()
    alphas = sched.alphas_cumprod
    scale = pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ema = EMA(model)
    model.train()

    def loss_fn(step):
        idx = torch.randint(0, len(captions), (BATCH[stage],), generator=gen)
        mean = means[idx].float()
        latents = (mean + stds[idx].float() * torch.randn(mean.shape, generator=gen)) * scale
        caps = ["" if rng.random() < EMPTY_CAPTION_P else captions[i] for i in idx.tolist()]
        u = torch.rand(len(caps), generator=gen)
        t = ((1 - u ** HIGH_NOISE_POWER) * sched.config.num_train_timesteps).long().clamp(
            0, sched.config.num_train_timesteps - 1)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        with torch.no_grad():
            if stage == "unet":
                emb, _ = pipe.encode_prompt(caps, "cpu", 1, False)
                kwargs = {"encoder_hidden_states": emb}
            else:
                emb, mask, _, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False, device="cpu",
                                                     clean_caption=False)
                kwargs = {"encoder_hidden_states": emb, "encoder_attention_mask": mask,
                          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        with mixed_precision():
            if stage == "unet":
                pred = model(noisy, t, **kwargs).sample
            else:
                pred = model(noisy, timestep=t, **kwargs).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(min=1.0, max=MIN_SNR) / (snr + 1)  # min-SNR-gamma for v, floored at the plain v loss
        target = sched.get_velocity(latents, noise, t)
        per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    _optimise(model, stage, steps, loss_fn, log, quiet, ema=ema)
    return ema.model


# -- loss plot ----------------------------------------------------------------------------------


def loss_svg(log: dict, stages=PLOTTED) -> str:
    """Smoothed training loss per stage (log scale), as a small standalone SVG."""
    w, h, pad = 300, 200, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(stages)}" height="{h + pad}" '
             'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for k, stage in enumerate(stages):
        losses = log.get(stage, {}).get("losses") or []
        x0 = k * w + pad
        parts.append(f'<text x="{x0}" y="14" font-size="13">{stage} loss (EMA 0.98, log scale)</text>')
        parts.append(f'<rect x="{x0}" y="20" width="{w - pad - 10}" height="{h - 20}" fill="none" stroke="#999"/>')
        if not losses:
            continue
        smooth, s = [], losses[0]
        for v in losses:
            s = 0.98 * s + 0.02 * v
            smooth.append(math.log10(max(s, 1e-8)))
        lo, hi = min(smooth), max(smooth)
        hi = hi if hi > lo else lo + 1
        pw, ph = w - pad - 10, h - 20
        pts = " ".join(f"{x0 + pw * i / max(1, len(smooth) - 1):.1f},{20 + ph * (hi - v) / (hi - lo):.1f}"
                       for i, v in enumerate(smooth))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        parts.append(f'<text x="{x0 - 4}" y="28" text-anchor="end">{10 ** hi:.3g}</text>')
        parts.append(f'<text x="{x0 - 4}" y="{h}" text-anchor="end">{10 ** lo:.3g}</text>')
        parts.append(f'<text x="{x0 + pw}" y="{h + 14}" text-anchor="end">{len(losses)} steps</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# -- driver -------------------------------------------------------------------------------------


def train(out: str | Path, scale: float = 1.0, seed: int = 0, n_latents: int | None = None,
          stages: tuple[str, ...] = STAGES, quiet: bool = False) -> dict:
    """Train the stages and write every component under `out`; returns the training log."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    steps = {k: max(1, round(v * scale)) for k, v in STEPS.items()}
    n_latents = n_latents or max(BATCH["unet"], round(N_LATENTS * min(1.0, scale * 10)))
    log: dict = {"command": " ".join([Path(sys.executable).name, "-m", "diffaccel.reference.train", *sys.argv[1:]]),
                 "seed": seed, "scale": scale, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "precision": precision()}
    started = time.time()
    path = out / "training_log.json"
    # a partial re-run keeps the other stages' entries
    previous = json.loads(path.read_text()) if path.exists() and set(stages) != set(STAGES) else None

    def save() -> dict:
        """Write the log and the loss plot: after every stage, so a stopped run keeps what it finished."""
        log["seconds"] = round(time.time() - started, 1)
        merged = log if previous is None else {
            **previous, **log, "runs": [*previous.get("runs", [previous["command"]]), log["command"]]}
        merged["total_training_seconds"] = round(
            sum(merged[k]["seconds"] for k in (*PLOTTED, "latents") if k in merged), 1)
        path.write_text(json.dumps(merged) + "\n")
        (out / "loss.svg").write_text(loss_svg(merged))
        return merged

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    inference_scheduler().save_pretrained(out / "scheduler")
    if "text" in stages:
        text_encoder = train_text_encoder(tokenizer, steps["text"], seed, log, quiet)
        text_encoder.save_pretrained(out / "text_encoder")
        save()
    else:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval().requires_grad_(False)

    if "vae" in stages:
        vae = train_vae(steps["vae"], steps["vae_full"], seed, log, quiet)
        vae.save_pretrained(out / "vae")
        save()
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(out / "vae")
    vae.eval().requires_grad_(False)

    if "unet" in stages or "dit" in stages:
        cache = cache_latents(vae, n_latents, seed, log, quiet)
    if "unet" in stages:
        torch.manual_seed(seed + 1)
        unet = make_unet()
        pipe = sd_pipeline(text_encoder, tokenizer, vae, unet)
        train_denoiser("unet", unet, pipe, cache, steps["unet"], seed + 1, log, quiet).save_pretrained(out / "unet")
        save()
    if "dit" in stages:
        torch.manual_seed(seed + 2)
        transformer = make_transformer()
        pipe = pixart_pipeline(text_encoder, tokenizer, vae, transformer)
        train_denoiser("dit", transformer, pipe, cache, steps["dit"], seed + 2, log,
                       quiet).save_pretrained(out / "transformer")

    return save()


def main(argv: list[str] | None = None) -> int:
    from . import WEIGHTS_DIR

    parser = argparse.ArgumentParser(prog="python -m diffaccel.reference.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: the packaged weights)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default step counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latents", type=int, default=None, help=f"cached training latents (default {N_LATENTS})")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="stages to run; the others are read back from --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    log = train(args.out, scale=args.scale, seed=args.seed, n_latents=args.latents, stages=tuple(args.stages),
                quiet=args.quiet)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict) else v)
                      for k, v in log.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
