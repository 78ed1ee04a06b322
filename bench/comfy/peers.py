"""diffaccel's nodes beside ComfyUI's own, inside a ComfyUI core, on one model and one seed:
our ToMe node and ComfyUI's TomePatchModel at the same ratio; our caching nodes and ComfyUI's EasyCache
at the same steps. For each: the median time of a KSampler run, the relative distance of its output
latent to the unpatched one, the FLOPs it ran (torch.utils.flop_counter) and the U-Net evaluations it
really computed. Writes JSON and a Markdown table.

    .venv-comfy/bin/python bench/comfy/peers.py --out bench/results/comfy

CPU times are noisy: read the ratios, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from diffaccel.comfy.testing import boot, conditioning, sd15_shaped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/comfy")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels", type=int, default=64, help="U-Net width (SD 1.5: 320)")
    ap.add_argument("--ratio", type=float, default=0.5, help="ToMe ratio, ours and ComfyUI's")
    args = ap.parse_args(argv)
    command = " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    boot()  # (ComfyUI's own argument parsing then sees no arguments)
    torch.set_num_threads(torch.get_num_threads())
    import comfy
    import nodes
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfy_extras.nodes_tomesd import TomePatchModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffaccel.comfy import NODE_CLASS_MAPPINGS
    from diffaccel.comfy.sampling import acceleration_of

    tiny = sd15_shaped(channels=args.channels)
    pos, neg = conditioning(tiny, 1, tokens=77), conditioning(tiny, 2, tokens=77)
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    unet = tiny.patcher.model.diffusion_model
    evaluations = [0]
    unet.input_blocks[0][0].register_forward_hook(lambda *a: evaluations.__setitem__(0, evaluations[0] + 1))

    def run(model):
        return nodes.KSampler().sample(model, 0, args.steps, args.cfg, "euler", "normal", pos, neg, latent)[0]["samples"]

    def ours(name, **values):
        node = NODE_CLASS_MAPPINGS["DiffAccel" + name]
        required = node.INPUT_TYPES()["required"]
        inputs = {k: spec[1]["default"] for k, spec in required.items() if k != "model"}
        inputs.update(values)
        return node().apply(tiny.patcher, **inputs)[0]

    settings = {
        "baseline": tiny.patcher,
        f"ComfyUI TomePatchModel ratio {args.ratio}": TomePatchModel.execute(tiny.patcher, args.ratio).result[0],
        f"diffaccel ToMe ratio {args.ratio}": ours("ToMe", ratio=args.ratio, cost_model="off"),
        "ComfyUI EasyCache (defaults: threshold 0.2, 15%-95%)": EasyCacheNode.execute(tiny.patcher, 0.2, 0.15, 0.95,
                                                                                      False).result[0],
        "ComfyUI EasyCache threshold 0.05": EasyCacheNode.execute(tiny.patcher, 0.05, 0.15, 0.95, False).result[0],
        "diffaccel FORA interval 2": ours("FORA", interval=2),
        "diffaccel FORA interval 3": ours("FORA", interval=3),
        "diffaccel ToCa (interval 3, fresh 0.3)": ours("ToCa"),
        "diffaccel DuCa (interval 3, fresh 0.75)": ours("DuCa"),
    }
    rows = []
    base_out = None
    for name, model in settings.items():  # one warm-up each, FLOPs and evaluations on that run
        evaluations[0] = 0
        with FlopCounterMode(display=False) as counter:
            out = run(model)
        flops, evals = counter.get_total_flops(), evaluations[0]
        if base_out is None:
            base_out = out
        held = acceleration_of(model)
        rows.append(dict(setting=name, flops=flops, unet_evaluations=evals,
                         rel_distance=float((out - base_out).norm() / base_out.norm()),
                         calls=held.report.splitlines()[0] if held is not None and held.report else None, times=[]))
    for _ in range(args.repeats):  # interleaved repeats
        for row, model in zip(rows, settings.values()):
            t0 = time.perf_counter()
            run(model)
            row["times"].append(time.perf_counter() - t0)
    base = rows[0]
    for row in rows:
        row["median_s"] = statistics.median(row["times"])
        row["speedup"] = statistics.median(base["times"]) / row["median_s"]
        row["flops_ratio"] = base["flops"] / row["flops"] if row["flops"] else None
    record = dict(command=command,
                  comfyui=getattr(comfy, "__version__", None) or _comfy_version(), torch=torch.__version__,
                  machine=platform.machine(), processor=platform.processor(), threads=torch.get_num_threads(),
                  model=f"SD 1.5 U-Net layout, width {args.channels} (SD 1.5: 320), random weights", size=args.size,
                  steps=args.steps, cfg=args.cfg, sampler="euler/normal", repeats=args.repeats, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# diffaccel nodes beside ComfyUI's, inside ComfyUI {record['comfyui']} (CPU, {record['threads']} threads)",
             "", f"`{record['command']}`", "", f"{record['model']}, {args.size}x{args.size}, {args.steps} steps, "
             f"cfg {args.cfg}, euler; median of {args.repeats} interleaved runs.", "",
             "| setting | speed-up | FLOPs ratio | U-Net evaluations | distance to baseline (relative L2 of the latent) "
             "| sub-layer calls (diffaccel's report) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['unet_evaluations']} | "
                     f"{r['rel_distance']:.4f} | {(r['calls'] or '-').split(': ', 1)[-1]} |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _comfy_version() -> str | None:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
