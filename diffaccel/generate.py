"""`diffaccel generate`: many prompts through one accelerated pipeline, on one process or sharded
across processes and machines with `accelerate launch`.

    diffaccel generate --prompts prompts.txt --method toca --out out/
    accelerate launch --num_processes 8 -m diffaccel generate --prompts prompts.jsonl --config acc.json --out out/

Prompts are a text file (one prompt per line; blank lines are skipped) or JSONL (one object per line:
"prompt", and optionally "id", "seed", "size" / "height" / "width", "negative_prompt"). Each prompt gets
an id (given, or its position: 000000, 000001, ...) and its image is written as `images/<id>.png`
(a video's frames as `frames/<id>/0000.png`, ...). `--batch-size N` puts up to N consecutive prompts of
one size in one pipeline call (each with its own seed).

Sharding and resuming: the main process reads what earlier runs finished (the manifest parts in the
output folder) and broadcasts it with the run's number, then accelerate's process state splits the
unfinished prompts between the processes. Each process appends one JSON line per prompt to its own part
(`manifest.part-<process>.jsonl`), flushed and synced to disk before the next prompt starts, after the
image is in place (written under a temporary name, synced and renamed): a crash or a kill loses at most
the prompts in flight, and a rerun skips every prompt whose newest finished record (the one its files
hold) is for the prompt as the file has it now and whose files exist. A prompt that fails is recorded
with its error, the others go on, and a rerun tries it again. At the end the main process merges the
parts into `manifest.jsonl` (one record per prompt of the file, in its order; written under a temporary
name and renamed). `run.json` keeps the settings; a rerun with other settings into the same folder is
refused (it would mix images of two settings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RUN_FORMAT = "diffaccel.generate"
MANIFEST = "manifest.jsonl"
PART = "manifest.part-{:05d}.jsonl"
PART_GLOB = "manifest.part-*.jsonl"
PROMPT_KEYS = ("prompt", "id", "seed", "size", "height", "width", "negative_prompt")
ERROR_CHARS = 2000  # of a failure's message kept in the manifest
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PromptFileError(ValueError):
    """A prompt file that cannot be read: the message names the file, the line and what is allowed."""


@dataclass(frozen=True)
class Prompt:
    index: int  # position among the file's prompts
    line: int  # line of the file (from 1)
    id: str
    prompt: str
    seed: int
    height: int | None
    width: int | None
    negative_prompt: str | None

    def fields(self) -> dict:
        """What a finished record must match for this prompt to count as done."""
        return {"prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
                "negative_prompt": self.negative_prompt}


# -- the prompt file ----------------------------------------------------------------------------------


def _positive(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptFileError(f"{where}: {what} is a positive int, got {value!r}")
    return value


def _size(obj: dict, default: tuple[int | None, int | None], where: str) -> tuple[int | None, int | None]:
    if "size" in obj and ("height" in obj or "width" in obj):
        raise PromptFileError(f"{where}: give 'size' or 'height'/'width', not both")
    if "size" in obj:
        size = obj["size"]
        if isinstance(size, list) and len(size) == 2:
            return _positive(size[0], "size[0] (height)", where), _positive(size[1], "size[1] (width)", where)
        if isinstance(size, list):
            raise PromptFileError(f"{where}: 'size' is an int or [height, width], got {size!r}")
        side = _positive(size, "'size' (an int or [height, width])", where)
        return side, side
    height = _positive(obj["height"], "'height'", where) if "height" in obj else default[0]
    width = _positive(obj["width"], "'width'", where) if "width" in obj else default[1]
    return height, width


def read_prompts(path: str | os.PathLike, seed: int = 0, size: tuple[int | None, int | None] = (None, None),
                 negative_prompt: str | None = None) -> list[Prompt]:
    """The prompts of a text or JSONL file, with their ids, seeds (`seed` + position where a line gives
    none), sizes and negative prompts (the defaults where a line gives none). Raises PromptFileError
    naming the line and what is allowed; reads the whole file before anything runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(f"--prompts {path}: a folder, not a prompt file") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(k + 1, line) for k, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise PromptFileError(f"--prompts {path}: no prompts (a text file with one prompt per line, or JSONL with "
                              "one object per line with a 'prompt')")
    suffix = path.suffix.lower()
    jsonl = suffix in (".jsonl", ".json") or (suffix != ".txt" and lines[0][1].lstrip().startswith("{"))
    prompts: list[Prompt] = []
    for index, (number, line) in enumerate(lines):
        where = f"--prompts {path} line {number}"
        if not jsonl:
            prompts.append(Prompt(index, number, f"{index:06d}", line.strip(), seed + index, *size, negative_prompt))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg}); a JSONL prompt file has one object per "
                                  "line, e.g. {\"prompt\": \"a red bicycle\", \"seed\": 3}") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: each line is a JSON object with a 'prompt', got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(PROMPT_KEYS))
        if unknown:
            raise PromptFileError(f"{where}: unknown keys {unknown}; allowed: {list(PROMPT_KEYS)}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: 'prompt' is a non-empty string, got {prompt!r}")
        ident = obj.get("id", f"{index:06d}")
        if not isinstance(ident, str) or not ID_PATTERN.fullmatch(ident):
            raise PromptFileError(f"{where}: 'id' names the output files: letters, digits, '.', '_' and '-' "
                                  f"(at most 128, not starting with '.', '_' or '-'), got {ident!r}")
        own_seed = obj.get("seed", seed + index)
        if isinstance(own_seed, bool) or not isinstance(own_seed, int) or not 0 <= own_seed < 2 ** 63:
            raise PromptFileError(f"{where}: 'seed' is an int from 0 to 2**63 - 1, got {own_seed!r}")
        negative = obj.get("negative_prompt", negative_prompt)
        if negative is not None and not isinstance(negative, str):
            raise PromptFileError(f"{where}: 'negative_prompt' is a string, got {negative!r}")
        prompts.append(Prompt(index, number, ident, prompt, own_seed, *_size(obj, size, where), negative))
    seen: dict[str, Prompt] = {}
    for p in prompts:
        other = seen.get(p.id.lower())  # (file names that differ in case only are one file on some systems)
        if other is not None:
            raise PromptFileError(f"--prompts {path} line {p.line}: id {p.id!r} is also on line {other.line}"
                                  f"{' as ' + repr(other.id) if other.id != p.id else ''}; ids are unique, letter "
                                  "case aside (they name the output files)")
        seen[p.id.lower()] = p
    return prompts


