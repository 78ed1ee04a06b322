"""What the demo does, without the page: load pipelines, run the baseline and the accelerated
pipeline on the same seed, measure them, and draw what the policy did. The page (`app.py`) and its
API call `Engine.run`; the tests call it directly too.

Each loaded pipeline has `workers` replicas (deep copies), so concurrent requests each patch a
pipeline of their own: no method state, hook or cache is shared between requests. A replica is
always handed back unaccelerated.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaccel import accelerate_pipeline, describe, is_accelerated, remove_acceleration
from diffaccel.api import _denoisers as denoisers_of
from diffaccel.config import config_code, config_dict, configs_from_dict
from diffaccel.methods.base import MethodConfig
from diffaccel.pipelines import UnsupportedModelError, adapter_for

log = logging.getLogger("diffaccel.demo")
REFERENCE = {"dit": "reference DiT (PixArt-style, trained here)", "unet": "reference U-Net (SD-style, trained here)"}


class DemoError(Exception):
    """A problem with the user's input, shown in the page as it is."""


class Cancelled(Exception):
    """The run was cancelled by its user."""


@dataclass
class Model:
    key: str
    label: str
    source: str  # the code that loads it
    replicas: queue.Queue
    size: int
    steps: int
    guidance: float
    video: bool
    families: list[str]
    pristine: Any = None  # a copy never accelerated, to replace a replica that could not be cleaned
    clean_caption: bool = False  # whether its call takes clean_caption (the demo passes False)


    @property
    def title(self) -> str:
        """What the page says of the pipeline: its label and families."""
        return f"{self.label} ({', '.join(self.families)})"


@dataclass
class Request:
    model: str
    methods: list[MethodConfig]
    prompt: str = "a large red circle at the top left and a small blue square at the bottom right"
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    size: int = 256
    guidance: float = 4.5
    frames: int = 0  # video pipelines: frames to make (0: the pipeline's default)

    def baseline_key(self) -> tuple:
        return (self.model, self.prompt, self.negative_prompt, self.seed, self.steps, self.size, self.guidance,
                self.frames)


@dataclass
class Result:
    baseline: np.ndarray  # (N, H, W, 3) float in [0, 1]: images, or a video's frames
    accelerated: np.ndarray
    baseline_seconds: float
    accelerated_seconds: float
    baseline_cached: bool
    psnr: float  # inf when identical
    ssim: float
    description: dict
    config: dict  # the acceleration as the JSON format the core saves
    code: str
    heatmap: Any = None  # PIL image
    heatmap_rows: list = field(default_factory=list)
    alongside: int = 0  # the most other runs that ran in this process while this one did

    @property
    def speedup(self) -> float:
        return self.baseline_seconds / self.accelerated_seconds

    def stats(self) -> dict:
        """JSON-ready figures (PSNR None when the outputs are identical)."""
        return dict(baseline_seconds=round(self.baseline_seconds, 4),
                    accelerated_seconds=round(self.accelerated_seconds, 4), speedup=round(self.speedup, 4),
                    psnr=None if not np.isfinite(self.psnr) else round(self.psnr, 3), identical=not np.isfinite(self.psnr),
                    ssim=round(self.ssim, 5), baseline_cached=self.baseline_cached,
                    baseline_sha256=digest(self.baseline), accelerated_sha256=digest(self.accelerated),
                    methods=[m["method"] for m in self.config["methods"]], alongside=self.alongside)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def digest(images: np.ndarray) -> str:
    """A hash of the 8-bit pixels, as the page shows them."""
    return hashlib.sha256(to_uint8(images).tobytes()).hexdigest()


def fidelity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of the images (or frames) of b against a, pixel values in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(a, b):
        return float("inf"), 1.0
    psnr = [peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)]
    ssim = [structural_similarity(x, y, data_range=1.0, channel_axis=-1) for x, y in zip(a, b)]
    return float(np.mean(psnr)), float(np.mean(ssim))


# -- loading ---------------------------------------------------------------------------------------


