"""End-to-end denoiser loops on the GPU, random weights at full size, fp16, SDPA attention.

Parts (--part):
  unet  the SD 1.5 U-Net at 1024^2 and 2048^2 (latents 128^2, 256^2), batch 2 (a CFG pair), K calls:
        baseline, tomesd ratio 0.5, diffaccel ToMe ratio 0.5 and ToDo factor 2, ours each with the
        kernels' torch reference (DIFFACCEL_KERNELS=reference) and with the default dispatch.
  dit   PixArt-alpha (XL/2, 28 blocks, batch 2 as a CFG pair) and the Flux architecture (FLUX.1-dev:
        19 double + 38 single blocks, batch 1, guidance-distilled) at 1024^2, K Euler steps: baseline,
        FORA, ToCa, DuCa (ours with and without our kernels) and cache-dit DBCache, at matched FLOPs.

Matching rule (caching): every setting computes its full steps at the same cadence, every 3rd step
from step 0 (FORA interval 3; ToCa and DuCa interval 3; DBCache a static step mask i % 3 == 0 with its
Fn=1 probe block run at every step, Bn=0); ToCa's and DuCa's fresh-token ratio R is the one, from a
grid, whose FLOPs over the K-step run (torch.utils.flop_counter on the meta device, `--match`) are
nearest FORA's. The FLOPs of each setting are counted again on the GPU, in its warm-up run, and
reported beside its time.

Timing: each configuration installs, runs K denoiser calls with a scheduler-free step counter
(`accelerate_pipeline(model, spec, num_steps=K)`; every call is a step), then is removed; one
warm-up round (FLOPs counted in it), then timed rounds, configurations interleaved in each round
(cache-dit last, after every other configuration's rounds: it patches the model's forward); the
median over rounds, wall clock with CUDA synchronisation around the loop.

--smoke: tiny models, CPU, fp32, a few steps: checks the logic in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    Deadline,
    command_line,
    device_and_dtype,
    kernel_info,
    kernel_mode,
    machine,
    sync,
    write_json,
)

# -- architectures, configs inline (no hub) ------------------------------------------------------

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
PIXART_ALPHA = dict(  # PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json
    sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
    patch_size=2, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=True)
TINY_PIXART = dict(PIXART_ALPHA, sample_size=16, num_layers=2, num_attention_heads=3, attention_head_dim=8,
                   cross_attention_dim=24, caption_channels=32)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(FLUX_DEV, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
TEXT = dict(sd15=(77, 768), pixart=(120, 4096), flux=(512, 4096))  # text tokens, width (full size)
TINY_TEXT = dict(sd15=(8, 32), pixart=(8, 32), flux=(8, 32))

# ToCa's and DuCa's fresh ratio at interval 3, FLOP-matched to FORA interval 3 over `MATCH_STEPS`
# steps at 1024^2 (python bench/gpu/end_to_end.py --match; the counts: bench/gpu/matched_flops.json):
# PixArt ToCa 0.989 x FORA's FLOPs, DuCa 0.993; Flux (counted at 2 + 4 blocks) ToCa 1.025, DuCa 0.994.
MATCH_STEPS = 20
INTERVAL = 3
MATCHED = {"pixart": {"toca": 0.1, "duca": 0.2}, "flux": {"toca": 0.1, "duca": 0.15}}
MATCH_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)


def build(cls_name: str, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, built directly on `device` (no CPU init), then cast to `dtype`."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, cls_name)(**config)
    return model.to(dtype).eval().requires_grad_(False)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Case:
    """One model at one size: how to build it, its inputs and one run of K calls."""

    def __init__(self, family: str, size: int, tiny: bool, device: torch.device, dtype: torch.dtype,
                 flux_blocks: tuple[int, int] | None = None):
        self.family, self.size, self.tiny, self.device, self.dtype = family, size, tiny, device, dtype
        self.text, self.width = (TINY_TEXT if tiny else TEXT)[family]
        self.cfg_pairs = family != "flux"
        if family == "sd15":
            self.cls, self.config, self.latent = "UNet2DConditionModel", TINY_UNET if tiny else SD15_UNET, size // 8
        elif family == "pixart":
            self.cls = "PixArtTransformer2DModel"
            self.config = dict(TINY_PIXART if tiny else PIXART_ALPHA, sample_size=size // 8)
            self.latent = size // 8
        else:
            self.cls, self.config, self.latent = "FluxTransformer2DModel", dict(TINY_FLUX if tiny else FLUX_DEV), size // 16
            if flux_blocks:
                self.config.update(num_layers=flux_blocks[0], num_single_layers=flux_blocks[1])
        self.batch = 2 if self.cfg_pairs else 1

    def describe(self) -> dict:
        return dict(family=self.family, size=self.size, model=self.cls, batch=self.batch, cfg_pairs=self.cfg_pairs,
                    text_tokens=self.text, config={k: v for k, v in self.config.items()})

    def build(self, device: torch.device | None = None) -> torch.nn.Module:
        return build(self.cls, self.config, device or self.device, self.dtype)

    def _to(self, t: torch.Tensor, device) -> torch.Tensor:
        return t.to(device, self.dtype if t.is_floating_point() else t.dtype)

    def inputs(self, device=None) -> tuple[torch.Tensor, dict]:
        """(starting latents, the other call kwargs), on `device` (default: the case's)."""
        dev = device or self.device
        text = _rand(self.batch, self.text, self.width, seed=1)
        if self.family == "flux":
            side = self.latent
            ids = torch.zeros(side, side, 3)
            ids[..., 1] = torch.arange(side)[:, None]
            ids[..., 2] = torch.arange(side)[None, :]
            kw = dict(encoder_hidden_states=text, pooled_projections=_rand(1, self.config["pooled_projection_dim"], seed=2),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(self.text, 3), guidance=torch.full((1,), 3.5))
            x = _rand(1, side * side, self.config["in_channels"], seed=0)
        else:
            x = _rand(1, 4, self.latent, self.latent, seed=0)
            x = torch.cat([x, x])  # a CFG pair: the same latents, [unconditional, conditional] contexts
            kw = dict(encoder_hidden_states=text)
            if self.family == "pixart":
                kw["added_cond_kwargs"] = {"resolution": torch.tensor([[float(self.size)] * 2] * 2),
                                           "aspect_ratio": torch.tensor([[1.0]] * 2)}
        kw = {k: ({a: self._to(b, dev) for a, b in v.items()} if isinstance(v, dict) else self._to(v, dev))
              for k, v in kw.items()}
        return self._to(x, dev), kw

    def run(self, model: torch.nn.Module, steps: int, start: tuple[torch.Tensor, dict]) -> torch.Tensor:
        """K denoiser calls. U-Net: the same latents at K timesteps (token methods act per call).
        DiTs: a flow-matching Euler run, each step feeding the output back, as a sampler does."""
        x, kw = start
        out = x
        with torch.no_grad():
            for i in range(steps):
                frac = i / steps
                if self.family == "sd15":
                    t = torch.full((x.shape[0],), int(999 * (1 - frac)), device=x.device)
                    out = model(x, t, **kw).sample
                    continue
                if self.family == "pixart":
                    t = torch.full((x.shape[0],), 999 * (1 - frac), device=x.device)
                    v = model(hidden_states=x, timestep=t, **kw).sample[:, :4]
                else:
                    t = torch.full((x.shape[0],), 1 - frac, device=x.device, dtype=x.dtype)
                    v = model(hidden_states=x, timestep=t, **kw).sample
                x = x - v / steps
                out = x
        return out


# -- configurations --------------------------------------------------------------------------------


def _ours(spec: dict, cfg_pairs: bool, steps: int) -> Callable:
    def install(model):
        from diffaccel import accelerate_pipeline, remove_acceleration

        accelerate_pipeline(model, spec, cfg_batched=cfg_pairs, num_steps=steps)
        return lambda: remove_acceleration(model)

    return install


def _tomesd(ratio: float) -> Callable:
    def install(model):
        import tomesd

        tomesd.apply_patch(model, ratio=ratio)  # a model (the U-Net itself) or a pipeline; defaults otherwise
        return lambda: tomesd.remove_patch(model)

    return install


def _dbcache(steps: int) -> Callable:
    def install(model):
        import cache_dit

        mask = [1 if i % INTERVAL == 0 else 0 for i in range(steps)]
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps,
                                      steps_computation_mask=mask, steps_computation_policy="static",
                                      max_warmup_steps=0)
        cache_dit.enable_cache(model, cache_config=cfg)
        return lambda: cache_dit.disable_cache(model)

    return install


