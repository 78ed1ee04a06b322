"""`diffaccel bench fidelity`: every method and every peer at several strengths on one pipeline, in one
interleaved run: speed-up, FLOPs, peak memory and fidelity against the baseline of the same seeds.

The pipeline is a trained reference model (`--model dit` / `unet`, the default: they really denoise,
so an error means something, and they know their captions, so caption following is measured too), the
random-weight SD default (`random-sd`), or a saved pipeline folder / hub id (`from_pretrained`,
safetensors). Each setting (ours, a peer, or the baseline) generates the same prompts with the same
seeds; a baseline run every few settings brackets them, so each speed-up is against the mean of the
baseline runs just before and just after it and a slow drift of the machine cancels out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import metrics
from ..loading import DTYPES, load_pipeline
from .common import command_line, machine, versions

NAME = "fidelity"
MODELS = ("dit", "unet", "random-sd")

# Our methods at three strengths each (mild, medium, strong), then compositions of a token method
# with a caching method. An explicit strength acts wherever the policy selects (no cost-model veto).
STRENGTHS: dict[str, list[tuple[str, dict]]] = {
    "tome": [(f"ratio={r}", {"ratio": r}) for r in (0.3, 0.5, 0.7)],
    "todo": [(f"factor={f}", {"factor": float(f)}) for f in (2, 3, 4)],
    "sito": [(f"ratio={r}", {"ratio": r}) for r in (0.3, 0.5, 0.7)],
    "fora": [(f"N={n}", {"interval": n}) for n in (2, 3, 4)],
    "toca": [(f"N={n} R={r}", {"interval": n, "fresh_ratio": r}) for n, r in ((2, 0.5), (3, 0.3), (4, 0.1))],
    "duca": [(f"N={n} R={r}", {"interval": n, "fresh_ratio": r}) for n, r in ((2, 0.75), (3, 0.5), (4, 0.25))],
    # the paper's FLUX.1-dev setting (N=6, order 2, 3 full steps first), then order 1 at shorter intervals
    "taylorseer": [("paper N=6 O=2", {}), *((f"N={n} O=1", {"interval": n, "order": 1}) for n in (3, 4))],
}
# Forecast against reuse at the same schedules (FORA's and ToCa's), and adaptive steps (a cap of 3 cached
# steps in a row, HiCache's forecast) at thresholds from mild to strong against static schedules at
# equal compute: named groups `--methods` takes beside the method names.
_HERMITE = {"forecast": "hermite", "order": 1}
_LATE = {"forecast": "taylor", "order": 1, "forecast_from": 0.5}
GROUPS: dict[str, list[tuple[str, dict]]] = {
    "forecast": [*((f"fora N={n} {f} O=1", {"method": "fora", "interval": n, "forecast": f, "order": 1})
                   for n, f in ((2, "hermite"), (3, "taylor"), (3, "hermite"), (4, "taylor"), (4, "hermite"))),
                 *((f"toca N=3 R=0.3 {f} O=1", {"method": "toca", "interval": 3, "fresh_ratio": 0.3, "forecast": f,
                                                "order": 1}) for f in ("taylor", "hermite")),
                 # forecasting in the run's second half only (before it cached steps reuse)
                 *((f"fora N={n} taylor O=1 from=0.5", {"method": "fora", "interval": n, **_LATE}) for n in (2, 3, 4)),
                 ("toca N=3 R=0.3 taylor O=1 from=0.5", {"method": "toca", "interval": 3, "fresh_ratio": 0.3, **_LATE})],
    "adaptive": [*((f"fora adaptive t={t} cap=3 hermite O=1", {"method": "fora", "interval": 4, "threshold": t,
                                                                **_HERMITE}) for t in (0.07, 0.1, 0.15, 0.2, 0.3)),
                 *((f"fora adaptive t={t} cap=3", {"method": "fora", "interval": 4, "threshold": t})
                   for t in (0.15, 0.2)),
                 *((f"fora adaptive t={t} cap=3 taylor O=1 from=0.5", {"method": "fora", "interval": 4, "threshold": t,
                                                                       **_LATE}) for t in (0.15, 0.2))],
}
COMPOSED: list[tuple[str, list[dict]]] = [
    ("tome ratio=0.5 + fora N=3", [{"method": "tome", "ratio": 0.5}, {"method": "fora", "interval": 3}]),
    ("todo factor=2 + toca N=3 R=0.3", [{"method": "todo", "factor": 2.0},
                                        {"method": "toca", "interval": 3, "fresh_ratio": 0.3}]),
    ("sito ratio=0.5 + fora N=3", [{"method": "sito", "ratio": 0.5}, {"method": "fora", "interval": 3}]),
    ("todo factor=2 + duca N=3 R=0.5", [{"method": "todo", "factor": 2.0},
                                        {"method": "duca", "interval": 3, "fresh_ratio": 0.5}]),
]


@dataclass
class Setting:
    """One row of the benchmark: ours (`spec`), a peer (`peer`), or the baseline (neither)."""

    label: str
    family: str  # "baseline", "diffaccel" or the peer's project name
    method: str
    strength: dict = field(default_factory=dict)
    spec: object = None
    peer: object = None
    unavailable: str | None = None


def our_settings(names: list[str] | None = None, composed: bool = True) -> list[Setting]:
    """Every method of the registry at its three strengths (the methods named, when given), then the
    compositions."""
    from ..methods import available_methods

    methods = names or [*(m for m in STRENGTHS if m in available_methods()), *GROUPS]
    rows = []
    for m in methods:
        if m in GROUPS:
            rows += [Setting(label, "diffaccel", spec["method"], {k: v for k, v in spec.items() if k != "method"},
                             dict(spec)) for label, spec in GROUPS[m]]
            continue
        if m not in STRENGTHS:
            raise SystemExit(f"diffaccel bench fidelity: no strengths listed for method {m!r}; "
                             f"available: {sorted(STRENGTHS)} or the groups {sorted(GROUPS)} (or give --specs)")
        rows += [Setting(f"{m} {tag}", "diffaccel", m, dict(opts), {"method": m, **opts}) for tag, opts in STRENGTHS[m]]
    if composed and not names:
        rows += [Setting(label, "diffaccel", "+".join(s["method"] for s in specs), {"methods": specs}, specs)
                 for label, specs in COMPOSED]
    return rows


def spec_settings(texts: list[str], configs: list[str]) -> list[Setting]:
    """Rows for --specs ('tome:ratio=0.6') and --config files (saved accelerations)."""
    from .. import load_config
    from ..cli import _method_arg

    rows = []
    for text in texts:
        spec = _method_arg(text)
        name = spec if isinstance(spec, str) else spec["method"]
        rows.append(Setting(text, "diffaccel", name, {} if isinstance(spec, str) else
                            {k: v for k, v in spec.items() if k != "method"}, spec))
    for path in configs:
        try:
            spec = load_config(path)
        except (OSError, TypeError, ValueError) as e:
            raise SystemExit(f"--config {path}: {e}") from None
        rows.append(Setting(Path(path).name, "diffaccel", "config", {"file": str(path)}, spec))
    return rows


def peer_settings(kind: str, steps: int, names: list[str] | None) -> list[Setting]:
    from . import peers as peer_rows

    rows = []
    for p in peer_rows.peer_settings(kind, steps):
        if names is not None and not any(n.lower() in (p.peer + " " + p.method).lower() for n in names):
            continue
        rows.append(Setting(p.label, p.peer, p.method, dict(p.strength), peer=p, unavailable=p.unavailable))
    return rows


# -- the pipeline and its prompts ------------------------------------------------------------------


def prompts_and_scenes(args: argparse.Namespace, reference: bool) -> tuple[list[str], list | None]:
    if args.prompts:
        lines = [s.strip() for s in Path(args.prompts).read_text().splitlines() if s.strip()]
        if not lines:
            raise SystemExit(f"--prompts {args.prompts}: no prompts in the file (one per line)")
        return lines, None
    if reference:
        from ..reference import data

        scenes = data.evaluation_scenes(args.captions, seed=1)  # held out of training
        return [s.caption for s in scenes], scenes
    return [args.prompt] * args.captions, None


def generate(call, pipe, prompts: list[str], args: argparse.Namespace) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, float32; prompt i gets the noise of seed `args.seed + i`."""
    from ..reference.evaluate import call_kwargs

    out = []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start:start + args.batch]
        gens = [torch.Generator(args.device).manual_seed(args.seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images = call(prompt=chunk, num_inference_steps=args.steps, height=args.size, width=args.size,
                          guidance_scale=args.guidance, generator=gens, output_type="pt", **call_kwargs(pipe)).images
        out.append(images.float().cpu())
    return torch.cat(out)


# -- measuring -------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block above its start: CUDA's allocator statistics on a GPU; on the CPU the
    process's resident set, sampled every 20 ms in a thread (None without psutil)."""

    def __init__(self, device: str):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        try:
            import psutil
        except ImportError:
            self._thread = None
            return self
        proc = psutil.Process()
        self._start = self._max = proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self._max = max(self._max, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self._start
        return False


def timed(fn, device: str) -> tuple[object, float]:
    """(fn(), seconds): CUDA events on a GPU, the wall clock on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def count_flops(fn, denoiser: str) -> tuple[int, int]:
    """FLOPs of fn() (matrix products and convolutions, torch.utils.flop_counter): in all, and in the
    module named `denoiser` (its class name: the counter's top-level module names)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), sum(counter.get_flop_counts().get(denoiser, {}).values())


@contextlib.contextmanager
def applied(setting: Setting, pipe, steps: int):
    """The setting installed on the pipeline for the block, removed after (also on error); yields the
    callable that generates (the pipeline, or the peer's own entry point) and the warnings it gave."""
    from .. import accelerate_pipeline, remove_acceleration

    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if setting.spec is not None:
            accelerate_pipeline(pipe, setting.spec)
            remove, call = (lambda: remove_acceleration(pipe)), None
        elif setting.peer is not None:
            from . import peers as peer_rows

            remove, call = peer_rows.install(setting.peer, pipe, steps)
        else:
            remove, call = None, None
        try:
            yield (call or pipe), said
        finally:
            said += list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
            if remove is not None:
                remove()


def measure(setting: Setting, pipe, prompts: list[str], args: argparse.Namespace, flops: bool = True) -> dict:
    """One setting's run: timed (repeats), FLOPs on the first --flop-captions prompts, peak memory."""
    row = {"label": setting.label, "family": setting.family, "method": setting.method,
           "strength": setting.strength, "status": "ok", "reason": None}
    if setting.unavailable:
        return {**row, "status": "unavailable", "reason": setting.unavailable}
    try:
        with applied(setting, pipe, args.steps) as (call, said):
            times, images = [], None
            for _ in range(args.repeats):
                with PeakMemory(args.device) as mem:
                    images, seconds = timed(lambda: generate(call, pipe, prompts, args), args.device)
                times.append(seconds)
            cache = _cache_use(pipe) if setting.spec is not None else {}
            flop_prompts = prompts[:args.flop_captions] if args.flop_captions else []
            counted = count_flops(lambda: generate(call, pipe, flop_prompts, args), args.denoiser) if (
                flop_prompts and flops) else None
    except Exception as e:  # a setting that cannot run on this model is a row saying why; the run goes on
        print(f"{setting.label}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    row.update(seconds=statistics.median(times), seconds_all=times, peak_memory_bytes=mem.peak,
               flops_per_image=counted and counted[0] / len(flop_prompts),
               denoiser_flops_per_image=counted and counted[1] / len(flop_prompts), notes=said, **cache)
    row["_images"] = images
    return row


def _cache_use(pipe) -> dict:
    """What describe() says of our caches after the timed run: the peak bytes held (the last call's
    batch), and with adaptive steps the steps computed and cached."""
    from .. import describe

    dens = describe(pipe)["denoisers"]
    out = {}
    if any(d["cache"] is not None for d in dens):
        out["cache_peak_bytes"] = max(d["cache"]["peak_bytes"] for d in dens if d["cache"] is not None)
    decided = [v["decision"] for d in dens for v in d.get("steps", {}).values()]
    if decided:
        out["adaptive_steps"] = {"computed": decided.count("compute"), "cached": decided.count("cached")}
    return out


def fidelity_of(row: dict, base: torch.Tensor, scenes) -> None:
    images = row.pop("_images")
    row.update(metrics.fidelity(images, base))
    row["identical"] = bool(torch.equal(images, base))
    if scenes is not None:
        from ..reference import data

        row["caption_following"] = float(data.follows_caption(images * 2 - 1, scenes).float().mean())


def run(args: argparse.Namespace) -> dict:
    from ..cli import quiet_libraries

    with quiet_libraries():  # no notices per call from diffusers / transformers
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("diffaccel bench fidelity: --device cuda, but torch sees no CUDA device")
    ours = spec_settings(args.specs, args.config) if (args.specs or args.config) else our_settings(
        args.methods, composed=not args.no_composed)
    pipe, kind, reference = load_pipeline(args.model, args.weights, args.device, DTYPES[args.dtype])
    if args.size is None:
        args.size = 256 if reference else 512
    if args.guidance is None:
        from ..reference.evaluate import GUIDANCE

        args.guidance = GUIDANCE if reference else 7.5
    prompts, scenes = prompts_and_scenes(args, reference)
    args.denoiser = type(pipe.unet if kind == "unet" else pipe.transformer).__name__
    peers = [] if args.no_peers else peer_settings(kind, args.steps, args.peers)
    settings = [s for s in ours + peers if not args.only or any(o in s.label for o in args.only)]
    base_setting = Setting("baseline", "baseline", "baseline")
    record = {"suite": NAME, "command": command_line(args), "model": args.model, "kind": kind,
              "reference": reference, "prompts": len(prompts), "steps": args.steps, "size": args.size,
              "guidance": args.guidance, "dtype": args.dtype, "seed": args.seed, "repeats": args.repeats,
              "flop_captions": args.flop_captions, "machine": machine(args.device), "versions": versions(),
              "date": time.strftime("%Y-%m-%d"), "rows": []}
    print(f"{args.model} ({kind}), {len(prompts)} prompts, {args.steps} steps, {args.size}px, {args.dtype} on "
          f"{args.device}: baseline + {len(settings)} settings", flush=True)
    for _ in range(args.warmup):  # untimed: first-call costs (allocations, lazy imports) land here
        generate(pipe, pipe, prompts[:2], args)
    # the run order: a baseline, then every --baseline-every settings another one
    order: list[Setting] = [base_setting]
    for i, s in enumerate(settings):
        order.append(s)
        if (i + 1) % args.baseline_every == 0 or i == len(settings) - 1:
            order.append(base_setting)
    rows, base_rows, first_base = [], [], None
    partial = Path(args.out).with_suffix(".partial.json") if getattr(args, "out", None) else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    for setting in tqdm(order, desc="bench", unit="setting", disable=args.quiet):
        row = measure(setting, pipe, prompts, args, flops=setting is not base_setting or first_base is None)
        if setting is base_setting:
            images = row.pop("_images")
            if first_base is None:
                first_base = images
            # the pipeline must be exactly as it was after every setting was removed
            row["reproduced"] = bool(torch.equal(images, first_base))
            base_rows.append((len(rows), row))
        else:
            fidelity_of(row, first_base, scenes) if row["status"] == "ok" else None
            rows.append(row)
        if partial is not None:  # what a crash or an interrupt would otherwise lose
            from .report import dumps

            partial.write_text(dumps({**record, "partial": True, "rows": [b for _, b in base_rows] + rows}))
    base_flops = base_rows[0][1]["flops_per_image"]
    base_denoiser_flops = base_rows[0][1]["denoiser_flops_per_image"]
    # what is not the denoiser (text encoder, VAE) no setting changes; counting it as the baseline's
    # attributes the rest to the denoiser even where a peer wraps it in modules of its own
    rest = base_flops - base_denoiser_flops if base_flops and base_denoiser_flops else None
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            continue
        before = [b["seconds"] for k, b in base_rows if k <= i][-1]
        after = next(b["seconds"] for k, b in base_rows if k > i)
        row["baseline_seconds"] = (before + after) / 2
        row["speedup"] = row["baseline_seconds"] / row["seconds"]
        row["flop_speedup"] = (base_flops / row["flops_per_image"]) if base_flops and row["flops_per_image"] else None
        if rest is not None and row["flops_per_image"]:
            row["denoiser_flops_per_image"] = row["flops_per_image"] - rest
            row["denoiser_flop_speedup"] = base_denoiser_flops / max(row["denoiser_flops_per_image"], 1)
        else:
            row["denoiser_flop_speedup"] = None
    baseline = {**base_rows[0][1], "seconds_all": [b["seconds"] for _, b in base_rows],
                "reproduced": all(b["reproduced"] for _, b in base_rows)}
    baseline["seconds"] = baseline["baseline_seconds"] = statistics.median(baseline["seconds_all"])
    baseline.update(speedup=1.0, flop_speedup=1.0, denoiser_flop_speedup=1.0, psnr=math.inf, ssim=1.0, ms_ssim=1.0, rel_error=0.0,
                    identical=True)
    if scenes is not None:
        from ..reference import data

        baseline["caption_following"] = float(data.follows_caption(first_base * 2 - 1, scenes).float().mean())
    record["rows"] = [baseline] + rows
    from .report import goal, markdown

    record["goal"] = goal(record)
    print(markdown(record), flush=True)
    if not baseline["reproduced"]:
        record["error"] = ("the baseline changed during the run: a setting was not removed cleanly (the baseline "
                           "runs' 'reproduced')")
        print(f"diffaccel bench fidelity: {record['error']}", file=sys.stderr)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return record


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="every method and peer at three strengths on one pipeline: speed-up, FLOPs, peak "
                                  "memory, PSNR/SSIM/MS-SSIM and caption following against the baseline; Pareto plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit", help="dit or unet (the trained reference models), random-sd, or a "
                                                  "pipeline folder / hub id (default: dit)")
    p.add_argument("--weights", default=None, help="dit/unet: a folder written by the training script")
    p.add_argument("--methods", nargs="*", default=None, help="our methods to run at their three strengths "
                                                              f"(default: all of {sorted(STRENGTHS)}, the groups {sorted(GROUPS)} and compositions)")
    p.add_argument("--specs", nargs="*", default=[], help="instead: our settings as `diffaccel run` takes them, e.g. "
                                                          "tome:ratio=0.6 fora:interval=4")
    p.add_argument("--config", nargs="*", default=[], metavar="FILE", help="instead: saved accelerations, one row each")
    p.add_argument("--no-composed", action="store_true", help="leave out the compositions of two methods")
    p.add_argument("--peers", nargs="*", default=None, help="peers to include by name (default: all for the model's "
                                                            "kind; tomesd, DeepCache, T-GATE / cache-dit, diffusers)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--only", nargs="*", help="keep only settings whose label contains one of these")
    p.add_argument("--captions", type=int, default=32, help="held-out captions (reference models) or copies of "
                                                            "--prompt (default 32)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (instead of the captions)")
    p.add_argument("--seed", type=int, default=0, help="prompt i gets seed + i")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="pixels (default: 256 for the reference models, else 512)")
    p.add_argument("--guidance", type=float, default=None, help="default: 5 for the reference models, else 7.5")
    p.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median and spread)")
    p.add_argument("--warmup", type=int, default=1, help="untimed baseline calls of two prompts first")
    p.add_argument("--baseline-every", type=int, default=4, help="a baseline run after every N settings")
    p.add_argument("--flop-captions", type=int, default=1, help="FLOPs are counted on a run over the first N prompts "
                                                                "(0: not counted)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p
