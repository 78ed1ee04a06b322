"""`diffaccel bench`: speed and fidelity of the methods side by side with the peers, in one run.

Per denoiser call on a full-size architecture with random weights: each configuration runs on the
same inputs; speed-up and relative error are against the unaccelerated baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

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
    from .tiny import sd1_unet

    torch.manual_seed(0)
    return sd1_unet().eval()  # "tiny-sd": the test-size U-Net, for smoke runs


def _peer_tomesd(model, ratio: float):
    import tomesd

    tomesd.apply_patch(model, ratio=ratio)
    return lambda: tomesd.remove_patch(model)


def _ours(model, spec, cfg: bool):
    from . import accelerate_pipeline, remove_acceleration

    accelerate_pipeline(model, spec, cfg_batched=cfg)
    return lambda: remove_acceleration(model)


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
    if args.threads:
        torch.set_num_threads(args.threads)
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
        configs = [(label, install) for label, install in configurations(args.ratio, args.factor, args.cfg)
                   if label == "baseline" or not args.only or any(o in label for o in args.only)]
        times: dict[str, list[float]] = {label: [] for label, _ in configs}
        outs: dict[str, list[torch.Tensor]] = {label: [] for label, _ in configs}
        # Rounds: every configuration runs once per round, on that round's input, so slow drifts of
        # the machine's speed hit all of them alike.
        for r in range(args.warmup + args.repeats):
            inp = inputs[max(0, r - args.warmup)]
            for label, install in configs:
                remove = install(model) if install else None
                try:
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        out = model(*inp).sample
                        elapsed = time.perf_counter() - t0
                finally:
                    if remove:
                        remove()
                if r >= args.warmup:
                    times[label].append(elapsed)
                    outs[label].append(out)
        base_time = statistics.median(times["baseline"])
        for label, _ in configs:
            t = statistics.median(times[label])
            err = statistics.mean(relative_error(o, b) for o, b in zip(outs[label], outs["baseline"]))
            row = dict(size=size, batch=args.batch, config=label, seconds=t, speedup=base_time / t, rel_error=err,
                       runs=len(times[label]))
            results.append(row)
            print(f"{size:>5} {label:<32} {t:8.2f}s {row['speedup']:6.2f}x  rel.err {err:.4f}", flush=True)
    return dict(
        command="diffaccel bench " + " ".join(shlex.quote(a) for a in args.argv),
        arch=args.arch, cfg_pairs=args.cfg, device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
        platform=platform.platform(), date=time.strftime("%Y-%m-%d"), results=results)


def cmd_bench(args: argparse.Namespace) -> int:
    report = run_bench(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed-up and error of the methods and peers on a full-size architecture")
    p.add_argument("--arch", choices=ARCHS, default="sd15")
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
    p.set_defaults(func=cmd_bench, argv=sys.argv[2:])
