"""`diffaccel bench`: speed and fidelity of the methods side by side with the peers, in one run.

Per denoiser call on a full-size architecture with random weights: each configuration runs on the
same inputs; speed-up and relative error are against the unaccelerated baseline of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

from .methods.duca import DuCaConfig
from .methods.toca import ToCaConfig
from .metrics import relative_error

ARCHS = ("sd15", "tiny-sd")


def sd15_unet() -> torch.nn.Module:
    """The SD 1.5 U-Net architecture (860M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()


def build_arch(name: str) -> torch.nn.Module:
    if name == "sd15":
        return sd15_unet()
    from .testing import sd1_unet

    torch.manual_seed(0)
    return sd1_unet().eval()  # "tiny-sd": the test-size U-Net, for smoke runs


def _peer_tomesd(model, ratio: float):
    import tomesd

    tomesd.apply_patch(model, ratio=ratio)
    return lambda: tomesd.remove_patch(model)


def _ours(model, spec, cfg: bool, num_steps: int | None = None):
    from . import accelerate_pipeline, remove_acceleration

    accelerate_pipeline(model, spec, cfg_batched=cfg, num_steps=num_steps)
    return lambda: remove_acceleration(model)


@contextlib.contextmanager
def _installed(model, install):
    """The configuration installed on `model` (an installer returns its remover; None: the baseline)."""
    remove = install(model) if install else None
    try:
        yield
    finally:
        if remove:
            remove()


def _timed(model, install, fn) -> tuple[object, float]:
    """(fn(), seconds) with the configuration installed on `model` for the call only."""
    with _installed(model, install), torch.no_grad():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


def _only(settings: list, only: list[str] | None) -> list:
    """The baseline and the settings whose label contains one of `only` (all of them without it)."""
    return [s for s in settings if s[0] == "baseline" or not only or any(o in s[0] for o in only)]


def _report(args: argparse.Namespace, **fields) -> dict:
    """A report's header: the command that produced it, the architecture and the machine."""
    return dict(command="diffaccel " + " ".join(shlex.quote(a) for a in args.argv), arch=args.arch, **fields,
                device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                platform=platform.platform(), date=time.strftime("%Y-%m-%d"))


def _rounds(model, configs: list, calls: list, warmup: int, fn) -> tuple[dict, dict]:
    """Interleaved rounds: every (label, installer) configuration runs fn(call) once per round, on that
    round's call input (the first `warmup` rounds use the first input and are not kept), so slow
    drifts of the machine's speed hit all of them alike. Returns ({label: [seconds]}, {label: [outputs]})."""
    times: dict[str, list[float]] = {label: [] for label, _ in configs}
    outs: dict[str, list] = {label: [] for label, _ in configs}
    for r in range(warmup + len(calls)):
        arg = calls[max(0, r - warmup)]
        for label, install in configs:
            out, elapsed = _timed(model, install, lambda arg=arg: fn(arg))
            if r >= warmup:
                times[label].append(elapsed)
                outs[label].append(out)
    return times, outs


def configurations(ratio: float, factor: float, cfg: bool = False) -> list[tuple[str, object]]:
    """(label, installer) pairs; an installer patches the model and returns its remover."""
    return [
        ("baseline", None),
        (f"tomesd ratio={ratio}", lambda m: _peer_tomesd(m, ratio)),
        (f"diffaccel tome ratio={ratio}", lambda m: _ours(m, {"method": "tome", "ratio": ratio}, cfg)),
        (f"diffaccel sito ratio={ratio}", lambda m: _ours(m, {"method": "sito", "ratio": ratio}, cfg)),
        (f"diffaccel todo factor={factor}", lambda m: _ours(m, {"method": "todo", "factor": factor}, cfg)),
    ]


def run_bench(args: argparse.Namespace) -> dict:
    if args.cfg and args.batch % 2:
        raise SystemExit("--cfg needs an even --batch (guidance pairs)")
    model = build_arch(args.arch)
    cross = model.config.cross_attention_dim
    results = []
    for size in args.sizes:
        lat = size // 8
        gen = torch.Generator().manual_seed(0)
        # one input per timed run (different noise and timestep), so the error is an average
        # --cfg: each call is a guidance pair, as pipelines batch it: the same latents twice, then
        # [unconditional, conditional] contexts
        rows = args.batch // 2 if args.cfg else args.batch
        inputs = []
        for i in range(args.repeats):
            latents = torch.randn(rows, 4, lat, lat, generator=gen)
            inputs.append((torch.cat([latents, latents]) if args.cfg else latents,
                           torch.tensor([args.timestep + 97 * i]), torch.randn(args.batch, 77, cross, generator=gen)))
        configs = _only(configurations(args.ratio, args.factor, args.cfg), args.only)
        times, outs = _rounds(model, configs, inputs, args.warmup, lambda inp: model(*inp).sample)
        base_time = statistics.median(times["baseline"])
        for label, _ in configs:
            t = statistics.median(times[label])
            err = statistics.mean(relative_error(o, b) for o, b in zip(outs[label], outs["baseline"]))
            row = dict(size=size, batch=args.batch, config=label, seconds=t, speedup=base_time / t, rel_error=err,
                       runs=len(times[label]))
            results.append(row)
            print(f"{size:>5} {label:<32} {t:8.2f}s {row['speedup']:6.2f}x  rel.err {err:.4f}", flush=True)
    return _report(args, cfg_pairs=args.cfg, results=results)


# -- caching methods: whole runs, FLOPs counted by torch.utils.flop_counter ---------------------

CACHE_ARCHS = ("pixart-alpha", "flux-2x4", "flux-dev", "tiny-pixart", "tiny-flux")
FLOPS_ONLY = {"flux-dev": "FLUX.1-dev at full depth has 12B parameters; count its FLOPs (--steps 0, on the meta "
                          "device) and time flux-2x4"}
# The papers' settings per architecture (ToCa: PixArt-alpha N=3 R=0.3; Flux N=4 R=0.1, first 3 steps
# full; DuCa: PixArt N=3 R=0.75; FORA: N=3): with our default schedules and scores, and as the
# reference code sets them (`paper(...)`: its interval schedule, scores and stream factors).
PAPER_SETTINGS = {
    "pixart": [("fora N=3", {"method": "fora", "interval": 3}),
               ("toca N=3 R=0.3", {"method": "toca", "interval": 3, "fresh_ratio": 0.3}),
               ("toca paper(pixart-alpha)", ToCaConfig.paper("pixart-alpha")),
               ("duca N=3 R=0.75", {"method": "duca", "interval": 3, "fresh_ratio": 0.75}),
               ("duca paper(pixart-alpha)", DuCaConfig.paper("pixart-alpha"))],
    "flux": [("fora N=3", {"method": "fora", "interval": 3}),
             ("toca N=4 R=0.1 warmup=3", {"method": "toca", "interval": 4, "fresh_ratio": 0.1, "warmup": 3}),
             ("toca paper(flux)", ToCaConfig.paper("flux")),
             ("duca N=4 R=0.1 warmup=3", {"method": "duca", "interval": 4, "fresh_ratio": 0.1, "warmup": 3})],
}


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


def _run_steps(model, inputs, steps: int, device) -> torch.Tensor:
    out = None
    with torch.no_grad():
        for step in range(steps):
            out = model(**inputs(1, step, steps, device)).sample
    return out


def caching_flops(arch: str, steps: int, settings: list) -> dict[str, float]:
    """Total FLOPs of `steps` denoiser calls per configuration, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model, inputs = caching_arch(arch)
    flops = {}
    for label, spec in settings:
        install = (lambda m, spec=spec: _ours(m, spec, "pixart" in arch, steps)) if spec else None
        with _installed(model, install), FlopCounterMode(display=False) as counter:
            _run_steps(model, inputs, steps, "meta")
        flops[label] = counter.get_total_flops()
    return flops


def run_caching_bench(args: argparse.Namespace) -> dict:
    family = "flux" if "flux" in args.arch else "pixart"
    settings = [("baseline", None), *PAPER_SETTINGS[family],
                # installed, but its policy idle at every step: the cost of being there
                ("toca idle (warmup >= steps)", {"method": "toca", "warmup": 10_000})]
    settings = _only(settings, args.only)
    report = _report(args, flops={}, latency=[])
    for steps in args.flop_steps:
        flops = caching_flops(args.arch, steps, settings)
        report["flops"][steps] = {k: {"flops": v, "speedup": flops["baseline"] / v} for k, v in flops.items()}
        for k, v in flops.items():
            print(f"FLOPs {steps:>3} steps  {k:<28} {v / 1e12:9.2f} TFLOP {flops['baseline'] / v:6.2f}x", flush=True)
    if args.steps:
        torch.manual_seed(0)
        model, inputs = caching_arch(args.arch)
        configs = [(label, (lambda m, spec=spec: _ours(m, spec, "pixart" in args.arch, args.steps)) if spec else None)
                   for label, spec in settings]
        times, runs = _rounds(model, configs, [None] * args.repeats, args.warmup,
                              lambda _: _run_steps(model, inputs, args.steps, "cpu"))
        outs = {label: out[-1] for label, out in runs.items()}
        base = statistics.median(times["baseline"])
        flop_speedup = report["flops"].get(args.steps, {})
        for label, _ in settings:
            t = statistics.median(times[label])
            row = dict(config=label, steps=args.steps, seconds=t, speedup=base / t,
                       flop_speedup=flop_speedup.get(label, {}).get("speedup"),
                       rel_error_last_step=relative_error(outs[label], outs["baseline"]), runs=len(times[label]))
            report["latency"].append(row)
            print(f"latency {args.steps} steps {label:<28} {t:8.2f}s {row['speedup']:6.2f}x"
                  f"  (FLOPs {row['flop_speedup'] or float('nan'):.2f}x)  rel.err {row['rel_error_last_step']:.4f}",
                  flush=True)
    return report


# -- caching peers side by side: whole Euler runs with real compute -------------------------------


def _peer_diffusers(model, config):
    """diffusers' own cache hooks (FirstBlockCache, TaylorSeer); calls run in a cache context."""
    model.enable_cache(config)
    model._reset_stateful_cache()
    return model.disable_cache


def _peer_cache_dit(model, steps: int, taylorseer: bool):
    """cache-dit DBCache with a static step mask (compute every third step and the last; the first
    block always runs, Fn=1, Bn=0), optionally with its TaylorSeer calibrator (order 1)."""
    import cache_dit

    mask = [1 if i % 3 == 0 or i == steps - 1 else 0 for i in range(steps)]
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps,
                                  steps_computation_mask=mask, steps_computation_policy="static", max_warmup_steps=0)
    cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
    cache_dit.enable_cache(model, cache_config=cfg, calibrator_config=cal)
    return lambda: cache_dit.disable_cache(model)