def configurations(case: Case, steps: int, ratio: float, factor: float) -> list[dict]:
    """Rows: label, setting (the row without its kernel mode), kernels (reference/default; None: not
    ours), install(model) -> remover (None: the baseline), last (runs after the others' rounds)."""
    rows = [dict(label="baseline", setting="baseline", kernels=None, install=None)]
    if case.family == "sd15":
        rows.append(dict(label=f"tomesd ratio={ratio}", setting="tomesd", kernels=None, install=_tomesd(ratio)))
        ours = [(f"diffaccel tome ratio={ratio}", "tome", {"method": "tome", "ratio": ratio}),
                (f"diffaccel todo factor={factor}", "todo", {"method": "todo", "factor": factor})]
    else:
        m = MATCHED[case.family]
        ours = [(f"diffaccel fora N={INTERVAL}", "fora", {"method": "fora", "interval": INTERVAL}),
                (f"diffaccel toca N={INTERVAL} R={m['toca']}", "toca",
                 {"method": "toca", "interval": INTERVAL, "fresh_ratio": m["toca"]}),
                (f"diffaccel duca N={INTERVAL} R={m['duca']}", "duca",
                 {"method": "duca", "interval": INTERVAL, "fresh_ratio": m["duca"]})]
    for label, setting, spec in ours:
        for mode in ("reference", "default"):
            rows.append(dict(label=f"{label} [kernels={mode}]", setting=setting, kernels=mode, spec=spec,
                             install=_ours(spec, case.cfg_pairs, steps)))
    if case.family != "sd15":
        rows.append(dict(label=f"cache-dit DBCache F1B0 static mask 1/{INTERVAL}", setting="dbcache", kernels=None,
                         install=_dbcache(steps), last=True))
    return rows


