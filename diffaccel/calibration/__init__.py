"""`diffaccel calibrate`: measure the cost model's constants (diffaccel.cost) on this device.

What is measured (docs/calibration.md):

- flops: matmul throughput, (2 N, C) @ (C, C) for N tokens (a CFG pair of rows) in 256..4096 and
  widths C in 320..1280 (fp32 on CPU, fp16 on CUDA); the constant is the median over the shapes.
  Recorded beside it, not used: the effective throughput of a real diffusers self-attention layer
  (heads of 64, the default processor) at SD-style shapes, the flops the cost model counts for it
  over its time (about 0.85x of the matmul rate on the project's CPU).
- bandwidth: a large copy (256 MiB on CPU, 1 GiB on CUDA; 64 MiB in a quick run), bytes of the
  tensor per second.
- op: one tiny op (an in-place add on 1 element), the floor of the per-op constant.
- token ops: the real work of one call of each token method on batch 2 at a few grid sizes and
  widths: ToMe's matching + `TokenReduction.reduce` + `.restore` (bipartite_soft_matching_2d, 2 x 2
  cells, half the tokens merged), SiTo's (similarity_pruning_2d, mode "drop") and ToDo's pooling
  (pool_tokens by 2 per side, nearest-exact). The cost model's count of each (reduction_overhead,
  pooling_overhead) gives its flops, bytes moved and extra ops; `launch` (fitted on the ToMe and SiTo
  rows) and `pool_launch` (on the ToDo rows), the effective cost of one extra op, make the model's
  `costs` side predict these times:
      residual_i = t_i - flops_i / FLOPS - bytes_i / BANDWIDTH
      L          = argmin_L sum_i ((residual_i - L * ops_i) / t_i)^2
                 = sum_i residual_i ops_i / t_i^2 / sum_i (ops_i / t_i)^2
  a least-squares fit in relative error (every size counts alike), floored at the tiny op's time.
  Two constants, because the extra ops differ: a reduction's are sorts, index gathers and scatters
  (tens of us each on a CPU), a pooling's a reshape and one interpolation (a few us).

Timings are medians: torch.utils.benchmark.Timer.blocked_autorange on CPU (at the current torch
thread count), CUDA events around a loop on CUDA.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import cost
from ..cost import Calibration, device_name, pooling_overhead, reduction_overhead, user_calibration_path

FULL = dict(tokens=(256, 1024, 4096), widths=(320, 640, 1280), copy_mib=256, min_time=0.25, scores=(1024, 2048),
            attention=((256, 640), (256, 1280), (1024, 320), (1024, 640), (4096, 320)),
            token_ops=((16, 16, 128), (32, 32, 320), (64, 64, 320), (32, 32, 1280), (64, 64, 640)))
QUICK = dict(tokens=(256, 1024), widths=(320, 640), copy_mib=64, min_time=0.04, scores=(512,),
             attention=((256, 320), (1024, 320)), token_ops=((16, 16, 128), (32, 32, 320)))
GPU_COPY_MIB = 1024


def _timer(device: torch.device, min_time: float) -> Callable[[Callable[[], Any]], float]:
    """A function that times fn() and returns the median seconds of one call."""
    if device.type == "cuda":
        def time_cuda(fn: Callable[[], Any]) -> float:
            fn()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            once = max(start.elapsed_time(end) / 1e3, 1e-7)
            number = max(1, min(10000, int(min_time / 5 / once)))
            times = []
            for _ in range(5):
                start.record()
                for _ in range(number):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / number)
            return statistics.median(times)

        return time_cuda

    from torch.utils.benchmark import Timer

    def time_cpu(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_time).median

    return time_cpu


def _token_case(device: torch.device, dtype: torch.dtype, h: int, w: int, c: int, method: str):
    """One call's own work of a token method on batch 2 of an h x w grid of width c, with the cost
    model's count of it: (fn, flops, bytes moved, extra ops). tome: matching, reduce and restore of
    half the tokens (2 x 2 cells); sito: the same with SiTo's pruning; todo: pooling by 2 per side
    (the default factor and mode, before the key/value projections)."""
    from ..tokens import bipartite_soft_matching_2d, pool_tokens, random_destinations, similarity_pruning_2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, h * w, c, generator=gen).to(device, dtype)
    n, size = h * w, x.element_size()
    if method == "todo":
        pooled = math.ceil(h / 2) * math.ceil(w / 2)
        return (lambda: pool_tokens(x, 1, h, w, 2.0, "nearest-exact"), 0, *pooling_overhead(2, n, pooled, c, size))
    r = n // 2
    choice = random_destinations(h, w, 2, 2, gen, device)

    def fn():
        if method == "sito":
            red = similarity_pruning_2d(x, h, w, 2, 2, r)
            y = red.reduce(x, "drop")
        else:
            red = bipartite_soft_matching_2d(x, h, w, 2, 2, r, choice)
            y = red.reduce(x, "mean")
        return red.restore(y)

    cells = (h // 2) * (w // 2)
    kept = n - min(r, n - cells)
    return (fn, *reduction_overhead(2, n, kept, cells, c, size, prune=method == "sito"))


def _attention_case(device: torch.device, dtype: torch.dtype, n: int, c: int):
    """A diffusers self-attention (heads of 64 channels, the default processor) on batch 2 of n
    tokens of width c: (fn, the flops the cost model counts for it)."""
    from diffusers.models.attention_processor import Attention

    from ..cost import attention_width, linear_macs

    torch.manual_seed(0)
    attn = Attention(c, heads=max(1, c // 64), dim_head=64 if c >= 64 else c).to(device, dtype).eval()
    x = torch.randn(2, n, c, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return (lambda: attn(x)), 2 * 2 * n * linear_macs(attn) + 4 * 2 * attention_width(attn) * n * n


def _score_case(device: torch.device, dtype: torch.dtype, n: int, heads: int = 8, dim: int = 4):
    """scaled_dot_product_attention over heads of `dim` channels on batch 2 of n tokens, where the
    per-score work (max, exp, sum, normalise) outweighs the matmuls: (fn, scores, matmul flops)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, dim, generator=gen).to(device, dtype) for _ in range(3))
    scores = 2 * heads * n * n
    return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), scores, 4 * scores * dim


