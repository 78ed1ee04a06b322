"""Command line: `diffaccel run` (the main job on the embedded default), `diffaccel bench`,
`diffaccel generate` (a file of prompts, sharded across processes under `accelerate launch`),
`diffaccel demo` (the Gradio app), `diffaccel reference` (how well the reference models follow captions, and how redundant their steps are)
and `diffaccel calibrate` (the cost model's constants measured on this device)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch


def _method_arg(text: str):
    """'tome' or 'tome:ratio=0.6,sx=2' -> name or dict."""
    name, _, opts = text.partition(":")
    if not opts:
        return name
    d = {"method": name}
    for item in opts.split(","):
        key, _, value = item.partition("=")
        try:
            d[key] = json.loads(value)
        except json.JSONDecodeError:
            d[key] = value  # a plain word, e.g. mode=avg
    return d


DEFAULT_METHODS = ["tome", "todo", "sito", "fora", "toca", "duca"]
DEFAULT_PROMPT = "a large red circle at the top left and a small blue square at the bottom right on a white background"
MODELS = {"unet": "the trained reference SD-style U-Net pipeline", "dit": "the trained reference PixArt-style DiT "
          "pipeline", "random-sd": "an SD-architecture pipeline with random weights (no redundancy to exploit)"}


def _load_model(name: str, weights: str | None):
    """(pipeline, default size, default steps, description) of a `diffaccel run --model` choice."""
    if name == "random-sd":
        from .testing import default_pipeline

        return default_pipeline(), 512, 10, MODELS[name]
    from .reference import load_reference_pipeline

    return load_reference_pipeline(name, path=weights), 256, 20, MODELS[name]


@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' logging at errors only, and transformers' weight-loading progress bar
    off, for the duration of a run; the user's settings come back afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    verbosity, bar = (dlog.get_verbosity(), tlog.get_verbosity()), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity[0])
        tlog.set_verbosity(verbosity[1])
        if bar:
            tlog.enable_progress_bar()


def _machine() -> dict:
    """What the timings depend on: versions, platform, threads."""
    import platform

    import diffusers
    import transformers

    from . import __version__

    return {"diffaccel": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


GRID_ROWS = 8  # grid.png shows at most this many images of the batch per configuration


def _write_run(out_dir: Path, args: argparse.Namespace, what: str, prompts: list[str], rows: list[dict],
               images: list[torch.Tensor]) -> str:
    """Each configuration's first image as a PNG, grid.png (a column per configuration, captioned with
    speed-up and PSNR) and report.json into `out_dir`; returns what the grid leaves out ('' if nothing)."""
    from .bench.report import dumps
    from .images import image_grid, to_pil

    for k, (row, imgs) in enumerate(zip(rows, images)):
        row["images"] = [f"{k:02d}_{re.sub(r'[^A-Za-z0-9._=-]+', '_', row['label'])}.png"]
        to_pil(imgs[0]).save(out_dir / row["images"][0])
    captions = ["baseline"] + [f"{r['label']}\n{r['speedup']:.2f}x · " + (
        f"{r['psnr']:.1f} dB" if math.isfinite(r["psnr"]) else "identical") for r in rows[1:]]
    image_grid(list(zip(captions, images)), max_rows=GRID_ROWS).save(out_dir / "grid.png")
    shown = min(len(prompts), GRID_ROWS)
    report = {"command": "diffaccel " + " ".join(args.argv), "model": args.model, "model_description": what,
              "weights": args.weights, "size": args.size, "steps": args.steps, "repeats": args.repeats,
              "prompts": prompts, "seeds": [args.seed + i for i in range(len(prompts))], "machine": _machine(),
              "grid": {"file": "grid.png", "columns": [r["label"] for r in rows], "rows": shown}, "rows": rows}
    (out_dir / "report.json").write_text(dumps(report))  # strict JSON: an infinite PSNR as null
    return f" (the grid shows the first {shown} of {len(prompts)} images)" if shown < len(prompts) else ""


def cmd_run(args: argparse.Namespace) -> int:
    from . import accelerate_pipeline, describe, load_config, remove_acceleration
    from .config import config_dict
    from .metrics import fidelity, time_call
    from .reference.evaluate import call_kwargs

    torch.set_num_threads(args.threads) if args.threads else None
    # each row: (its label, the method spec); saved acceleration files are read before anything runs
    specs = args.methods if args.methods is not None else ([] if args.config else DEFAULT_METHODS)
    settings = [(spec, _method_arg(spec)) for spec in specs]
    for path in args.config:
        try:
            settings.append((Path(path).name, load_config(path)))
        except (OSError, TypeError, ValueError) as e:
            raise SystemExit(f"--config {path}: {e}") from None
    if args.captions and args.model == "random-sd":
        raise SystemExit("--captions needs a reference model (--model unet or dit): they know the captions")
    out_dir = Path(args.out).absolute()  # made now: a bad --out fails before the run, not after it
    if out_dir.suffix == ".json" and not out_dir.is_dir():
        raise SystemExit(f"--out is a folder for grid.png and report.json, got {args.out}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: {e}") from None
    with quiet_libraries():
        pipe, size, steps, what = _load_model(args.model, args.weights)
        args.size, args.steps = args.size or size, args.steps or steps
        if args.captions:
            from .reference import data

            prompts = [s.caption for s in data.evaluation_scenes(args.captions, seed=1)]
            print(f"model: {what}, {args.size}x{args.size}, {args.steps} steps, {len(prompts)} held-out captions")
        else:
            prompts = [args.prompt] * args.batch
            print(f"model: {what}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
                  f"prompt {args.prompt!r}")
        extra = call_kwargs(pipe)

        def generate():
            gen = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
            return pipe(prompts, num_inference_steps=args.steps, height=args.size, width=args.size,
                        generator=gen, output_type="pt", **extra).images

        t_base, base = time_call(generate, repeats=args.repeats)
        rows = [dict(label="baseline", method=None, seconds=t_base, speedup=1.0, **fidelity(base, base), notes=[])]
        images = [base]
        for spec, method in settings:
            # the baseline again, just before: a drift of the machine's speed then hits both sides of the ratio
            t_ref, _ = time_call(generate, repeats=args.repeats, warmup=0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                accelerate_pipeline(pipe, method)
                t, out = time_call(generate, repeats=args.repeats)
            if args.describe:
                print(describe(pipe))
            remove_acceleration(pipe)
            # what the method warned about (acting nowhere, ...)
            notes = list(dict.fromkeys(str(w.message) for w in caught if _ours(w)))
            rows.append(dict(label=spec, method=config_dict(method)["methods"], seconds=t, speedup=t_ref / t,
                             **fidelity(out, base), notes=notes))
            images.append(out)
    grid_note = _write_run(out_dir, args, what, prompts, rows, images)
    print(f"\n{'method':<28}{'time/s':>9}{'speed-up':>10}{'PSNR/dB':>10}{'SSIM':>8}{'rel.err':>9}")
    for r in rows:
        print(f"{r['label']:<28}{r['seconds']:>9.2f}{r['speedup']:>9.2f}x{r['psnr']:>10.1f}{r['ssim']:>8.4f}"
              f"{r['rel_error']:>9.4f}")
    notes = [f"{r['label']}: {message}" for r in rows for message in r["notes"]]
    if notes:
        print("\n" + "\n".join(notes) + "\n(--describe shows what acted at each site and step)")
    print("\n(each speed-up is against a baseline run timed just before that method; CPU timings are noisy:"
          " compare the ratios of one run, not absolute times, and raise --repeats for steadier ones)")
    print(f"\nwrote grid.png and report.json to {out_dir}{grid_note}")
    return 0


def _ours(w: warnings.WarningMessage) -> bool:
    """A warning the acceleration gave (they name the method first)."""
    from .methods import available_methods

    return issubclass(w.category, UserWarning) and str(w.message).split(" ", 1)[0].rstrip(":") in available_methods()


def cmd_reference(args: argparse.Namespace) -> int:
    import itertools

    from .reference import data, load_reference_pipeline
    from .reference.evaluate import caption_following, random_weight_copy, sample_grid, step_redundancy

    report: dict = {"command": "diffaccel " + " ".join(args.argv),
                    "n": args.n, "steps": args.steps}
    prompts = [s.caption for s in data.evaluation_scenes(4, seed=1)]
    for kind in args.kinds:
        trained = load_reference_pipeline(kind, path=args.path)
        rand = random_weight_copy(trained)
        row = {}
        for label, pipe in (("trained", trained), ("random", rand)):
            row[label] = {"caption_following": caption_following(pipe, n=args.n, steps=args.steps),
                          "step_redundancy": step_redundancy(pipe, prompts, steps=args.steps)}
            print(f"{kind:<5} {label:<8} caption following {row[label]['caption_following']:.3f}   "
                  f"block change per step: mean {row[label]['step_redundancy']['mean']:.4f}, "
                  f"median {row[label]['step_redundancy']['median']:.4f}")
        report[kind] = row
        if args.grid:
            Path(args.grid).mkdir(parents=True, exist_ok=True)
            several = (s for s in data.scenes(3, held_out=True) if len(s.shapes) > 1)  # an endless stream
            scenes = data.evaluation_scenes(8, seed=2)[:4] + list(itertools.islice(several, 4))
            sample_grid(trained, scenes, steps=args.steps).save(Path(args.grid) / f"samples_{kind}.png")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('diffaccel demo needs the demo extra: pip install -e ".[demo]"') from None
    from .demo.app import main as demo_main

    return demo_main(args.demo_args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import cmd_calibrate

    return cmd_calibrate(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="accelerate the embedded default pipeline, print speed-up and fidelity")
    run.add_argument("--methods", nargs="*", default=None,
                     help="methods to compare, e.g. tome tome:ratio=0.6 todo:factor=3 (default: every method at "
                          "its defaults, unless --config is given)")
    run.add_argument("--config", nargs="+", default=[], metavar="FILE",
                     help="accelerations saved with diffaccel.save_config, one row each")
    run.add_argument("--model", choices=list(MODELS), default="dit",
                     help="; ".join(f"{k}: {v}" for k, v in MODELS.items()) + " (default: dit, the reference "
                     "model that follows its captions)")
    run.add_argument("--weights", default=None, help="unet/dit: a folder written by `python -m "
                                                     "diffaccel.reference.train` (default: the packaged weights)")
    run.add_argument("--prompt", default=DEFAULT_PROMPT, help="default: a caption held out of training")
    run.add_argument("--size", type=int, default=None, help="pixels (default: 256 for unet/dit, 512 for random-sd)")
    run.add_argument("--steps", type=int, default=None, help="default: 20 for unet/dit, 10 for random-sd")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--captions", type=int, default=0, help="unet/dit: generate for this many held-out captions "
                     "(one image each, in one batch) instead of --prompt; PSNR is the mean over the images")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--describe", action="store_true", help="print describe() of each accelerated pipeline")
    run.add_argument("--out", default="diffaccel-run", metavar="DIR",
                     help="folder (made if missing) for grid.png (the baseline and each method side by side, "
                          "captioned with speed-up and PSNR), report.json (the command, the machine, a row per "
                          "configuration) and each configuration's first image (default: ./diffaccel-run/)")
    run.set_defaults(func=cmd_run)

    from .bench import add_bench_parser

    add_bench_parser(sub)

    from .generate import add_generate_parser

    add_generate_parser(sub)

    demo = sub.add_parser("demo", add_help=False, help="the Gradio demo in a browser: baseline and accelerated side "
                          "by side (needs the demo extra; `diffaccel demo --help` for its options)")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

    ref = sub.add_parser("reference", help="caption following and step redundancy of the reference models, beside "
                                           "random-weight copies; optionally a sample grid")
    ref.add_argument("--kinds", nargs="+", choices=["unet", "dit"], default=["unet", "dit"])
    ref.add_argument("--n", type=int, default=64, help="held-out captions scored per pipeline")
    ref.add_argument("--steps", type=int, default=20)
    ref.add_argument("--path", default=None, help="a folder written by the training script (default: packaged)")
    ref.add_argument("--grid", default=None, help="folder for sample grids (samples_<kind>.png)")
    ref.add_argument("--out", default=None, help="write the figures as JSON here")
    ref.set_defaults(func=cmd_reference)

    cal = sub.add_parser("calibrate", help="measure the cost model's constants on this device and save them as "
                                           "its calibration (docs/calibration.md)")
    cal.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller shapes: a few seconds, rougher figures")
    cal.add_argument("--no-save", action="store_true", help="measure and print, but keep the saved calibration")
    cal.add_argument("--json", action="store_true", help="print the calibration file's JSON on stdout (progress "
                                                         "goes to stderr)")
    cal.set_defaults(func=_cmd_calibrate)
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["demo"]:  # its options are the demo's own (argparse cannot hand on a leading --option)
        return cmd_demo(argparse.Namespace(demo_args=given[1:]))
    args = parser.parse_args(argv)
    args.argv = given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
