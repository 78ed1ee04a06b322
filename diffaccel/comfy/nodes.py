"""The ComfyUI nodes, generated from the method registry: one node per registered method, whose inputs
are the config's declared options (`MethodConfig.options()`: type, range, default, doc as tooltip),
plus a Policy node, a node that loads a saved acceleration config, and a report node. A method added
to the registry gets its node without this file changing."""

from __future__ import annotations

import json
from typing import Any

from ..config import configs_from_dict, load_config
from ..methods.base import MethodConfig, Option, available_methods, method_class, method_summary
from ..methods.base import option_label as label
from ..policy import Policy
from . import sampling

CATEGORY = "diffaccel"
POLICY = "DIFFACCEL_POLICY"
INT_MAX = 2**63 - 1


def _tooltip(opt: Option) -> str:
    text = opt.doc
    if opt.kind == "number_or_choice":
        text += f" A number in [{opt.low:g}, {opt.high:g}], or {' / '.join(map(str, opt.choices))}."
    return text


def input_spec(opt: Option) -> tuple:
    """ComfyUI's input declaration of one option."""
    tip = {"tooltip": _tooltip(opt)}
    if opt.kind == "bool":
        return ("BOOLEAN", {"default": bool(opt.default), **tip})
    if opt.kind == "choice":
        return ([label(c) for c in opt.choices], {"default": label(opt.default), **tip})
    if opt.kind == "int":
        return ("INT", {"default": int(opt.default), "min": int(opt.low), "max": int(min(opt.high, INT_MAX)),
                        "step": 1, **tip})
    if opt.kind == "float":
        return ("FLOAT", {"default": float(opt.default), "min": float(opt.low), "max": float(opt.high),
                          "step": 0.01, "round": False, **tip})
    default = opt.default if isinstance(opt.default, str) else json.dumps(opt.default)
    return ("STRING", {"default": default, "multiline": False, **tip})


def decode(method: str, opt: Option, raw: Any) -> Any:
    """The config value of what a ComfyUI input holds (the config checks it against its bounds)."""
    if opt.kind == "choice":
        for c in opt.choices:
            if raw == label(c) or (not isinstance(raw, str) and raw == c and not isinstance(raw, bool)):
                return c
        raise ValueError(f"{method}.{opt.name} must be one of {[label(c) for c in opt.choices]}, got {raw!r}")
    if opt.kind in ("json", "number_or_choice") and isinstance(raw, str):
        text = raw.strip()
        if opt.kind == "number_or_choice" and text in map(str, opt.choices or ()):
            return next(c for c in opt.choices if str(c) == text)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            allowed = f"a number or {' / '.join(map(str, opt.choices))}" if opt.kind == "number_or_choice" else "JSON"
            raise ValueError(f"{method}.{opt.name} must be {allowed}, got {raw!r}") from None
    return raw


def config_from_inputs(name: str, values: dict, policy: Policy | None = None) -> MethodConfig:
    """The config a method node's inputs describe. Every field is given, as in a saved config, so the
    cost model setting means what its input says."""
    cls = method_class(name)
    fields = {o.name: cls.decode(o.name, decode(name, o, values[o.name])) for o in cls.options() if o.name in values}
    unknown = sorted(set(values) - {o.name for o in cls.options()})
    if unknown:
        raise ValueError(f"{name} has no option {unknown[0]!r}; allowed: {[o.name for o in cls.options()]}")
    return cls(**fields, policy=policy)


def node_id(name: str) -> str:
    return "DiffAccel" + method_class(name).__name__.removesuffix("Config")


