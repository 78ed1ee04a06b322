"""Token ops of diffaccel.kernels against their torch reference, per op, on the GPU.

For N tokens (a sqrt(N) x sqrt(N) grid) of width C on batch 2 (a CFG pair), fp16 and bf16:

  tome_merge          TokenReduction.reduce(x, "mean") of ToMe at ratio 0.5, 2 x 2 cells
  tome_unmerge        TokenReduction.restore(y)
  tome_merge_unmerge  both, one after the other (the target op)
  tome_match          bipartite_soft_matching_2d (normalise, gather, best_match, sort)
  best_match          the matching's core: each source's best destination (cosine, unit rows given)
  sito_select         similarity_pruning_2d (scores, per-cell bases, two matchings)
  sito_prune_restore  TokenReduction.reduce(x, "drop") + restore of SiTo at ratio 0.5
  toca_gather_scatter gather_tokens + scatter_tokens of a quarter of the tokens (ToCa's fresh tokens)

Each op runs twice: with DIFFACCEL_KERNELS=reference and diffaccel.kernels.use_backend("reference")
(the torch reference), and with the variable unset and use_backend("auto") (the default dispatch:
Triton on CUDA tensors); each row names the backend diffaccel.kernels.backend() reported. Time: median over samples after warm-up, CUDA events around a
loop of calls. Bytes: the minimum traffic of the op (every token element read or written once per
access the op makes, index tensors left out); achieved bandwidth = bytes / time, reported as a
fraction of the device's copy bandwidth, measured the same way (read + written bytes of a large
`torch.empty_like(x).copy_(x)`). Small cases fit in L2 (60 MB on an H200) and can beat the copy.

Target: tome_merge_unmerge at N = 16384 >= 2x faster than the reference and >= 70% of the copy
bandwidth, at every width and dtype.

--smoke: tiny sizes, CPU, fp32; both modes then run the torch reference (there is no Triton on CPU).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    MODES,
    Deadline,
    active_backend,
    command_line,
    device_and_dtype,
    kernel_info,
    kernel_mode,
    machine,
    median_time,
    sync,
    write_json,
)

TOKENS = (16384, 65536, 4096)  # the target size first: a run cut short keeps it
WIDTHS = (320, 1280, 3072)
SMOKE_TOKENS = (64, 256)
SMOKE_WIDTHS = (16, 32)
SMOKE_TIMING = dict(warmup=1, repeats=3, max_total=0.02)
BATCH = 2
TARGET_TOKENS, TARGET_SPEEDUP, TARGET_FRACTION = 16384, 2.0, 0.7
TARGET_OP = "tome_merge_unmerge"
FRESH = 0.25  # ToCa's fresh tokens for gather/scatter


def copy_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int) -> dict[str, float]:
    """Read + written bytes per second of torch.empty_like(x).copy_(x) on an `nbytes` tensor."""
    x = torch.ones(nbytes // torch.empty(0, dtype=dtype).element_size(), device=device, dtype=dtype)
    t = median_time(lambda: torch.empty_like(x).copy_(x), device, warmup=3, repeats=20, min_sample=5e-3)
    return dict(bytes=nbytes, seconds=t["seconds"], bytes_per_s=2 * nbytes / t["seconds"])


def _best_match_fn() -> tuple[Callable, str]:
    """diffaccel.kernels.best_match when the kernels offer it, else diffaccel.tokens.best_match."""
    k = importlib.import_module("diffaccel.kernels")
    if callable(getattr(k, "best_match", None)):
        return k.best_match, "diffaccel.kernels.best_match"
    from diffaccel.tokens import best_match

    return best_match, "diffaccel.tokens.best_match"


def cases(x: torch.Tensor, side: int) -> list[tuple[str, Callable[[], Any], int, int]]:
    """(op, fn, bytes moved, flops) for one input x (B, N, C) on a side x side grid."""
    from diffaccel.kernels import gather_tokens, scatter_tokens
    from diffaccel.tokens import bipartite_soft_matching_2d, random_destinations, similarity_pruning_2d

    b, n, c = x.shape
    s = x.element_size()
    r = n // 2
    gen = torch.Generator(device=x.device).manual_seed(0)
    choice = random_destinations(side, side, 2, 2, gen, x.device)
    with kernel_mode("reference"):  # the same indices for both modes
        tome = bipartite_soft_matching_2d(x, side, side, 2, 2, r, choice).expand(b)
        y = tome.reduce(x, "mean")
        sito = similarity_pruning_2d(x, side, side, 2, 2, r).expand(b)
        unit = F.normalize(x, dim=-1)
        a = unit.gather(1, tome.keep_idx[..., None].expand(-1, -1, c))  # about 3N/4 sources ...
        a = torch.cat([a, unit.gather(1, tome.fold_idx[..., None].expand(-1, -1, c))], dim=1)
        d = unit.gather(1, tome.dst_idx[..., None].expand(-1, -1, c))  # ... against N/4 destinations
    kept = n - r
    best_match, _ = _best_match_fn()
    k = max(1, int(n * FRESH))
    idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:k] for i in range(b)]).to(x.device)
    buf = torch.zeros_like(x)
    na, nd = a.shape[1], d.shape[1]
    return [
        ("tome_merge", lambda: tome.reduce(x, "mean"), (n + kept) * c * s * b, 0),
        ("tome_unmerge", lambda: tome.restore(y), (kept + r + n) * c * s * b, 0),
        (TARGET_OP, lambda: tome.restore(tome.reduce(x, "mean")), (n + kept + kept + r + n) * c * s * b, 0),
        ("tome_match", lambda: bipartite_soft_matching_2d(x, side, side, 2, 2, r, choice), n * c * s * b,
         2 * b * na * nd * c),
        ("best_match", lambda: best_match(a, d), (na + nd) * c * s * b, 2 * b * na * nd * c),
        ("sito_select", lambda: similarity_pruning_2d(x, side, side, 2, 2, r), n * c * s * b,
         2 * b * n * c + 2 * b * (n - nd) * nd * c + 2 * b * r * kept * c),
        ("sito_prune_restore", lambda: sito.restore(sito.reduce(x, "drop")), (2 * kept + kept + r + n) * c * s * b, 0),
        ("toca_gather_scatter", lambda: scatter_tokens(buf, idx, gather_tokens(x, idx)), 4 * k * c * s * b, 0),
    ]


def _result_tensor(out: Any) -> torch.Tensor | None:
    """A comparable tensor of an op's result (reductions: their folded-source indices, sorted)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "fold_idx"):
        return out.fold_idx.sort(dim=-1).values
    return None