@contextlib.contextmanager
def installed(model, row: dict):
    with kernel_mode(row["kernels"] or "default"):
        remove = row["install"](model) if row["install"] else None
        try:
            yield
        finally:
            if remove:
                remove()


def one_run(case: Case, model, row: dict, steps: int, start, count_flops: bool) -> tuple[torch.Tensor, float, int | None]:
    """(output, seconds, FLOPs or None) of one run of `steps` calls with the row installed."""
    from torch.utils.flop_counter import FlopCounterMode

    with installed(model, row):
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        sync(case.device)
        t0 = time.perf_counter()
        with counter:
            out = case.run(model, steps, start)
        sync(case.device)
        seconds = time.perf_counter() - t0
    return out, seconds, counter.get_total_flops() if count_flops else None


def bench_case(case: Case, steps: int, rounds: int, ratio: float, factor: float, deadline: Deadline,
               emit: Callable[[dict], None], log: Callable[[str], None]) -> None:
    """Every configuration on one model and size; each finished row goes to emit()."""
    from diffaccel.metrics import relative_error

    t0 = time.perf_counter()
    model = case.build()
    start = case.inputs()
    log(f"{case.family} {case.size}px: built in {time.perf_counter() - t0:.1f}s")
    rows = configurations(case, steps, ratio, factor)
    times: dict[str, list[float]] = {r["label"]: [] for r in rows}
    flops: dict[str, int] = {}
    outs: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    base_run = None

    def do(row, timed: bool):
        nonlocal base_run
        label = row["label"]
        if label in errors:
            return
        est = 1.5 * (base_run or 0.0)
        if not deadline.allows(est + 5):
            errors.setdefault(label, "skipped: the step's time budget ran out")
            return
        try:
            count = not timed and row["setting"] not in flops
            out, sec, fl = one_run(case, model, row, steps, start, count)
        except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others
            errors[label] = f"{type(e).__name__}: {e}"[:500]
            log(f"  {label}: FAILED {errors[label]}\n{traceback.format_exc(limit=4)}")
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
            return
        if fl is not None:
            flops[row["setting"]] = fl
        if row["setting"] == "baseline" and not timed:
            base_run = sec
        if timed:
            times[label].append(sec)
            outs.setdefault(label, out)
            log(f"  {label:<52} {sec:8.3f}s")

    normal = [r for r in rows if not r.get("last")]
    last = [r for r in rows if r.get("last")]
    for group in (normal, last):
        for r in group:  # warm-up round (FLOPs counted)
            do(r, timed=False)
        for _ in range(rounds):
            for r in group:
                do(r, timed=True)
    base = statistics.median(times["baseline"]) if times["baseline"] else None
    for r in rows:
        label, ts = r["label"], times[r["label"]]
        sec = statistics.median(ts) if ts else None
        out = outs.get(label)
        row = dict(family=case.family, size=case.size, steps=steps, batch=case.batch, config=label,
                   setting=r["setting"], kernels=r["kernels"], spec=r.get("spec"), seconds=sec,
                   ms_per_call=sec / steps * 1e3 if sec else None, runs=len(ts), all_seconds=ts,
                   speedup=base / sec if base and sec else None, flops=flops.get(r["setting"]),
                   flop_speedup=(flops["baseline"] / flops[r["setting"]]
                                 if flops.get("baseline") and flops.get(r["setting"]) else None),
                   rel_error=(relative_error(out.float(), outs["baseline"].float())
                              if out is not None and "baseline" in outs else None),
                   finite=bool(torch.isfinite(out).all()) if out is not None else None, error=errors.get(label))
        emit(row)