def load_pipeline(spec: str, device: str = "cpu", allow_downloads: bool = False) -> tuple[Any, str, str, list[str]]:
    """(pipeline, label, the code that loads it, its denoisers' families) for "dit", "unet", a local
    folder or a hub id (from the local cache unless `allow_downloads`). Weights load as safetensors
    only, and never with remote code; an unsupported model raises DemoError."""
    spec = (spec or "").strip()
    if not spec:
        raise DemoError("give a pipeline: 'dit', 'unet', a local folder or a hub id")
    if spec in REFERENCE:
        from diffaccel import load_reference_pipeline

        pipe = load_reference_pipeline(spec)
        label, code = REFERENCE[spec], f"pipe = load_reference_pipeline({spec!r})"
    else:
        from diffusers import DiffusionPipeline

        path = Path(spec).expanduser()
        looks_local = path.is_absolute() or spec.startswith((".", "~")) or path.exists() or spec.count("/") > 1
        if looks_local and not path.is_dir():
            raise DemoError(f"no such folder: {spec}")
        if looks_local and not (path / "model_index.json").exists():
            raise DemoError(f"{spec} is not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else spec, use_safetensors=True,
                                                     trust_remote_code=False,
                                                     local_files_only=looks_local or not allow_downloads)
        except Exception as e:  # the loader's own message names what is missing
            raise DemoError(f"could not load {spec}: {type(e).__name__}: {e}") from None
        label = f"{type(pipe).__name__} from {spec}"
        code = f"pipe = DiffusionPipeline.from_pretrained({str(path) if looks_local else spec!r}, use_safetensors=True)"
    try:
        families = [adapter_for(d).variant() for _, d in denoisers_of(pipe)[0]]
    except UnsupportedModelError as e:
        raise DemoError(str(e)) from None
    if device != "cpu":
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe, label, code, families


def _defaults(pipe: Any, spec: str) -> tuple[int, int, float]:
    if spec in REFERENCE:
        return 256, 20, 4.5
    scale = getattr(pipe, "vae_scale_factor", 8) or 8
    den = denoisers_of(pipe)[0][0][1]
    sample = getattr(den.config, "sample_size", None)
    size = int(sample * scale) if isinstance(sample, int) else 512
    return max(64, min(size, 1024)), 20, 5.0


# -- running ---------------------------------------------------------------------------------------