# -- the manifest -------------------------------------------------------------------------------------


def read_records(out: Path) -> list[dict]:
    """Every record in the manifest parts of `out`, in the order written (a line cut short by a kill is
    skipped: its prompt is generated again)."""
    records = []
    for part in sorted(out.glob(PART_GLOB)):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                records.append(record)
    return records


def newest(records: list[dict], ok: bool = False) -> dict[str, dict]:
    """Per prompt id, its newest record (the highest run; within a run an id has one record), or its
    newest "ok" one: the record of what its files hold now (a later run overwrites them; a failure
    writes none)."""
    out: dict[str, dict] = {}
    for r in records:
        if ok and r.get("status") != "ok":
            continue
        kept = out.get(r["id"])
        if kept is None or r.get("run", 0) >= kept.get("run", 0):
            out[r["id"]] = r
    return out


def _done(out: Path, p: Prompt, r: dict | None) -> bool:
    """Whether `r`, the newest "ok" record of prompt `p`'s id, finished `p` as it is now: the same text,
    seed, size and negative prompt, and its files there."""
    return (r is not None and all(r.get(k) == v for k, v in p.fields().items()) and bool(r.get("files"))
            and all((out / f).is_file() for f in r["files"]))


def finished(out: Path, prompts: list[Prompt], records: list[dict] | None = None) -> set[str]:
    """Ids of the prompts the runs in `out` finished."""
    made = newest(read_records(out) if records is None else records, ok=True)
    return {p.id for p in prompts if _done(out, p, made.get(p.id))}