def targets(rows: list[dict]) -> list[dict]:
    """ToMe's end-to-end speed-up at the largest U-Net size >= tomesd's x 1.15 (same ratio)."""
    out = []
    sizes = sorted({r["size"] for r in rows if r["family"] == "sd15"})
    if not sizes:
        return out
    size = sizes[-1]
    at = [r for r in rows if r["family"] == "sd15" and r["size"] == size]
    peer = next((r for r in at if r["setting"] == "tomesd"), None)
    for mode in ("default", "reference"):
        ours = next((r for r in at if r["setting"] == "tome" and r["kernels"] == mode), None)
        ok = None
        if ours and peer and ours["speedup"] and peer["speedup"]:
            ok = ours["speedup"] >= 1.15 * peer["speedup"]
        out.append(dict(target=f"ToMe [kernels={mode}] end-to-end speed-up at {size}^2 >= 1.15 x tomesd's (ratio 0.5)",
                        ours=ours and ours["speedup"], tomesd=peer and peer["speedup"],
                        ratio=(ours["speedup"] / peer["speedup"]) if ours and peer and ours["speedup"]
                        and peer["speedup"] else None, met=ok))
    return out


# -- FLOP matching (meta device) --------------------------------------------------------------------


def match_flops(family: str, steps: int, log: Callable[[str], None], flux_blocks=None,
                methods: tuple[str, ...] = ("toca", "duca"), grid: tuple[float, ...] = MATCH_GRID) -> dict:
    """FLOPs of `steps` calls at 1024^2 on the meta device: FORA interval 3 and ToCa/DuCa interval 3
    over MATCH_GRID fresh ratios; the ratio nearest FORA's FLOPs for each."""
    from torch.utils.flop_counter import FlopCounterMode

    case = Case(family, 1024, False, torch.device("meta"), torch.float16, flux_blocks)
    model = case.build()
    start = case.inputs()

    def count(spec):
        row = dict(kernels="reference", install=_ours(spec, case.cfg_pairs, steps) if spec else None)
        with installed(model, row), FlopCounterMode(display=False) as c:
            case.run(model, steps, start)
        return c.get_total_flops()

    base = count(None)
    fora = count({"method": "fora", "interval": INTERVAL})
    log(f"{family}: baseline {base / 1e12:.1f} TFLOP, FORA N={INTERVAL} {fora / base:.3f} of it")
    res = dict(family=family, steps=steps, blocks=flux_blocks, baseline=base, fora=fora, grid={}, chosen={})
    for method in methods:
        res["grid"][method] = {}
        for r in grid:
            f = count({"method": method, "interval": INTERVAL, "fresh_ratio": r})
            res["grid"][method][r] = f
            log(f"  {method} R={r}: {f / base:.3f} of baseline, {f / fora:.3f} of FORA")
        best = min(grid, key=lambda r: abs(res["grid"][method][r] / fora - 1))
        res["chosen"][method] = dict(fresh_ratio=best, flops_vs_fora=res["grid"][method][best] / fora)
    return res


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU in fp32: checks the logic in seconds")
    p.add_argument("--part", choices=("unet", "dit", "all"), default="all")
    p.add_argument("--out", default="end_to_end.json",
                   help="JSON report; an existing file keeps the other part's results (parts are merged)")
    p.add_argument("--budget", type=float, default=0, help="seconds this run may take (0: no limit); rows that "
                   "would not fit are skipped and say so")
    p.add_argument("--unet-sizes", type=int, nargs="+", default=None, help="default 1024 2048 (smoke: 64 128)")
    p.add_argument("--dit-size", type=int, default=None, help="default 1024 (smoke: 128)")
    p.add_argument("--unet-steps", type=int, default=None, help="calls per run on the U-Net (default 10, smoke 2)")
    p.add_argument("--dit-steps", type=int, default=None, help=f"Euler steps per run on the DiTs (default {MATCH_STEPS}, "
                                                                "smoke 6)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2, smoke 1; Flux: 1)")
    p.add_argument("--flux-blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                   help="Flux depth (default FLUX.1-dev's 19 38)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--match", action="store_true", help="count FLOPs on the meta device and print the fresh ratios "
                   "that match FORA's (for MATCHED); writes --out")
    p.add_argument("--match-families", nargs="+", choices=("pixart", "flux"), default=["pixart", "flux"])
    p.add_argument("--match-methods", nargs="+", choices=("toca", "duca"), default=["toca", "duca"])
    p.add_argument("--match-grid", type=float, nargs="+", default=list(MATCH_GRID))
    args = p.parse_args(argv)

    def log(s: str) -> None:
        print(s, flush=True)

    if args.match:
        blocks = args.flux_blocks
        res = dict(command=command_line(), rule=__doc__.split("Matching rule (caching): ")[1].split("\n\n")[0],
                   results=[match_flops(f, args.dit_steps or MATCH_STEPS, log, blocks if f == "flux" else None,
                                        tuple(args.match_methods), tuple(args.match_grid))
                            for f in args.match_families])
        write_json(args.out, res)
        return 0

    device, dtype = device_and_dtype(args.smoke, args.dtype)
    deadline = Deadline(args.budget)
    out_path = Path(args.out)
    report: dict[str, Any] = {}
    if out_path.exists():
        import json

        with contextlib.suppress(ValueError):
            report = json.loads(out_path.read_text())
    report.update(machine=machine(device), kernels=kernel_info(device), smoke=args.smoke,
                  dtype=str(dtype).removeprefix("torch."), attention="SDPA (diffusers' default processors)",
                  matching_rule=__doc__.split("Matching rule (caching): ")[1].split("\n\n")[0].replace("\n", " "),
                  matched=MATCHED, timing=__doc__.split("Timing: ")[1].split("\n\n")[0].replace("\n", " "))
    report.setdefault("commands", {})
    report.setdefault("parts", {})
    parts = ("unet", "dit") if args.part == "all" else (args.part,)
    for part in parts:
        report["commands"][part] = command_line()
        report["parts"][part] = dict(status="running", rows=[], cases=[], notes=[])
    write_json(out_path, report)

    def bench_part(part: str, cases: list[Case], steps: int, rounds: int | list[int]):
        entry = report["parts"][part]
        for i, case in enumerate(cases):
            entry["cases"].append(case.describe())

            def emit(row, entry=entry):
                entry["rows"].append(row)
                log(f"{row['family']} {row['size']} {row['config']:<56} "
                    + (f"{row['seconds']:.3f}s {row['speedup'] or float('nan'):.2f}x" if row["seconds"] else
                       f"-- {row['error']}"))
                write_json(out_path, report)

            try:
                bench_case(case, steps, rounds[i] if isinstance(rounds, list) else rounds, args.ratio, args.factor,
                           deadline, emit, log)
            except Exception as e:  # noqa: BLE001 - a case that cannot even be built is recorded
                entry["notes"].append(f"{case.family} {case.size}px failed: {type(e).__name__}: {e}"[:600])
                log(traceback.format_exc())
            if device.type == "cuda":  # the case's model is gone with bench_case's frame
                peak = torch.cuda.max_memory_allocated(device)
                entry["notes"].append(f"{case.family} {case.size}px: peak GPU memory {peak / 2**30:.1f} GiB")
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        entry["targets"] = targets(entry["rows"])
        entry["status"] = "done"
        write_json(out_path, report)

    smoke = args.smoke
    if "unet" in parts:
        sizes = args.unet_sizes or ([64, 128] if smoke else [1024, 2048])
        cases = [Case("sd15", s, smoke, device, dtype) for s in sizes]
        bench_part("unet", cases, args.unet_steps or (2 if smoke else 10), args.rounds or (1 if smoke else 2))
    if "dit" in parts:
        size = args.dit_size or (128 if smoke else 1024)
        blocks = tuple(args.flux_blocks) if args.flux_blocks else None
        cases = [Case("pixart", size, smoke, device, dtype), Case("flux", size, smoke, device, dtype, blocks)]
        if blocks and not smoke:
            report["parts"]["dit"]["notes"].append(f"Flux run with {blocks[0]} double + {blocks[1]} single blocks "
                                                   "(FLUX.1-dev has 19 + 38)")
        rounds = args.rounds or (1 if smoke else 2)
        bench_part("dit", cases, args.dit_steps or (6 if smoke else MATCH_STEPS), [rounds, args.rounds or 1])
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