def peer_settings(steps: int) -> list[tuple[str, object, bool]]:
    """(label, installer, runs in a diffusers cache context). cache-dit patches the transformer's
    forward (kept after `disable_cache`, harmless for later runs), so its rows come last."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    rows = [("baseline", None, False)]
    rows += [(f"diffaccel {label}", lambda m, spec=spec: _ours(m, spec, False, steps), False)
             for label, spec in PAPER_SETTINGS["flux"]]
    rows += [
        ("diffusers FirstBlockCache threshold=0.05",
         lambda m: _peer_diffusers(m, FirstBlockCacheConfig(threshold=0.05)), True),
        ("diffusers FirstBlockCache threshold=0.5",
         lambda m: _peer_diffusers(m, FirstBlockCacheConfig(threshold=0.5)), True),
        ("diffusers TaylorSeer interval=3",
         lambda m: _peer_diffusers(m, TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1)), True),
        ("cache-dit DBCache static mask 1/3", lambda m: _peer_cache_dit(m, steps, False), False),
        ("cache-dit DBCache static mask 1/3 + TaylorSeer", lambda m: _peer_cache_dit(m, steps, True), False),
    ]
    return rows


def _euler(model, inputs, steps: int, in_context: bool) -> torch.Tensor:
    """A flow-matching Euler run: each step feeds the model's velocity back into the latents, so
    consecutive calls see close inputs, as in a real sampler."""
    kwargs = inputs(1, 0, steps, "cpu")
    x = kwargs.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        kwargs["timestep"] = sigmas[i].expand(x.shape[0])
        ctx = model.cache_context("cond") if in_context else contextlib.nullcontext()
        with ctx:
            v = model(hidden_states=x, **kwargs).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def run_peer_bench(args: argparse.Namespace) -> dict:
    """Whole Euler runs on the Flux architecture: our caching methods at the papers' settings beside
    cache-dit and diffusers' caches, FLOPs counted on the real run, latency, error of the result."""
    from torch.utils.flop_counter import FlopCounterMode

    steps, size = args.steps, args.sizes[0]
    torch.manual_seed(0)
    model, inputs = caching_arch(args.arch, size)
    settings = _only(peer_settings(steps), args.only)
    report = _report(args, size=size, steps=steps, results=[])
    base_out = base_time = base_flops = None
    for label, install, in_context in settings:
        with _installed(model, install), torch.no_grad(), FlopCounterMode(display=False) as counter:
            t0 = time.perf_counter()
            out = _euler(model, inputs, steps, in_context)
            elapsed = time.perf_counter() - t0
        flops = counter.get_total_flops()
        if base_out is None:
            base_out, base_time, base_flops = out, elapsed, flops
        row = dict(config=label, seconds=elapsed, speedup=base_time / elapsed, flops=flops,
                   flop_speedup=base_flops / flops, rel_error=relative_error(out, base_out))
        report["results"].append(row)
        print(f"{label:<48} {elapsed:8.2f}s {row['speedup']:6.2f}x  (FLOPs {row['flop_speedup']:.2f}x)"
              f"  rel.err {row['rel_error']:.4f}", flush=True)
    return report


