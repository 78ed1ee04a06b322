"""Helpers shared by the GPU benchmark scripts (bench/gpu): device and dtype, the kernel switch,
timing, the machine's description and JSON files written as results come in."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

KERNEL_ENV = "DIFFACCEL_KERNELS"  # "reference": diffaccel.kernels runs its torch reference (read at call time)
MODES = ("reference", "default")  # default: whatever diffaccel.kernels dispatches to (Triton on CUDA)


def device_and_dtype(smoke: bool, dtype: str = "float16") -> tuple[torch.device, torch.dtype]:
    """--smoke: CPU, fp32. Otherwise CUDA (an error without it) in `dtype`."""
    if smoke:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a machine without a GPU")
    return torch.device("cuda"), getattr(torch, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """diffaccel.kernels' default dispatch ("default": Triton on CUDA tensors) or its torch reference
    ("reference"), for the calls made inside: by the package's `use_backend("auto" | "reference")` when
    it offers one, and by the environment variable it reads at call time (DIFFACCEL_KERNELS=reference,
    or unset) in any case; the previous value is put back."""
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    old = os.environ.get(KERNEL_ENV)
    if mode == "reference":
        os.environ[KERNEL_ENV] = "reference"
    else:
        os.environ.pop(KERNEL_ENV, None)
    use = getattr(_kernels_module(), "use_backend", None)
    try:
        with use("reference" if mode == "reference" else "auto") if callable(use) else contextlib.nullcontext():
            yield
    finally:
        if old is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = old


def _kernels_module() -> Any:
    try:
        return importlib.import_module("diffaccel.kernels")
    except Exception:  # noqa: BLE001 - the callers record what they can
        return None


def active_backend(device: torch.device) -> str | None:
    """What diffaccel.kernels says runs for tensors on `device` now ("triton" / "reference", and why)."""
    fn = getattr(_kernels_module(), "backend", None)
    if not callable(fn):
        return None
    try:
        out = fn(device)
    except Exception as e:  # noqa: BLE001 - e.g. kernels forced where they cannot run
        return f"error: {type(e).__name__}: {e}"
    return ": ".join(map(str, out)) if isinstance(out, tuple) else str(out)


def kernel_info(device: torch.device) -> dict[str, Any]:
    """What diffaccel.kernels says about itself: its public names, how the modes are switched and
    which implementation each mode runs on this device."""
    info: dict[str, Any] = {"env_var": KERNEL_ENV}
    try:
        k = importlib.import_module("diffaccel.kernels")
    except Exception as e:  # noqa: BLE001 - recorded, the scripts go on
        return dict(info, error=f"{type(e).__name__}: {e}")
    info["module"] = getattr(k, "__file__", None)
    info["public"] = sorted(getattr(k, "__all__", [n for n in dir(k) if not n.startswith("_")]))
    info["switch"] = (f"diffaccel.kernels.use_backend('reference' | 'auto') and {KERNEL_ENV}=reference / unset"
                      if callable(getattr(k, "use_backend", None)) else f"{KERNEL_ENV}=reference / unset")
    for mode in MODES:
        with kernel_mode(mode):
            info[f"{mode}_runs"] = active_backend(device) or (
                "the torch reference" if mode == "reference" or device.type != "cuda"
                else "diffaccel.kernels' dispatch (Triton expected on CUDA)")
    if device.type != "cuda":
        info["note"] = "no Triton on CPU: both modes run the torch reference"
    return info


def machine(device: torch.device) -> dict[str, Any]:
    """The machine and the versions that matter."""
    out: dict[str, Any] = dict(device=device.type, python=platform.python_version(), platform=platform.platform(),
                               torch=torch.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads(),
                               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for name in ("triton", "diffusers", "transformers", "tomesd", "cache_dit"):
        try:
            mod = importlib.import_module(name)
            out[name] = getattr(mod, "__version__", None) or _dist_version(name)
        except Exception as e:  # noqa: BLE001
            out[name] = f"not importable: {type(e).__name__}: {e}"[:200]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return out


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, name.replace("_", "-")):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_json(path: str | Path, data: Any) -> None:
    """Atomically, so a step killed at its time limit leaves the last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 15,
                min_sample: float = 1e-3, max_total: float = 2.0) -> dict[str, float]:
    """Median seconds of one fn() call: `warmup` untimed calls, then `repeats` samples, each a loop of
    calls long enough to last `min_sample` s (CUDA events around it on CUDA, perf_counter on CPU);
    fewer samples when they would take more than `max_total` s."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, min(1000, int(min_sample / once)))
    repeats = max(3, min(repeats, int(max_total / (once * number))))
    samples = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / number)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
    return dict(seconds=statistics.median(samples), min_seconds=min(samples), samples=len(samples), calls_per_sample=number)


class Deadline:
    """A step's own time budget, so it stops starting work it cannot finish (run.sh kills it at its
    hard limit anyway)."""

    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds else None

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, estimate: float) -> bool:
        return self.left() > estimate
