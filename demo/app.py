"""The diffaccel demo: pick a pipeline and a method, press Run, and see on the same seed the image the
pipeline would have made and the accelerated one, the speed-up, PSNR and SSIM between them, and what
the policy did at each step and site.

    python demo/app.py [--port 7860] [--model dit|unet|ID_OR_FOLDER] [--share-host]
    diffaccel demo ...            (the same)

It serves on 127.0.0.1 only unless --share-host (or --host ADDRESS) says otherwise, and stays offline
unless --allow-downloads: the embedded reference pipelines, or a local folder of safetensors weights.
"""


import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python demo/app.py`: the installed package is diffaccel.demo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "demo"

from .engine import REFERENCE, Cancelled, DemoError, Engine, request_from, tile, to_uint8

log = logging.getLogger("diffaccel.demo")
METHODS_DEFAULT = ["toca"]
INTRO = """# diffaccel
Pick a pipeline and one or more methods, then **Run**: the baseline (no acceleration, cached per
pipeline, prompt, seed, size and steps) and the accelerated pipeline run on the same seed. Below the
images: how much faster it was, how close it is (PSNR, SSIM), and what the policy did at each step and
site. The **Advanced** panel holds the whole acceleration as the JSON that `diffaccel.save_config`
writes; **Copy as code** reproduces the run in a script. Times are wall clock on this machine: runs
of other users at the same moment slow both."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _failure(status: str, payload: dict) -> tuple:
    """The run's outputs when it produced no images: the message, and the same as JSON for the API."""
    return status, None, None, "", payload, None, "", None


def _stats_markdown(stats: dict) -> str:
    psnr = "∞ (identical)" if stats["identical"] else f"{stats['psnr']:.1f} dB"
    cached = " (cached)" if stats["baseline_cached"] else ""
    shared = (f"\n\n{stats['alongside']} other run(s) shared the machine during this one: its times are slower "
              "than alone" if stats["alongside"] else "")
    return (f"**Baseline** {stats['baseline_seconds']:.2f} s{cached} · **Accelerated** "
            f"{stats['accelerated_seconds']:.2f} s · **Speed-up {stats['speedup']:.2f}×** · "
            f"**PSNR** {psnr} · **SSIM** {stats['ssim']:.4f}{shared}")


class App:
    """The page and its handlers, around one Engine."""

    def __init__(self, engine: Engine, default_model: str = "dit"):
        self.engine = engine
        self.default_model = default_model
        # session -> its runs asked for (pending in the queue or running), each with its cancel flag
        self.runs: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self.files = Path(tempfile.mkdtemp(prefix="diffaccel-demo-"))  # config downloads, one file per config

    # -- handlers ----------------------------------------------------------------------------
    def _session(self, request: Any) -> str:
        return getattr(request, "session_hash", None) or "api"

    @staticmethod
    def _entry() -> dict:
        return {"flag": threading.Event(), "taken": False, "at": time.monotonic()}

    def ask(self, request: Any = None) -> None:
        """A run is asked for (it may wait in the queue): Cancel from now on cancels it too."""
        with self._lock:
            self.runs.setdefault(self._session(request), []).append(self._entry())

    def _take(self, session: str) -> dict:
        """The oldest run this session asked for and no run has taken (or a new one, for API calls)."""
        with self._lock:
            entries = self.runs.setdefault(session, [])
            entries[:] = [e for e in entries if e["taken"] or time.monotonic() - e["at"] < 3600]  # abandoned asks
            entry = next((e for e in entries if not e["taken"]), None)
            if entry is None:
                entry = self._entry()
                entries.append(entry)
            entry["taken"] = True
            return entry

    def _done(self, session: str, entry: dict) -> None:
        with self._lock:
            left = [e for e in self.runs.get(session, []) if e is not entry]
            if left:
                self.runs[session] = left
            else:
                self.runs.pop(session, None)

    def controls_json(self, use_json: bool, text: str, selected: list[str], *values: Any) -> tuple:
        """(the JSON shown, its message, the JSON to run): from the controls, or the edited JSON."""
        from diffaccel.config import config_dict

        from .controls import configs_from_controls

        if use_json:  # the run reports what is wrong with it, as the message here does
            return text, self.validate(text)[0], text
        try:
            configs = configs_from_controls(selected, self.controls, list(values))
        except DemoError as e:
            return text, f"Error: {e}", f"Error: {e}"  # the run shows the controls' message
        data = json.dumps(config_dict(configs), indent=2)
        return data, f"Valid: {', '.join(c.name for c in configs)}", data

    def validate(self, text: str) -> tuple[str, bool]:
        try:
            req = request_from(self.default_model, text or "")
        except DemoError as e:
            return f"Error: {e}", False
        return f"Valid: {', '.join(m.name for m in req.methods)}", True

    def run(self, model: str, config_json: str, prompt: str, negative: str, seed: float, steps: float, size: float,
            guidance: float, frames: float = 0, request: Any = None, progress: Any = None) -> tuple:
        """The API's one call: (status, baseline image, accelerated image, figures as text, figures as
        JSON, heatmap, code, config file). Video pipelines: `frames` (0: the pipeline's default), shown
        as a grid of frames."""
        session = self._session(request)
        entry = self._take(session)
        cancel = entry["flag"]
        try:
            if not config_json or config_json.startswith("Error: "):
                raise DemoError(config_json[len("Error: "):] if config_json else "no acceleration given")
            if model in REFERENCE:  # loaded on first use (a loaded one is returned as it is)
                self.engine.load(model)
            for name, value, low, high in (("seed", seed, 0, 2**31 - 1), ("steps", steps, 1, 200),
                                           ("size", size, 64, 2048), ("frames", frames, 0, 1000)):
                if not _number(value) or float(value) != int(value) or not low <= int(value) <= high:
                    raise DemoError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
            if not _number(guidance) or not 0 <= float(guidance) <= 50:
                raise DemoError(f"guidance must be a number in [0, 50], got {guidance!r}")
            req = request_from(model, config_json, prompt=prompt or "", negative_prompt=negative or "",
                               seed=int(seed), steps=int(steps), size=int(size), guidance=float(guidance),
                               frames=int(frames))

            def report(done: int, total: int, phase: str) -> None:
                if progress is not None:
                    progress((done, total), desc=f"{phase} run")

            result = self.engine.run(req, report, cancel)
        except DemoError as e:
            return _failure(f"Error: {e}", {"error": str(e)})
        except Cancelled as e:
            return _failure(f"Cancelled ({e}); the next run starts clean", {"cancelled": str(e)})
        except Exception as e:  # the pipeline refused the settings (a size it cannot make, ...): say so
            log.exception("run failed")
            return _failure(f"Error: the pipeline failed: {type(e).__name__}: {e}", {"error": f"{type(e).__name__}: {e}"})
        finally:
            self._done(session, entry)
        stats = result.stats()
        text = json.dumps(result.config, indent=2) + "\n"
        path = self.files / hashlib.sha256(text.encode()).hexdigest()[:16] / "acceleration.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        video = " (frames)" if len(result.baseline) > 1 else ""
        status = f"Done: {', '.join(stats['methods'])} on {self.engine.model(model).label}{video}"
        return (status, to_uint8(tile(result.baseline)), to_uint8(tile(result.accelerated)), _stats_markdown(stats),
                stats, result.heatmap, result.code, str(path))

    def cancel(self, request: Any = None) -> str:
        """Cancel this session's runs: a running one stops at its next step, a queued one as it starts."""
        with self._lock:
            entries = list(self.runs.get(self._session(request), []))
        for e in entries:
            e["flag"].set()
        return "cancelling…" if entries else "nothing is running"

    def load(self, spec: str) -> tuple:
        import gradio as gr

        try:
            model = self.engine.load(spec)
        except DemoError as e:
            return (gr.update(), f"Error: {e} (the pipeline in use is unchanged)", *[gr.update()] * 4)
        except Exception as e:  # a broken folder: say so, keep the page usable
            return (gr.update(), f"Error: could not load {spec}: {type(e).__name__}: {e} (the pipeline in use is "
                    "unchanged)", *[gr.update()] * 4)
        choices = list(dict.fromkeys([*REFERENCE, *self.engine.models]))
        return (gr.update(choices=choices, value=model.key), f"Loaded {model.title}",
                model.size, model.steps, model.guidance, gr.update(visible=model.video))

    def select_model(self, key: str) -> tuple:
        import gradio as gr

        try:
            model = self.engine.load(key)
        except DemoError as e:
            return f"Error: {e}", *[gr.update()] * 4
        return (model.title, model.size, model.steps, model.guidance,
                gr.update(visible=model.video))

    # -- the page ----------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        from diffaccel import available_methods

        from .controls import build_method_controls

        model = self.engine.load(self.default_model)
        # images the page served are deleted after an hour, checked hourly: a long-running demo stays bounded
        with gr.Blocks(title="diffaccel demo", delete_cache=(3600, 3600)) as page:
            gr.Markdown(INTRO)
            with gr.Row():
                with gr.Column(scale=2, min_width=360):
                    model_dd = gr.Dropdown(choices=list(dict.fromkeys([*REFERENCE, *self.engine.models])),
                                           value=model.key, label="Pipeline", elem_id="model",
                                           info="the embedded reference models, or one you loaded below")
                    model_msg = gr.Markdown(model.title, elem_id="model-msg")
                    with gr.Row():
                        path = gr.Textbox(label="Load a local folder or hub id", scale=3, elem_id="load-path",
                                          placeholder="/path/to/pipeline (safetensors weights)")
                        load_btn = gr.Button("Load", scale=1, elem_id="load")
                    methods = gr.CheckboxGroup(choices=available_methods(), value=METHODS_DEFAULT, label="Methods",
                                               info="one, or several to compose", elem_id="methods")
                    groups, self.controls = build_method_controls(gr, METHODS_DEFAULT)
                    prompt = gr.Textbox(label="Prompt", value="a large red circle at the top left and a small blue "
                                        "square at the bottom right on a white background", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                        steps = gr.Slider(1, 100, value=model.steps, step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        size = gr.Slider(64, 1024, value=model.size, step=64, label="Size (px)", elem_id="size")
                        guidance = gr.Slider(1.0, 15.0, value=model.guidance, step=0.5, label="Guidance",
                                             elem_id="guidance")
                    frames = gr.Slider(0, 200, value=0, step=1, label="Frames (video pipelines; 0: the pipeline's "
                                       "default)", visible=model.video, elem_id="frames")
                    with gr.Accordion("Advanced: the acceleration as JSON", open=False, elem_id="advanced"):
                        use_json = gr.Checkbox(label="Run with this JSON instead of the controls", value=False,
                                               elem_id="use-json")
                        config_code = gr.Code(language="json", label="Acceleration (diffaccel.save_config format)",
                                              interactive=True, elem_id="config-json", lines=10)
                        config_msg = gr.Markdown(elem_id="config-msg")
                    with gr.Row():
                        run_btn = gr.Button("Run", variant="primary", elem_id="run")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    cancel_msg = gr.Markdown(elem_id="cancel-msg")
                with gr.Column(scale=3):
                    status = gr.Markdown(elem_id="status")
                    with gr.Row():
                        base_img = gr.Image(label="Baseline (no acceleration)", format="png", elem_id="baseline",
                                            interactive=False)
                        acc_img = gr.Image(label="Accelerated", format="png", elem_id="accelerated",
                                           interactive=False)
                    stats_md = gr.Markdown(elem_id="stats")
                    heatmap = gr.Image(label="What the policy did (steps × sites)", format="png",
                                       elem_id="heatmap", interactive=False, show_label=False)
                    code = gr.Code(language="python", label="Copy as code", elem_id="code", interactive=False)
                    download = gr.DownloadButton("Download config", elem_id="download")
                    with gr.Accordion("Figures as JSON", open=False):
                        stats_json = gr.JSON(elem_id="stats-json")
            config_state = gr.Textbox(visible=False, elem_id="config-state")  # the JSON a run uses (an API input)

            methods.change(lambda sel: [gr.update(visible=n in sel) for n in groups], methods, list(groups.values()),
                           api_visibility="private", queue=False)
            control_inputs = [use_json, config_code, methods, *(c.component for c in self.controls)]
            gr.on([methods.change, *(c.component.change for c in self.controls)],
                  self._controls_to_json, control_inputs, [config_code, config_msg], api_visibility="private",
                  queue=False)
            config_code.input(lambda text: self.validate(text)[0], config_code, config_msg,
                              api_visibility="private", queue=False)
            page.load(self._controls_to_json, control_inputs, [config_code, config_msg], api_visibility="private",
                      queue=False)
            model_dd.change(self.select_model, model_dd, [model_msg, size, steps, guidance, frames],
                            api_visibility="private")
            load_btn.click(self.load, path, [model_dd, model_msg, size, steps, guidance, frames], api_name="load")

            def run(model, config_json, prompt, negative, seed, steps, size, guidance, frames, request: gr.Request,
                    progress=gr.Progress()):  # noqa: B008 - how Gradio asks for progress
                return self.run(model, config_json, prompt, negative, seed, steps, size, guidance, frames, request,
                                progress)

            def ask(request: gr.Request):
                self.ask(request)

            run_btn.click(ask, None, None, api_visibility="private", queue=False)  # Cancel reaches it in the queue
            run_btn.click(self.controls_json, control_inputs, [config_code, config_msg, config_state],
                          api_visibility="private", queue=False).then(
                run, [model_dd, config_state, prompt, negative, seed, steps, size, guidance, frames],
                [status, base_img, acc_img, stats_md, stats_json, heatmap, code, download],
                api_name="run", concurrency_limit=self.engine.workers, concurrency_id="run")

            def cancel(request: gr.Request):
                return self.cancel(request)

            cancel_btn.click(cancel, None, cancel_msg, api_name="cancel", queue=False)
        return page

    def _controls_to_json(self, use_json, text, selected, *values):
        if use_json:
            return text, self.validate(text)[0]
        shown, message, _ = self.controls_json(False, text, selected, *values)
        return shown, message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffaccel demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="dit", help="dit or unet (the embedded reference pipelines), a local folder "
                   "or a hub id (safetensors weights only; no remote code)")
    p.add_argument("--share-host", action="store_true", help="listen on every address (0.0.0.0), not only 127.0.0.1")
    p.add_argument("--host", default=None, help="listen on this address (default 127.0.0.1)")
    p.add_argument("--workers", type=int, default=2, help="runs served at once; each holds its own copy of every "
                   "loaded pipeline (default 2)")
    p.add_argument("--baseline-cache", type=int, default=16, help="baselines kept for reuse (default 16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--allow-downloads", action="store_true", help="let a hub id download weights (off by default: "
                   "hub ids load from the local cache only)")
    p.add_argument("--max-models", type=int, default=4, help="pipelines held at once, the reference ones included "
                   "(default 4). The Load box reads this machine's folders: share the page (--share-host) only with "
                   "people you would let do that")
    return p.parse_args(argv)


def host_of(args: argparse.Namespace) -> str:
    """127.0.0.1 unless --host or --share-host says otherwise."""
    return args.host or ("0.0.0.0" if args.share_host else "127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    host = host_of(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(workers=args.workers, baseline_cache=args.baseline_cache, device=device,
                    allow_downloads=args.allow_downloads, max_models=args.max_models)
    try:
        page = App(engine, args.model).build()
    except DemoError as e:
        raise SystemExit(f"diffaccel demo: {e}") from None
    page.queue(default_concurrency_limit=args.workers)
    print(f"diffaccel demo on http://{host}:{args.port} (pid {os.getpid()})", flush=True)
    page.launch(server_name=host, server_port=args.port, ssr_mode=False, show_error=False, quiet=True,
                footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