def compare(ref: torch.Tensor | None, new: torch.Tensor | None) -> dict[str, float | None]:
    """Max abs difference of values (relative to the reference's max), or the share of equal indices."""
    a, b = ref, new
    if a is None or b is None or a.shape != b.shape:
        return dict(max_abs_diff=None, equal_fraction=None)
    if not a.is_floating_point():
        return dict(max_abs_diff=None, equal_fraction=float((a == b).float().mean()))
    diff = float((a.float() - b.float()).abs().max())
    return dict(max_abs_diff=diff, rel_max_diff=diff / max(float(a.float().abs().max()), 1e-30))


def run(args: argparse.Namespace) -> dict:
    device, _ = device_and_dtype(args.smoke)
    dtypes = [torch.float32] if args.smoke else [getattr(torch, d) for d in args.dtypes]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    widths = args.widths or (SMOKE_WIDTHS if args.smoke else WIDTHS)
    deadline = Deadline(args.budget)
    report: dict[str, Any] = dict(
        command=command_line(), machine=machine(device), kernels=kernel_info(device), smoke=args.smoke, batch=BATCH,
        tokens=list(tokens), widths=list(widths), dtypes=[str(d).removeprefix("torch.") for d in dtypes],
        method=__doc__.split("Each op runs twice: ")[1].split("\n\nTarget")[0].replace("\n", " "),
        best_match_op=_best_match_fn()[1], copy={}, rows=[], skipped=[], errors=[],
        note=("CPU smoke run: both modes run the torch reference (no Triton on CPU); the figures check the "
              "script, not the kernels") if device.type == "cpu" else None)
    timing = dict(warmup=args.warmup, repeats=args.repeats, max_total=args.max_total)
    if args.smoke:
        timing.update(SMOKE_TIMING)
    report["timing"] = timing
    say = print

    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        nbytes = (64 if args.smoke else args.copy_mib) * 2**20
        report["copy"][name] = copy_bandwidth(device, dtype, nbytes)
        say(f"copy {name}: {report['copy'][name]['bytes_per_s'] / 1e12:.3f} TB/s (read + written)")
    write_json(args.out, report)

    for n in tokens:
        side = math.isqrt(n)
        if side * side != n:
            raise SystemExit(f"--tokens must be squares, got {n}")
        for c in widths:
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                if not deadline.allows(5):
                    report["skipped"].append(dict(tokens=n, width=c, dtype=name, why="time budget"))
                    continue
                try:
                    x = torch.randn(BATCH, n, c, generator=torch.Generator().manual_seed(n + c)).to(device, dtype)
                    ops = cases(x, side)
                except Exception as e:  # noqa: BLE001
                    report["errors"].append(dict(tokens=n, width=c, dtype=name, op="setup", error=f"{type(e).__name__}: {e}"))
                    traceback.print_exc()
                    continue
                copy_bw = report["copy"][name]["bytes_per_s"]
                for op, fn, moved, flops in ops:
                    if args.ops and op not in args.ops:
                        continue
                    row: dict[str, Any] = dict(op=op, tokens=n, width=c, dtype=name, batch=BATCH, bytes=moved, flops=flops)
                    outs = {}
                    for mode in MODES:
                        if not deadline.allows(2):
                            row[f"{mode}_error"] = "skipped: time budget"
                            continue
                        try:
                            with kernel_mode(mode), torch.inference_mode():
                                row[f"{mode}_backend"] = active_backend(device)
                                first = _result_tensor(fn())
                                outs[mode] = first.clone() if first is not None else None
                                sync(device)
                                t = median_time(fn, device, **timing)
                        except Exception as e:  # noqa: BLE001 - recorded, the others go on
                            row[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:400]
                            traceback.print_exc()
                            continue
                        sec = t["seconds"]
                        row[f"{mode}_seconds"] = sec
                        row[f"{mode}_samples"] = t["samples"]
                        row[f"{mode}_bandwidth"] = moved / sec
                        row[f"{mode}_bw_fraction"] = moved / sec / copy_bw
                        if flops:
                            row[f"{mode}_flops_per_s"] = flops / sec
                    if "reference" in outs and "default" in outs:
                        row.update(compare(outs["reference"], outs["default"]))
                    if row.get("reference_seconds") and row.get("default_seconds"):
                        row["speedup"] = row["reference_seconds"] / row["default_seconds"]
                    if op == TARGET_OP and n == TARGET_TOKENS:
                        row["met"] = bool(row.get("speedup", 0) >= TARGET_SPEEDUP
                                          and row.get("default_bw_fraction", 0) >= TARGET_FRACTION)
                    report["rows"].append(row)
                    say(f"{op:<20} N={n:<6} C={c:<5} {name:<8} ref {row.get('reference_seconds', float('nan')) * 1e6:9.1f}us "
                        f"default {row.get('default_seconds', float('nan')) * 1e6:9.1f}us "
                        f"x{row.get('speedup', float('nan')):5.2f}  bw {row.get('default_bw_fraction', float('nan')):5.2f}"
                        + (f"  met={row['met']}" if "met" in row else ""))
                    write_json(args.out, report)
                del x, ops
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    target_rows = [r for r in report["rows"] if r["op"] == TARGET_OP and r["tokens"] == TARGET_TOKENS]
    report["targets"] = [dict(
        target=f"{TARGET_OP} at N={TARGET_TOKENS}: >= {TARGET_SPEEDUP}x faster than the reference and >= "
               f"{TARGET_FRACTION:.0%} of copy bandwidth (every width and dtype)",
        rows=[dict(width=r["width"], dtype=r["dtype"], speedup=r.get("speedup"),
                   bw_fraction=r.get("default_bw_fraction"), met=r.get("met")) for r in target_rows],
        met=bool(target_rows) and all(r.get("met") for r in target_rows)
        and len(target_rows) == len(widths) * len(dtypes))]
    report["seconds"] = time.perf_counter() - T0
    write_json(args.out, report)
    return report


T0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU, fp32 (both modes: the reference)")
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts, squares (default {TOKENS})")
    p.add_argument("--widths", type=int, nargs="+", help=f"widths (default {WIDTHS})")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--ops", nargs="+", help="only these ops")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-total", type=float, default=0.4, help="seconds of samples per measurement at most")
    p.add_argument("--copy-mib", type=int, default=2048, help="size of the copy measuring bandwidth")
    p.add_argument("--budget", type=float, default=0, help="seconds this run may take (0: no limit); cases that "
                   "would not fit are skipped and listed")
    args = p.parse_args(argv)
    run(args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