# -- token methods on DiTs: one denoiser call at high resolution -----------------------------------

# Each method at its default (the cost model decides where it acts) and at two stronger settings.
TOKEN_SETTINGS = [
    ("tome default", "tome"), ("tome ratio=0.6", {"method": "tome", "ratio": 0.6}),
    ("tome ratio=0.75", {"method": "tome", "ratio": 0.75}),
    ("todo default", "todo"), ("todo factor=3", {"method": "todo", "factor": 3.0}),
    ("todo factor=4", {"method": "todo", "factor": 4.0}),
    ("sito default", "sito"), ("sito ratio=0.6", {"method": "sito", "ratio": 0.6}),
    ("sito ratio=0.75", {"method": "sito", "ratio": 0.75}),
]


def run_token_bench(args: argparse.Namespace) -> dict:
    """Per denoiser call on a DiT architecture at args.sizes[0] px: FLOPs (meta device) and latency
    of the token methods against the baseline, with the relative error of the output."""
    from torch.utils.flop_counter import FlopCounterMode

    size = args.sizes[0]
    pairs = args.cfg  # PixArt calls as guidance pairs (both halves share one selection)
    settings = _only([("baseline", None), *TOKEN_SETTINGS], args.only)
    report = _report(args, size=size, batch=args.batch, cfg_pairs=pairs, results=[])
    configs = [(label, (lambda m, spec=spec: _ours(m, spec, pairs)) if spec else None) for label, spec in settings]
    with torch.device("meta"):
        meta_model, meta_inputs = caching_arch(args.arch, size)
    flops = {}
    for label, install in configs:
        with _installed(meta_model, install), torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta_model(**meta_inputs(args.batch, 0, 1, "meta", pairs))
        flops[label] = counter.get_total_flops()
    del meta_model
    torch.manual_seed(0)
    model, inputs = caching_arch(args.arch, size)
    calls = [inputs(args.batch, 7 * i + 3, 20, "cpu", pairs) for i in range(args.repeats)]
    times, outs = _rounds(model, configs, calls, args.warmup, lambda kwargs: model(**kwargs).sample)
    base = statistics.median(times["baseline"])
    for label, _ in settings:
        t = statistics.median(times[label])
        err = statistics.mean(relative_error(o, b) for o, b in zip(outs[label], outs["baseline"]))
        row = dict(config=label, seconds=t, speedup=base / t, flops=flops[label],
                   flop_speedup=flops["baseline"] / flops[label], rel_error=err, runs=len(times[label]))
        report["results"].append(row)
        print(f"{size:>5} {label:<18} {t:8.2f}s {row['speedup']:6.2f}x  (FLOPs {row['flop_speedup']:.2f}x)"
              f"  rel.err {err:.4f}", flush=True)
    return report