class Engine:
    """Loaded pipelines, their replicas, and the bounded cache of baseline outputs."""

    def __init__(self, workers: int = 2, baseline_cache: int = 16, device: str = "cpu", allow_downloads: bool = False,
                 max_models: int = 4, baseline_bytes: int = 2 << 30):
        self.workers = max(1, int(workers))
        self.device = device
        self.allow_downloads = allow_downloads
        self.max_models = max_models
        self.baseline_bytes = baseline_bytes
        self.models: dict[str, Model] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._baselines: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self.baseline_cache = baseline_cache
        self._active: list[dict] = []  # the runs under way, each with the most runs it saw at once

    # models
    def load(self, spec: str) -> Model:
        """Load a pipeline (or return it if loaded). A failed load raises DemoError and changes nothing."""
        spec = (spec or "").strip()
        with self._loading:
            if spec in self.models:
                return self.models[spec]
            if len(self.models) >= self.max_models:
                raise DemoError(f"{len(self.models)} pipelines are loaded, the most this demo holds "
                                f"(--max-models): {sorted(self.models)}")
            pipe, label, code, families = load_pipeline(spec, self.device, self.allow_downloads)
            replicas: queue.Queue = queue.Queue()
            for i in range(self.workers):
                replicas.put(pipe if i == 0 else copy.deepcopy(pipe))
            pristine = copy.deepcopy(pipe)
            size, steps, guidance = _defaults(pipe, spec)
            params = inspect.signature(pipe.__call__).parameters
            video = "num_frames" in params
            model = Model(spec, label, code, replicas, size, steps, guidance, video, families, pristine,
                          "clean_caption" in params)
            warm = Request(spec, [], steps=2, size=min(size, 128), guidance=guidance, frames=1 if video else 0)
            for replica in list(replicas.queue):  # one-off costs stay out of the first timed run
                try:
                    self._generate(replica, warm, None)
                except Exception:  # a pipeline that refuses the small warm-up shape: its first run warms it
                    break
            with self._lock:
                self.models[spec] = model
            return model

    def model(self, key: str) -> Model:
        m = self.models.get(key)
        if m is None:
            raise DemoError(f"pipeline {key!r} is not loaded; loaded: {sorted(self.models)}")
        return m

    # the baseline cache
    def _cached(self, key: tuple) -> tuple[np.ndarray, float] | None:
        with self._lock:
            hit = self._baselines.get(key)
            if hit is not None:
                self._baselines.move_to_end(key)
            return hit

    def _store(self, key: tuple, value: tuple[np.ndarray, float]) -> None:
        with self._lock:
            self._baselines[key] = value
            self._baselines.move_to_end(key)
            while len(self._baselines) > self.baseline_cache or (
                    len(self._baselines) > 1 and sum(v[0].nbytes for v in self._baselines.values()) > self.baseline_bytes):
                self._baselines.popitem(last=False)

    def cached_baselines(self) -> int:
        return len(self._baselines)

    # a run
    def run(self, req: Request, progress: Callable[[int, int, str], None] | None = None,
            cancel: threading.Event | None = None) -> Result:
        """The baseline (from the cache when this pipeline, prompt, seed, size and steps ran before)
        and the accelerated output on the same seed, timed, compared and described."""
        model = self.model(req.model)
        if not req.methods:
            raise DemoError("choose at least one method")
        config = config_dict(req.methods)  # validates: raises before anything runs
        cached = self._cached(req.baseline_key())
        total = req.steps * (1 if cached else 2)
        done = [0]

        def on_step(phase: str):
            def callback(pipe, i, t, kwargs):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled at step {i + 1} of the {phase} run")
                done[0] += 1
                if progress is not None:
                    progress(done[0], total, phase)
                return kwargs
            return callback

        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        pipe = self._checkout(model, cancel)
        mine = {"peak": 0}
        with self._lock:
            self._active.append(mine)
            for run in self._active:
                run["peak"] = max(run["peak"], len(self._active) - 1)
        try:
            if cached is None:
                base, t_base = self._generate(pipe, req, on_step("baseline"))
                self._store(req.baseline_key(), (base, t_base))
            else:
                base, t_base = cached
            try:
                accelerate_pipeline(pipe, req.methods)
            except (TypeError, ValueError, UnsupportedModelError) as e:  # e.g. two methods claim one site
                raise DemoError(str(e)) from None
            out, t_acc = self._generate(pipe, req, on_step("accelerated"))
            description = describe(pipe)
        finally:
            try:
                if is_accelerated(pipe):
                    remove_acceleration(pipe)
            except Exception:  # a copy that cannot be cleaned is replaced by a fresh one
                log.exception("removing the acceleration failed; the pipeline copy is replaced")
                pipe = copy.deepcopy(model.pristine)
            finally:
                model.replicas.put(pipe)
                with self._lock:
                    self._active = [r for r in self._active if r is not mine]
        psnr, ssim = fidelity(base, out)
        code = run_code(model, req)
        result = Result(base, out, t_base, t_acc, cached is not None, psnr, ssim, dict(description), config, code,
                        alongside=mine["peak"])
        result.heatmap_rows, matrix, kv = policy_matrix(description)
        result.heatmap = draw_heatmap(result.heatmap_rows, matrix, kv, description)
        return result

    def _checkout(self, model: Model, cancel: threading.Event | None) -> Any:
        while True:
            try:
                return model.replicas.get(timeout=0.2)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while waiting for a free pipeline") from None

    def _generate(self, pipe: Any, req: Request, callback) -> tuple[np.ndarray, float]:
        params = inspect.signature(pipe.__call__).parameters
        kwargs: dict[str, Any] = dict(prompt=req.prompt, num_inference_steps=req.steps, height=req.size,
                                      width=req.size, guidance_scale=req.guidance, output_type="np",
                                      generator=torch.Generator("cpu").manual_seed(req.seed))
        if req.frames and "num_frames" in params:
            kwargs["num_frames"] = req.frames
        if req.negative_prompt and "negative_prompt" in params:
            kwargs["negative_prompt"] = req.negative_prompt
        if "clean_caption" in params:
            kwargs["clean_caption"] = False
        if callback is not None and "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = callback
        elif callback is not None and "callback" in params:  # pipelines with the older per-step callback
            kwargs.update(callback=lambda i, t, latents: callback(pipe, i, t, {}), callback_steps=1)
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(**kwargs)
        seconds = time.perf_counter() - start
        images = getattr(out, "images", None)
        if images is None:
            images = getattr(out, "frames", None)
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 5:  # videos: (batch, frames, H, W, 3) -> the frames
            images = images.reshape(-1, *images.shape[2:])
        return images, seconds


def request_from(model: str, config_json: str | dict, **kw: Any) -> Request:
    """A Request from the acceleration as the JSON format the core saves (text or parsed)."""
    try:
        data = json.loads(config_json) if isinstance(config_json, str) else config_json
    except json.JSONDecodeError as e:
        raise DemoError(f"the acceleration is not valid JSON: {e}") from None
    try:
        methods = configs_from_dict(data)
    except (TypeError, ValueError) as e:
        raise DemoError(str(e)) from None
    return Request(model=model, methods=methods, **kw)