def merge(out: Path, prompts: list[Prompt]) -> tuple[list[dict], set[str]]:
    """Write `manifest.jsonl`: one record per prompt of the file that has one, in prompt order: the
    record of its finished image where it has one, else its newest (a failure, or what the id was
    before); atomically (a temporary file renamed over the old one). Returns the records and the ids
    of the prompts finished."""
    records = read_records(out)
    made, last = newest(records, ok=True), newest(records)
    rows, done = [], set()
    for p in prompts:
        if _done(out, p, made.get(p.id)):
            done.add(p.id)
        r = made[p.id] if p.id in done else last.get(p.id)
        if r is not None:
            rows.append(r)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return rows, done


def _append(path: Path, record: dict) -> None:
    """One JSON line, on disk before this returns; on a line of its own even after a line a kill cut
    short (which readers skip)."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        cut = False
        if f.tell():
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# -- images -------------------------------------------------------------------------------------------


def _save(image: Any, path: Path) -> None:
    """An image (PIL, or an array/tensor in [0, 1]) as a PNG, written under a temporary name and renamed."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        from .images import to_pil

        image = to_pil(image if image.shape[0] == 3 else image.permute(2, 0, 1))
    elif not isinstance(image, Image.Image):
        import numpy as np

        array = np.asarray(image)
        image = Image.fromarray((array.clip(0, 1) * 255).round().astype("uint8") if array.dtype != np.uint8 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # on disk before its record is
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_output(output: Any, out: Path, ident: str, k: int = 0) -> list[str]:
    """Write the `k`-th result of a pipeline output (an image, or a video's frames) as prompt `ident`'s;
    returns the files written, relative to `out`."""
    frames = getattr(output, "frames", None)
    if frames is not None:
        video = frames[k]
        names = [f"frames/{ident}/{k:04d}.png" for k in range(len(video))]
        for frame, name in zip(video, names):
            _save(frame, out / name)
        return names
    images = getattr(output, "images", None)
    if images is None:
        raise TypeError(f"the pipeline returned {type(output).__name__}, which has neither images nor frames")
    name = f"images/{ident}.png"
    _save(images[k], out / name)
    return [name]


# -- a run --------------------------------------------------------------------------------------------


def _state():
    """accelerate's process state: several processes under `accelerate launch` / torchrun (gloo on
    machines without an accelerator), one otherwise."""
    from accelerate import PartialState

    accelerator = getattr(torch, "accelerator", None)  # (torch >= 2.6)
    return PartialState(cpu=not (accelerator.is_available() if accelerator else torch.cuda.is_available()))


def batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """Consecutive prompts grouped into pipeline calls of at most `size`: one call takes one image size,
    and negative prompts for all of its prompts or for none."""
    out: list[list[Prompt]] = []
    for p in prompts:
        last = out[-1] if out else None
        if last and len(last) < size and (last[0].height, last[0].width, last[0].negative_prompt is None) == (
                p.height, p.width, p.negative_prompt is None):
            last.append(p)
        else:
            out.append([p])
    return out


def _call_kwargs(pipe: Any, batch: list[Prompt], steps: int | None, guidance: float | None) -> dict:
    import inspect

    from .reference.evaluate import call_kwargs

    params = inspect.signature(pipe.__call__).parameters
    p = batch[0]
    kwargs: dict[str, Any] = {"prompt": [q.prompt for q in batch],
                              "generator": [torch.Generator().manual_seed(q.seed) for q in batch]}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if p.height is not None:
        kwargs["height"], kwargs["width"] = p.height, p.width
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if p.negative_prompt is not None:
        if "negative_prompt" not in params:
            raise ValueError(f"{type(pipe).__name__} takes no negative prompt")
        kwargs["negative_prompt"] = [q.negative_prompt for q in batch]
    kwargs.update(call_kwargs(pipe))  # (PixArt: clean_caption=False)
    if "output_type" in params:
        kwargs["output_type"] = "pil"
    return kwargs


def _check_run(out: Path, settings: dict) -> None:
    """Refuse a folder that holds a run with other settings."""
    run_file = out / "run.json"
    if not run_file.exists():
        return
    try:
        before = json.loads(run_file.read_text(encoding="utf-8")).get("settings")
    except (json.JSONDecodeError, AttributeError):
        raise SystemExit(f"--out {out}: run.json is not a diffaccel generate run file; use another --out") from None
    if before != settings:
        changed = sorted(k for k in set(before or {}) | set(settings) if (before or {}).get(k) != settings.get(k))
        raise SystemExit(f"--out {out} holds images made with other settings (differing: {', '.join(changed)}); "
                         "resume with the same settings, or write to another --out")


def generate(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    from . import accelerate_pipeline
    from .cli import _method_arg, quiet_libraries
    from .config import config_dict, load_config
    from .loading import DTYPES, load_pipeline

    if args.method and args.config:
        raise SystemExit("give --method or --config, not both")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps is a positive int, got {args.steps}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size is a positive int, got {args.batch_size}")
    height, width = args.size if args.size else (None, None)
    try:
        prompts = read_prompts(args.prompts, seed=args.seed, size=(height, width), negative_prompt=args.negative_prompt)
    except PromptFileError as e:
        raise SystemExit(str(e)) from None
    try:
        if args.config:
            methods = load_config(args.config)
        else:
            methods = [_method_arg(m) for m in args.method] if args.method else None
        acceleration = config_dict(methods) if methods else None
    except (OSError, TypeError, ValueError) as e:
        raise SystemExit(f"{'--config ' + args.config if args.config else '--method'}: {e}") from None
    out = Path(args.out).absolute()
    settings = {"model": args.model, "weights": args.weights, "steps": args.steps, "guidance": args.guidance,
                "dtype": args.dtype, "acceleration": acceleration}

    state = _state()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: {e}") from None
    _check_run(out, settings)
    # The main process reads what earlier runs finished and tells every process: one list for all of them
    # (several machines may see a shared folder differently), read before anyone writes
    plan = [None, None]
    if state.is_main_process:
        records = read_records(out)
        plan = [sorted(finished(out, prompts, records)), 1 + max((r.get("run", 0) for r in records), default=0)]
    if state.num_processes > 1:
        plan = broadcast_object_list(plan)
    done, run = set(plan[0]), plan[1]
    pending = [p for p in prompts if p.id not in done]
    torch.set_num_threads(args.threads) if args.threads else None
    pipe = None
    if pending:  # (a rerun with everything done only merges)
        with quiet_libraries():
            try:
                pipe, _, _ = load_pipeline(args.model, args.weights, state.device, DTYPES[args.dtype])
            except (OSError, ValueError, TypeError) as e:
                raise SystemExit(f"--model {args.model}: {e}") from None
            pipe.set_progress_bar_config(disable=True)
            if methods:
                try:
                    accelerate_pipeline(pipe, methods)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise SystemExit(f"the acceleration cannot run on this pipeline: {e}") from None
    if state.is_main_process and pending and not (out / "run.json").exists():  # (settings that ran)
        tmp = out / "run.json.tmp"
        tmp.write_text(json.dumps({"format": RUN_FORMAT, "version": 1, "settings": settings}, indent=1) + "\n",
                       encoding="utf-8")
        os.replace(tmp, out / "run.json")
    part = out / PART.format(state.process_index)
    generated = failed = 0
    state.wait_for_everyone()  # the clock starts when every process has its pipeline
    start = time.perf_counter()
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=len(mine), desc=f"process {state.process_index}", position=state.process_index,
                   unit="image", dynamic_ncols=True, leave=True)
        queue = batches(mine, args.batch_size)
        while queue:
            batch = queue.pop(0)
            t0 = time.perf_counter()
            try:
                with quiet_libraries(), torch.inference_mode():
                    output = pipe(**_call_kwargs(pipe, batch, args.steps, args.guidance))
                seconds = time.perf_counter() - t0
                results = [dict(status="ok", files=save_output(output, out, p.id, k)) for k, p in enumerate(batch)]
            except Exception as e:  # recorded, and the other prompts go on
                if len(batch) > 1:  # one prompt may have failed the call: each alone
                    queue[:0] = [[p] for p in batch]
                    continue
                seconds = time.perf_counter() - t0
                results = [dict(status="failed", error=f"{type(e).__name__}: {e}"[:ERROR_CHARS],
                                where=traceback.format_exc(limit=-1).strip().splitlines()[-3:-1])]
                bar.write(f"process {state.process_index}: prompt {batch[0].id} (line {batch[0].line}) failed: "
                          f"{results[0]['error']}")
            when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for p, result in zip(batch, results):
                _append(part, {"id": p.id, "index": p.index, "line": p.line, **p.fields(), "steps": args.steps,
                               "guidance": args.guidance, "model": args.model, "dtype": args.dtype,
                               "acceleration": acceleration, **result, "seconds": round(seconds, 4),
                               "batch": len(batch), "run": run, "process": state.process_index,
                               "num_processes": state.num_processes, "finished": when})
            generated += sum(r["status"] == "ok" for r in results)
            failed += sum(r["status"] == "failed" for r in results)
            bar.update(len(batch))
        bar.close()
    elapsed = time.perf_counter() - start
    counts = [(generated, failed, elapsed)]
    gathered = gather_object(counts) if state.num_processes > 1 else counts  # every process's, everywhere
    if state.is_main_process:
        _, complete = merge(out, prompts)
        made = sum(g for g, _, _ in gathered)
        bad = sum(f for _, f, _ in gathered)
        wall = max(t for _, _, t in gathered)
        ok = len(complete)
        rate = made / wall if wall > 0 else 0.0
        print(f"generated {made} image{'s' * (made != 1)} in {wall:.1f} s on {state.num_processes} "
              f"process{'es' * (state.num_processes != 1)}: {rate:.3f} images/s; {len(done)} finished before, "
              f"{bad} failed; {ok} of {len(prompts)} prompts done (manifest: {out / MANIFEST})")
        if bad or ok < len(prompts):
            print("run the same command again to retry the prompts not done (the failed ones' errors are in the "
                  "manifest)")
    state.wait_for_everyone()
    return 0 if all(f == 0 for _, f, _ in gathered) else 1


def add_generate_parser(sub: Any) -> None:
    from .loading import BUILT_IN, DTYPES

    g = sub.add_parser("generate", help="generate images for a file of prompts with an accelerated pipeline; "
                                        "under `accelerate launch` the prompts are split between the processes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prompts", required=True, metavar="FILE",
                   help="a text file (one prompt per line) or JSONL (per line: prompt, and optionally id, seed, "
                        "size or height/width, negative_prompt)")
    g.add_argument("--method", nargs="+", default=None, metavar="SPEC",
                   help="the acceleration: methods to compose, e.g. toca or tome:ratio=0.5 fora:interval=3 "
                        "(default: none, the pipeline as it is)")
    g.add_argument("--config", default=None, metavar="FILE", help="an acceleration saved with diffaccel.save_config "
                                                                   "(instead of --method)")
    g.add_argument("--model", default="dit", metavar="MODEL",
                   help=f"{', '.join(BUILT_IN)} (embedded, no downloads), or a pipeline folder or hub id read with "
                        "DiffusionPipeline.from_pretrained (safetensors only); default: dit")
    g.add_argument("--weights", default=None, help="dit/unet: a folder written by the reference training script")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    g.add_argument("--size", type=_size_arg, default=None, metavar="N|HxW",
                   help="pixels, where a prompt gives none (default: the pipeline's)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--negative-prompt", default=None, help="where a prompt gives none")
    g.add_argument("--seed", type=int, default=0, help="a prompt without its own seed gets this + its position")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call, each with its own seed "
                   "(consecutive prompts of one size; a call that fails is retried one prompt at a time)")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32")
    g.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="folder (made if missing) for images/, frames/, the manifest and run.json; rerunning into "
                        "it resumes. With several machines, a folder they all see")
    g.set_defaults(func=generate)


def _size_arg(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"a size is N or HxW in pixels, e.g. 512 or 768x1024; got {text!r}")
    h = int(match.group(1))
    return h, int(match.group(2)) if match.group(2) else h