def cmd_bench(args: argparse.Namespace) -> int:
    if args.arch in FLOPS_ONLY and (args.steps or args.peers or args.tokens):
        raise SystemExit(f"diffaccel bench: --arch {args.arch} is for FLOP counts only: {FLOPS_ONLY[args.arch]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch in CACHE_ARCHS and args.peers:
        report = run_peer_bench(args)
    elif args.arch in CACHE_ARCHS and args.tokens:
        report = run_token_bench(args)
    else:
        report = run_caching_bench(args) if args.arch in CACHE_ARCHS else run_bench(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up and error of the methods and peers on a full-size architecture")
    p.add_argument("--arch", choices=ARCHS + CACHE_ARCHS, default="sd15",
                   help="sd15: per-call token methods and peers; pixart-alpha, flux-2x4: whole runs of the caching "
                        "methods at the papers' settings, FLOPs (meta device) and latency; flux-dev: FLUX.1-dev's "
                        "full depth at 1024 px, FLOPs only (--steps 0)")
    p.add_argument("--tokens", action="store_true",
                   help="pixart-alpha, flux-2x4: one denoiser call per configuration at --sizes[0] px with the "
                        "token methods (tome, todo, sito) at their defaults and two stronger settings")
    p.add_argument("--peers", action="store_true",
                   help="flux-2x4: whole Euler runs of --steps steps at --sizes[0] px, our caching methods beside "
                        "cache-dit (DBCache, static mask, +TaylorSeer) and diffusers' FirstBlockCache and TaylorSeer; "
                        "FLOPs counted on the real run")
    p.add_argument("--flop-steps", type=int, nargs="*", default=[20, 50],
                   help="caching archs: step counts of the runs to count FLOPs of (none: skip)")
    p.add_argument("--steps", type=int, default=20, help="caching archs: steps of the timed runs (0: FLOPs only)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5, help="ToMe/SiTo ratio")
    p.add_argument("--factor", type=float, default=2.0, help="ToDo factor")
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds, each on its own input")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cfg", action="store_true",
                   help="inputs are guidance pairs (batch = 2 x images); ours is told, so both halves share one "
                        "token selection")
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    p.add_argument("--out", help="write the JSON report here")
    p.set_defaults(func=cmd_bench)