def run_code(model: Model, req: Request) -> str:
    """Python that reproduces the run, with the acceleration spelled out."""
    head = ("from diffusers import DiffusionPipeline\n\nfrom diffaccel import accelerate_pipeline\n"
            if "DiffusionPipeline" in model.source else "from diffaccel import accelerate_pipeline, load_reference_pipeline\n")
    configs = config_code(req.methods)
    imports, expr = configs.rsplit("\n", 1)
    call = [f"    prompt={req.prompt!r}", f"num_inference_steps={req.steps}", f"height={req.size}", f"width={req.size}",
            f"guidance_scale={req.guidance}", f"generator=torch.Generator().manual_seed({req.seed})"]
    if req.negative_prompt:
        call.insert(1, f"negative_prompt={req.negative_prompt!r}")
    if req.frames and model.video:
        call.insert(2, f"num_frames={req.frames}")
    if model.clean_caption:
        call.append("clean_caption=False")  # as the demo runs it (the prompt as typed)
    return (f"import torch\n{head}{imports}\n\n{model.source}\n"
            f"pipe = accelerate_pipeline(pipe, {expr})\n"
            "# or, with the downloaded file (from diffaccel import load_config):\n"
            "# pipe = accelerate_pipeline(pipe, load_config('acceleration.json'))\n"
            "out = pipe(\n" + ",\n    ".join(call) + ",\n)\n")


# -- what the policy did ---------------------------------------------------------------------------


def policy_matrix(description: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(site names, fraction of tokens computed [sites, steps], fraction of keys/values kept) from a
    describe() of the last run; sites the methods never touched are left out (they ran in full)."""
    rows, comp, kv = [], [], []
    steps = max((int(s) + 1 for den in description["denoisers"] for r in den["sites"] for s in r["last_run"]),
                default=0)
    many = len(description["denoisers"]) > 1
    for den in description["denoisers"]:
        for r in den["sites"]:
            if not r["last_run"]:
                continue
            c = np.full(steps, np.nan)
            k = np.full(steps, np.nan)
            for s, v in r["last_run"].items():
                c[int(s)] = v["computed"] / max(1, v["tokens"])
                k[int(s)] = v["keys_values"] / max(1, v["tokens"])
            rows.append(f"{den['attr']}.{r['name']}" if many else r["name"])
            comp.append(c)
            kv.append(k)
    empty = np.zeros((0, steps))
    return rows, np.array(comp) if comp else empty, np.array(kv) if kv else empty


def draw_heatmap(rows: list[str], computed: np.ndarray, kv: np.ndarray, description: dict):
    """A PIL image: steps across, sites down, colour = fraction of tokens computed; a second panel for
    the keys/values kept where a method pooled them."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    total = sum(len(d["sites"]) for d in description["denoisers"])
    with np.errstate(invalid="ignore"):
        kv = np.where(computed > 0, kv, np.nan)  # keys/values of a call that ran
    pooled = bool(kv.size) and bool(np.nanmin(kv, initial=1.0) < 1.0 - 1e-6)
    panels = [(computed, "fraction of tokens computed\n(1 = all, 0 = output reused from the cache)")]
    if pooled:
        panels.append((kv, "fraction of keys/values kept\n(1 = all, 0.25 = pooled 2x2)"))
    height = min(9.0, 1.6 + 0.16 * max(len(rows), 4))
    fig = Figure(figsize=(5.2 * len(panels) + 1.5, height))  # no pyplot: requests draw in threads of their own
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    for ax, (data, label) in zip(axes[0], panels):
        if not rows:
            ax.text(0.5, 0.5, "no site acted in this run", ha="center", va="center")
            ax.set_axis_off()
            continue
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_xlabel("denoising step")
        every = max(1, len(rows) // 40)
        ax.set_yticks(range(0, len(rows), every))
        ax.set_yticklabels([rows[i] for i in range(0, len(rows), every)], fontsize=6)
        ax.set_xticks(range(0, data.shape[1], max(1, data.shape[1] // 10)))
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label(label, fontsize=8)
    others = f"; the other {total - len(rows)} ran in full" if total > len(rows) else ""
    fig.suptitle(f"What the policy did: {len(rows)} of {total} sites acted{others} (grey: not called at that step)",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def tile(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """One image as it is; frames of a video as a grid (at most 16 frames, evenly picked)."""
    if len(images) == 1:
        return images[0]
    if len(images) > 16:
        images = images[np.linspace(0, len(images) - 1, 16).round().astype(int)]
    n, h, w, c = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.ones((rows * h, cols * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return grid
