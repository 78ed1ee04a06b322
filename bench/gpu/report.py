"""Merge the GPU run's outputs into gpu.json (everything, with the machine and the commands) and
gpu.md (tables). Reads from --dir: kernels.json, end_to_end.json, calibration-cuda.json, and the
step log run.sh keeps (--steps: one JSON object a line: name, command, rc, seconds)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import write_json  # noqa: E402


def _load(path: Path) -> tuple[Any, str | None]:
    if not path.exists():
        return None, f"{path.name} was not written"
    try:
        return json.loads(path.read_text()), None
    except ValueError as e:
        text = path.read_text()[:300]
        return None, f"{path.name} is not JSON ({e}); it starts: {text!r}"


def _f(x: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, fmt)


def _met(x: Any) -> str:
    return "–" if x is None else ("yes" if x else "**no**")


def build(directory: Path, steps_file: Path | None, command: str) -> tuple[dict, str]:
    steps = []
    if steps_file and steps_file.exists():
        for line in steps_file.read_text().splitlines():
            try:
                steps.append(json.loads(line))
            except ValueError:
                steps.append(dict(name="?", command=line, rc="unreadable", seconds=None))
    kernels, k_err = _load(directory / "kernels.json")
    e2e, e_err = _load(directory / "end_to_end.json")
    cal, c_err = _load(directory / "calibration-cuda.json")
    machine = (kernels or {}).get("machine") or (e2e or {}).get("machine") or {}
    targets = list((kernels or {}).get("targets", []))
    for part in (e2e or {}).get("parts", {}).values():
        targets += part.get("targets", [])
    out = dict(command=command, machine=machine, steps=steps, targets=targets,
               kernels=kernels if kernels is not None else dict(error=k_err),
               end_to_end=e2e if e2e is not None else dict(error=e_err),
               calibration=cal if cal is not None else dict(error=c_err))

    md = ["# diffaccel on the GPU", "", f"Command: `{command}` (see command.txt).", ""]
    if machine:
        md += [f"Machine: {machine.get('gpu', machine.get('device'))}, torch {machine.get('torch')} (CUDA "
               f"{machine.get('cuda')}), triton {machine.get('triton')}, diffusers {machine.get('diffusers')}, "
               f"tomesd {machine.get('tomesd')}, cache-dit {machine.get('cache_dit')}, Python {machine.get('python')}, "
               f"{machine.get('date')}.", ""]
    if steps:
        md += ["| step | rc | seconds | command |", "|---|---|---|---|"]
        md += [f"| {s['name']} | {s['rc']}{' (timed out)' if s['rc'] in (124, 137) else ''} | {s['seconds']} | "
               f"`{s['command']}` |" for s in steps]
        md.append("")
    md += ["## Targets", "", "| target | figure | met |", "|---|---|---|"]
    for t in targets:
        if "rows" in t:
            fig = "; ".join(f"C={r['width']} {r['dtype']}: {_f(r['speedup'])}x, {_f(r['bw_fraction'], '.0%')} of copy"
                            for r in t["rows"]) or "not measured"
        else:
            fig = f"ours {_f(t.get('ours'))}x vs tomesd {_f(t.get('tomesd'))}x (ratio {_f(t.get('ratio'))})"
        md.append(f"| {t['target']} | {fig} | {_met(t.get('met'))} |")
    md.append("")

    md += ["## Token ops: diffaccel.kernels vs the torch reference", ""]
    if kernels is None:
        md += [f"Not measured: {k_err}", ""]
    else:
        if kernels.get("note"):
            md += [f"**{kernels['note']}**", ""]
        copy = ", ".join(f"{d}: {c['bytes_per_s'] / 1e12:.2f} TB/s" for d, c in kernels.get("copy", {}).items())
        md += [f"Batch {kernels.get('batch')}; copy bandwidth (read + written, {int(next(iter(kernels.get('copy', {}).values()), {}).get('bytes', 0)) >> 20} MiB): {copy}. "
               f"Default mode runs: {kernels.get('kernels', {}).get('default_runs')}.", "",
               "| op | N | C | dtype | reference µs | default µs | speed-up | bandwidth (share of copy) | "
               "max diff / equal idx | met |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(kernels.get("rows", []), key=lambda r: (r["op"], r["tokens"], r["width"], r["dtype"])):
            diff = (_f(r.get("max_abs_diff"), ".2e") if r.get("max_abs_diff") is not None
                    else _f(r.get("equal_fraction"), ".3f"))
            err = r.get("default_error") or r.get("reference_error")
            md.append(f"| {r['op']} | {r['tokens']} | {r['width']} | {r['dtype']} | "
                      f"{_f(r.get('reference_seconds'), '.1f', 1e6)} | {_f(r.get('default_seconds'), '.1f', 1e6)} | "
                      f"{_f(r.get('speedup'))} | {_f(r.get('default_bw_fraction'), '.0%')} | {diff} | "
                      f"{_met(r.get('met')) if 'met' in r else ''}{' ' + err[:80] if err else ''} |")
        for s in kernels.get("skipped", []):
            md.append(f"| skipped | {s['tokens']} | {s['width']} | {s['dtype']} | {s['why']} | | | | | |")
        md.append("")

    md += ["## End to end: denoiser loops", ""]
    if e2e is None:
        md += [f"Not measured: {e_err}", ""]
    else:
        md += [f"dtype {e2e.get('dtype')}, {e2e.get('attention')}. Timing: {e2e.get('timing')}", "",
               f"Caching settings matched: {e2e.get('matching_rule')}", ""]
        for name, part in e2e.get("parts", {}).items():
            md += [f"### {name} ({part.get('status')})", ""]
            md += [f"- {n}" for n in part.get("notes", [])]
            groups: dict[tuple, list] = {}
            for r in part.get("rows", []):
                groups.setdefault((r["family"], r["size"], r["steps"], r["batch"]), []).append(r)
            for (family, size, steps, batch), rows in groups.items():
                md += ["", f"{family} at {size}², batch {batch}, {steps} calls a run:", "",
                       "| config | s a run | ms a call | speed-up | TFLOPs a run | FLOP speed-up | rel. error | note |",
                       "|---|---|---|---|---|---|---|---|"]
                for r in rows:
                    note = r.get("error") or ("" if r.get("finite") in (True, None) else "non-finite output")
                    md.append(f"| {r['config']} | {_f(r.get('seconds'), '.3f')} | {_f(r.get('ms_per_call'), '.1f')} | "
                              f"{_f(r.get('speedup'))} | {_f(r.get('flops'), '.1f', 1e-12)} | "
                              f"{_f(r.get('flop_speedup'))} | {_f(r.get('rel_error'), '.4f')} | {note} |")
            md.append("")

    md += ["## Calibration (`python -m diffaccel calibrate --device cuda --json`)", ""]
    if cal is None:
        md += [f"Failed: {c_err}", ""]
    else:
        consts = cal.get("constants", cal)
        md += ["| constant | value |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" for k, v in consts.items() if isinstance(v, (int, float))]
        md.append("")
    return out, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", required=True, help="the output folder of run.sh")
    p.add_argument("--steps", help="run.sh's step log (JSON lines)")
    p.add_argument("--command", default="bash bench/gpu/run.sh")
    args = p.parse_args(argv)
    d = Path(args.dir)
    data, md = build(d, Path(args.steps) if args.steps else None, args.command)
    write_json(d / "gpu.json", data)
    (d / "gpu.md").write_text(md)
    print(f"wrote {d / 'gpu.json'} and {d / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
