"""A whole acceleration as data: the methods with their settings and policies, in one versioned JSON
format that the API, the CLI, the demo and the ComfyUI nodes all read and write.

    diffaccel.save_config("acceleration.json", ["todo", ToCaConfig(interval=4)])
    pipe = accelerate_pipeline(pipe, diffaccel.load_config("acceleration.json"))

The file:

    {"format": "diffaccel.acceleration", "version": 1,
     "methods": [{"method": "todo", "factor": 2.0, ...}, {"method": "toca", ..., "policy": {...}}]}

Each method is its config's `to_dict()` (a policy only where one was given), so loading a saved file
gives configs equal to those saved, and the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .api import resolve_methods
from .methods.base import MethodConfig, _default

FORMAT = "diffaccel.acceleration"
VERSION = 1


def config_dict(methods: Any, **overrides: Any) -> dict:
    """The acceleration file's content for a method spec (a name, a config, a dict, or a list of them,
    with keyword overrides, as `accelerate_pipeline` takes them)."""
    configs = resolve_methods(methods, overrides)
    return {"format": FORMAT, "version": VERSION, "methods": [c.to_dict() for c in configs]}


def configs_from_dict(data: Any) -> list[MethodConfig]:
    """The method configs an acceleration file's content describes; a clear error otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"an acceleration config is a JSON object with keys 'format', 'version' and 'methods', "
                         f"got {type(data).__name__}")
    unknown = set(data) - {"format", "version", "methods"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in an acceleration config; allowed: "
                         f"['format', 'version', 'methods']")
    if data.get("format") != FORMAT:
        raise ValueError(f"not a diffaccel acceleration config: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"an acceleration config's 'version' is a positive int, got {version!r}")
    if version > VERSION:
        raise ValueError(f"this acceleration config has version {version}; this diffaccel reads versions up to "
                         f"{VERSION}: upgrade diffaccel")
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"an acceleration config's 'methods' is a non-empty list of method dicts, got {methods!r}")
    configs = [MethodConfig.from_dict(m) for m in methods]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may be given once, got {names}")
    return configs


def save_config(path: str | os.PathLike, methods: Any, **overrides: Any) -> Path:
    """Write the acceleration (a method spec, as `accelerate_pipeline` takes it) as a JSON file; returns
    the path. Nothing is written when the spec is invalid."""
    text = json.dumps(config_dict(methods, **overrides), indent=2) + "\n"
    path = Path(path)
    path.write_text(text)
    return path


def load_config(path: str | os.PathLike) -> list[MethodConfig]:
    """The method configs saved in an acceleration file, ready for `accelerate_pipeline(pipe, ...)`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return configs_from_dict(data)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from None


def config_code(methods: Any, **overrides: Any) -> str:
    """The Python expression that makes these method configs, shortest first: `ToCaConfig(interval=4)`
    with only the fields that differ from the defaults, and `cost_model` only where a call without it
    would not give an equal config (e.g. a strength given alongside cost_model=None). Each
    expression is checked against the config it stands for; the imports it needs come first.

        >>> print(config_code(["todo", ToCaConfig(interval=4)]))
        from diffaccel.methods.todo import ToDoConfig
        from diffaccel.methods.toca import ToCaConfig
        [ToDoConfig(), ToCaConfig(interval=4)]
    """
    configs = resolve_methods(methods, overrides)
    imports, exprs = [], []
    for c in configs:
        cls = type(c)
        data = c.to_dict()
        data.pop("method")
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        changed = {k: v for k, v in data.items() if k == "policy" or v != defaults.get(k)}
        # the cost model setting follows from a given strength (see `register`): spelled out only if needed
        bare = {k: v for k, v in changed.items() if k != "cost_model"}
        candidates = [bare, {**bare, "cost_model": data["cost_model"]}] if "cost_model" in data else [changed]
        for kwargs in (*candidates, data):
            if cls(**kwargs) == c:
                break
        else:
            raise ValueError(f"{c!r} cannot be written as a call of {cls.__name__}: no keyword call gives an equal "
                             "config")
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        imports.append(f"from {cls.__module__} import {cls.__name__}")
        exprs.append(f"{cls.__name__}({args})")
    body = exprs[0] if len(exprs) == 1 else "[" + ", ".join(exprs) + "]"
    return "\n".join(dict.fromkeys(imports)) + "\n" + body
