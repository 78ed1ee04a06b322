"""What every suite shares: installing a configuration for a run, interleaved timing rounds, the
report header (command, machine, versions)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import shlex
import time

import torch


def ours(model, spec, cfg: bool, num_steps: int | None = None):
    """Installer of our acceleration `spec` on a bare denoiser (told its CFG layout and step count)."""
    from .. import accelerate_pipeline, remove_acceleration

    accelerate_pipeline(model, spec, cfg_batched=cfg, num_steps=num_steps)
    return lambda: remove_acceleration(model)


@contextlib.contextmanager
def installed(model, install):
    """The configuration installed on `model` (an installer returns its remover; None: the baseline)."""
    remove = install(model) if install else None
    try:
        yield
    finally:
        if remove:
            remove()


def timed(model, install, fn) -> tuple[object, float]:
    """(fn(), seconds) with the configuration installed on `model` for the call only."""
    with installed(model, install), torch.no_grad():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


def only(settings: list, names: list[str] | None) -> list:
    """The baseline and the settings whose label contains one of `names` (all of them without it)."""
    return [s for s in settings if s[0] == "baseline" or not names or any(o in s[0] for o in names)]


def command_line(args: argparse.Namespace) -> str:
    return "diffaccel " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))


def versions() -> dict:
    """Versions of what the figures depend on (None: not installed)."""
    found = {}
    for dist in ("diffaccel", "torch", "diffusers", "transformers", "torchmetrics", "tomesd", "DeepCache", "tgate",
                 "cache-dit", "triton"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def machine(device: str = "cpu") -> dict:
    """Where the figures were measured."""
    info = {"device": device, "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def report_header(args: argparse.Namespace, **fields) -> dict:
    """A report's header: the command that produced it, the architecture and the machine."""
    return dict(command=command_line(args), arch=getattr(args, "arch", None), **fields,
                device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                platform=platform.platform(), date=time.strftime("%Y-%m-%d"))


def rounds(model, configs: list, calls: list, warmup: int, fn) -> tuple[dict, dict]:
    """Interleaved rounds: every (label, installer) configuration runs fn(call) once per round, on that
    round's call input (the first `warmup` rounds use the first input and are not kept), so slow
    drifts of the machine's speed hit all of them alike. Returns ({label: [seconds]}, {label: [outputs]})."""
    times: dict[str, list[float]] = {label: [] for label, _ in configs}
    outs: dict[str, list] = {label: [] for label, _ in configs}
    for r in range(warmup + len(calls)):
        arg = calls[max(0, r - warmup)]
        for label, install in configs:
            out, elapsed = timed(model, install, lambda arg=arg: fn(arg))
            if r >= warmup:
                times[label].append(elapsed)
                outs[label].append(out)
    return times, outs