def _copy(device: torch.device, nbytes: int) -> Callable[[], Any]:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure(device: torch.device, quick: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The raw measurements and the fitted constants: {"constants": {...}, "measurements": {...}}."""
    say = log or (lambda _: None)
    plan = QUICK if quick else FULL
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    timed = _timer(device, plan["min_time"])
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        matmuls = []
        for n in plan["tokens"]:
            for c in plan["widths"]:
                a = torch.randn(2 * n, c, generator=gen).to(device, dtype)
                b = torch.randn(c, c, generator=gen).to(device, dtype)
                out = torch.empty(2 * n, c, device=device, dtype=dtype)
                t = timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out))
                matmuls.append(dict(rows=2 * n, width=c, seconds=t, flops_per_s=2 * 2 * n * c * c / t))
                say(f"matmul ({2 * n} x {c}) @ ({c} x {c}): {matmuls[-1]['flops_per_s']:.3g} flop/s")
        layers = []
        for n, c in plan["attention"]:
            fn, count = _attention_case(device, dtype, n, c)
            t = timed(fn)
            layers.append(dict(batch=2, tokens=n, width=c, heads=c // 64, seconds=t, flops=count,
                               flops_per_s=count / t))
            say(f"self-attention, 2 x {n} tokens of width {c}: {layers[-1]['flops_per_s']:.3g} flop/s")
        flops = statistics.median(m["flops_per_s"] for m in matmuls)

        score_rows = []
        for n in plan["scores"]:
            fn, scores, mm = _score_case(device, dtype, n)
            t = timed(fn)
            score_rows.append(dict(batch=2, heads=8, head_dim=4, tokens=n, seconds=t, scores=scores, matmul_flops=mm,
                                   seconds_per_score=max(0.0, t - mm / flops) / scores))
            say(f"attention scores, 2 x 8 heads x {n}^2 (4 channels): "
                f"{score_rows[-1]['seconds_per_score'] * 1e9:.3f} ns a score")
        score = statistics.median(r["seconds_per_score"] for r in score_rows)

        mib = GPU_COPY_MIB if device.type == "cuda" and not quick else plan["copy_mib"]
        t_copy = timed(_copy(device, mib * 2**20))
        bandwidth = mib * 2**20 / t_copy
        say(f"copy of {mib} MiB: {bandwidth:.3g} B/s")

        tiny = torch.zeros(1, device=device, dtype=dtype)
        number = 100
        t_op = timed(lambda: [tiny.add_(1) for _ in range(number)]) / number
        say(f"one tiny op: {t_op * 1e6:.2f} us")

        token_ops = []
        for method in ("tome", "sito", "todo"):
            for h, w, c in plan["token_ops"]:
                fn, match, moved, ops = _token_case(device, dtype, h, w, c, method)
                t = timed(fn)
                token_ops.append(dict(method=method, batch=2, tokens=h * w, width=c, seconds=t, match_flops=match,
                                      moved_bytes=moved, ops=ops))
                say(f"{method} ops, 2 x {h * w} tokens of width {c}: {t * 1e6:.0f} us")
    launch = _fit([r for r in token_ops if r["method"] != "todo"], flops, bandwidth, t_op)
    pool_launch = _fit([r for r in token_ops if r["method"] == "todo"], flops, bandwidth, t_op)
    say(f"fitted cost of one extra op: {launch * 1e6:.1f} us in a reduced call (ToMe, SiTo), "
        f"{pool_launch * 1e6:.1f} us in a pooled one (ToDo)")
    return dict(constants=dict(flops=flops, bandwidth=bandwidth, launch=launch, pool_launch=pool_launch, score=score),
                measurements=dict(dtype=str(dtype).removeprefix("torch."), matmul=matmuls, attention=layers,
                                  scores=score_rows, copy=dict(
                    bytes=mib * 2**20, seconds=t_copy), tiny_op_seconds=t_op, token_ops=token_ops, fit=FIT))


FIT = ("launch (over the tome and sito rows) and pool_launch (over the todo rows) = L minimizing "
       "sum(((residual - L*ops)/seconds)^2) = sum(residual*ops/seconds^2) / sum((ops/seconds)^2), floored at "
       "tiny_op_seconds; residual = seconds - match_flops/flops - moved_bytes/bandwidth")


def _fit(rows: list[dict], flops: float, bandwidth: float, floor: float) -> float:
    """The per-op constant L that makes flops/FLOPS + bytes/BANDWIDTH + ops * L predict the rows' times
    (least squares in relative error), at least `floor`; adds each row's prediction and error."""
    for row in rows:
        row["residual_seconds"] = row["seconds"] - row["match_flops"] / flops - row["moved_bytes"] / bandwidth
    num = sum(row["residual_seconds"] * row["ops"] / row["seconds"] ** 2 for row in rows)
    den = sum((row["ops"] / row["seconds"]) ** 2 for row in rows)
    per_op = max(num / den, floor)
    for row in rows:
        predicted = row["match_flops"] / flops + row["moved_bytes"] / bandwidth + row["ops"] * per_op
        row["predicted_seconds"], row["relative_error"] = predicted, predicted / row["seconds"] - 1
    return per_op


def _idle_fraction(seconds: float = 0.5) -> float | None:
    """The share of CPU time the whole machine left idle over `seconds` (Linux), else None."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)

    try:
        total, idle = sample()
        time.sleep(seconds)
        total2, idle2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((idle2 - idle) / max(1, total2 - total), 3)


def _describe_device(device: torch.device, idle: float | None) -> dict[str, Any]:
    info: dict[str, Any] = dict(type=device.type, threads=torch.get_num_threads())
    if idle is not None:  # other work on the machine slows the figures down
        info["cpu_idle_before"] = idle
    if device.type == "cpu":
        info["model"] = cost.cpu_model()
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(model=props.name, index=index, memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def calibrate(device: torch.device | str | None = None, *, save: bool = True, quick: bool = False,
              command: str | None = None, log: Callable[[str], None] | None = None) -> Calibration:
    """Measure the cost model's constants on `device` (default: CUDA when available, else CPU), save
    them as the user's calibration of this device (unless save=False) and make the cost model use them.

    quick: fewer, smaller shapes and shorter timings (a few seconds; for tests and a first look).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"diffaccel calibrate measures cpu or cuda devices, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("diffaccel calibrate --device cuda: torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    idle = _idle_fraction()
    if device.type == "cuda":  # events and streams of that device
        with torch.cuda.device(device):
            result = measure(device, quick=quick, log=log)
    else:
        result = measure(device, quick=quick, log=log)
    result["measurements"]["device"] = _describe_device(device, idle)
    name = device_name(device)
    if command is None:
        args = [f"device={str(device)!r}"] + (["quick=True"] if quick else []) + ([] if save else ["save=False"])
        command = f"diffaccel.calibrate({', '.join(args)})"
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    cal = Calibration(device=name, device_type=device.type, **result["constants"], measured=True, source="measured",
                      date=now.isoformat(), command=command, torch=torch.__version__, quick=quick,
                      measurements=result["measurements"], origin="measured")
    if save:
        path = user_calibration_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cal.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        cal = Calibration.from_dict(cal.to_dict(), "user cache", str(path))
        cost.reset_calibrations()  # the cost model reads the new file on its next call
    return cal


def _finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


def cmd_calibrate(args) -> int:
    """The `diffaccel calibrate` subcommand (diffaccel.cli)."""
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    command = "diffaccel " + " ".join(args.argv)
    try:
        cal = calibrate(args.device, save=not args.no_save, quick=args.quick, command=command, log=log)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if not all(_finite(v) for v in (cal.flops, cal.bandwidth, cal.launch, cal.pool_launch)):
        raise SystemExit(f"diffaccel calibrate: the measurement gave unusable constants {cal.cost}")
    where = f"saved to {cal.path}" if cal.path else "not saved (--no-save)"
    idle = cal.measurements.get("device", {}).get("cpu_idle_before")
    if idle is not None and idle < 0.8:
        print(f"note: the machine was busy when this started ({1 - idle:.0%} of its CPU time in use); other work "
              "slows the measurements down, so rerun `diffaccel calibrate` when it is idle", file=sys.stderr)
    if args.json:
        print(json.dumps(cal.to_dict(), indent=1))
        print(f"calibration {cal.device}: {where}", file=sys.stderr)
    else:
        print(f"\ncalibration {cal.device}: {cal.flops:.3g} flop/s, {cal.bandwidth:.3g} B/s, {cal.launch * 1e6:.1f} us "
              f"per extra op of a reduced call, {cal.pool_launch * 1e6:.1f} us of a pooled one; {where}")
    return 0