def method_node(name: str) -> type:
    """The node class of one registered method."""
    cls = method_class(name)
    options = cls.options()
    title = cls.__name__.removesuffix("Config")

    class MethodNode:
        CATEGORY = globals()["CATEGORY"]
        RETURN_TYPES = ("MODEL",)
        RETURN_NAMES = ("model",)
        OUTPUT_TOOLTIPS = (f"A clone of the model that samples with {title}; the input model is unchanged.",)
        FUNCTION = "apply"
        DESCRIPTION = (f"{method_summary(name)} Same method, options and policy format as "
                       f"accelerate_pipeline(pipe, {name!r}) in diffaccel's Python API.")

        @classmethod
        def INPUT_TYPES(cls_):  # noqa: N802 (ComfyUI's name)
            required = {"model": ("MODEL", {"tooltip": "The model to accelerate (it is cloned, not changed)."})}
            required.update({o.name: input_spec(o) for o in options})
            return {"required": required,
                    "optional": {"policy": (POLICY, {"tooltip": "A policy from a 'diffaccel Policy' node: what "
                                                     "acts at each step and site, in place of the paper's "
                                                     "schedule."})}}

        def apply(self, model: Any, policy: Policy | None = None, **values: Any) -> tuple:
            return (sampling.accelerate(model, [config_from_inputs(name, values, policy)]),)

    MethodNode.__name__ = MethodNode.__qualname__ = node_id(name)
    MethodNode.method = name
    return MethodNode


class PolicyNode:
    """A policy in the core's JSON format, for any method node's `policy` input."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (POLICY,)
    RETURN_NAMES = ("policy",)
    FUNCTION = "build"
    DESCRIPTION = ("A diffaccel policy (the JSON that Policy.to_json() writes): rules of site selectors, step "
                   "windows and schedules. Connect it to a method node's policy input.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        example = Policy(()).to_json()
        return {"required": {"policy_json": ("STRING", {"default": example, "multiline": True,
                                                        "tooltip": "The policy as JSON (Policy.to_json())."})}}

    def build(self, policy_json: str) -> tuple:
        return (Policy.from_json(policy_json),)  # (a clear ValueError for malformed JSON or rules)


class LoadConfigNode:
    """A saved acceleration (diffaccel.save_config's JSON file, or its text) applied to a model."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Apply an acceleration saved with diffaccel.save_config (or by the demo or the CLI): every "
                   "method with its settings and policy, as in the Python API.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to accelerate (it is cloned, not changed)."}),
            "config_path": ("STRING", {"default": "acceleration.json", "tooltip": "Path of the saved JSON file "
                                       "(ignored when config_json is given)."}),
        }, "optional": {
            "config_json": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "The file's content itself, instead of a path."}),
        }}

    def apply(self, model: Any, config_path: str, config_json: str = "") -> tuple:
        if config_json.strip():
            try:
                configs = configs_from_dict(json.loads(config_json))
            except json.JSONDecodeError as e:
                raise ValueError(f"config_json is not valid JSON: {e}") from None
        else:
            configs = load_config(config_path)
        return (sampling.accelerate(model, configs),)


class ReportNode:
    """What the acceleration did at each site in the model's last sampling (the core's describe())."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    OUTPUT_NODE = True
    DESCRIPTION = ("Shows what acted where: the sites, each method's plan per step, and the tokens each site "
                   "computed in the last sampling. Connect the sampler's LATENT so it runs after sampling.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"model": ("MODEL", {"tooltip": "The accelerated model the sampler used."})},
                "optional": {"latent": ("LATENT", {"tooltip": "The sampler's output: makes this node run after "
                                                   "that sampling."})}}

    def report(self, model: Any, latent: Any = None) -> dict:
        held = sampling.acceleration_of(model)
        text = held.report if held is not None and held.report else sampling.plan_report(model)
        return {"ui": {"text": [text]}, "result": (text,)}


def build() -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS, from the registry."""
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    for name in available_methods():
        node = method_node(name)
        classes[node.__name__] = node
        names[node.__name__] = f"Accelerate: {method_class(name).__name__.removesuffix('Config')} (diffaccel)"
    for node_cls, title in ((PolicyNode, "diffaccel Policy"), (LoadConfigNode, "Load acceleration config (diffaccel)"),
                            (ReportNode, "Acceleration report (diffaccel)")):
        key = "DiffAccel" + node_cls.__name__.removesuffix("Node")
        classes[key] = node_cls
        names[key] = title
    return classes, names
