"""The demo's method controls, generated from the method registry and each config's declared options
(`MethodConfig.options()`: type, range, default, doc): a method added to the registry gets its
controls here without this file changing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from diffaccel import available_methods
from diffaccel.methods.base import MethodConfig, Option, method_class, method_summary, option_label

from .engine import DemoError

SLIDER_SPAN = 100  # a bounded number gets a slider when its range is at most this wide; else a number box


def _info(opt: Option) -> str:
    extra = ""
    if opt.kind in ("float", "int", "number_or_choice") and opt.low is not None:
        extra = f" Range [{opt.low:g}, {opt.high:g}]"
        extra += f", or {' / '.join(map(str, opt.choices))}." if opt.kind == "number_or_choice" else "."
    return opt.doc + extra


@dataclass
class Control:
    method: str
    option: Option
    component: Any

    def value_of(self, raw: Any) -> Any:
        """The config value of what the component holds."""
        o = self.option
        if o.kind == "choice":
            return json.loads(raw) if isinstance(raw, str) else raw
        if o.kind == "bool":
            return bool(raw)
        if o.kind == "int":
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return raw
        if o.kind == "float":
            return float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else raw
        text = str(raw).strip()
        if o.kind == "number_or_choice" and text in map(str, o.choices or ()):
            return next(c for c in o.choices if str(c) == text)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if o.kind == "number_or_choice":
                return text  # the config names what is allowed
            raise DemoError(f"{self.method}.{o.name} is not valid JSON: {text!r}") from None


def component_for(gr: Any, opt: Option, method: str) -> Any:
    """The Gradio input of one option."""
    common = dict(label=opt.name, info=_info(opt), elem_id=f"opt-{method}-{opt.name}")
    if opt.kind == "bool":
        return gr.Checkbox(value=bool(opt.default), **common)
    if opt.kind == "choice":
        return gr.Dropdown(choices=[(option_label(c), json.dumps(c)) for c in opt.choices], value=json.dumps(opt.default),
                           **common)
    if opt.kind in ("float", "int"):
        span = (opt.high - opt.low) if opt.low is not None and opt.high is not None else math.inf
        if span <= SLIDER_SPAN:
            step = 1 if opt.kind == "int" else 0.01  # fine enough for every default and paper setting
            return gr.Slider(minimum=opt.low, maximum=opt.high, step=step, value=opt.default, **common)
        return gr.Number(value=opt.default, precision=0 if opt.kind == "int" else None, **common)
    return gr.Textbox(value=opt.default if isinstance(opt.default, str) else json.dumps(opt.default), **common)


def build_method_controls(gr: Any, selected: list[str]) -> tuple[dict[str, Any], list[Control]]:
    """A group per registered method (visible when selected): its main knobs, then the rest folded.
    Returns {method: group} and every control in order."""
    groups: dict[str, Any] = {}
    controls: list[Control] = []
    for name in available_methods():
        options = method_class(name).options()
        with gr.Group(visible=name in selected, elem_id=f"method-{name}") as group:
            gr.Markdown(f"**{name}** · {method_summary(name)}")
            for opt in (o for o in options if o.main):
                controls.append(Control(name, opt, component_for(gr, opt, name)))
            rest = [o for o in options if not o.main]
            if rest:
                with gr.Accordion(f"more {name} options", open=False):
                    for opt in rest:
                        controls.append(Control(name, opt, component_for(gr, opt, name)))
        groups[name] = group
    return groups, controls


def configs_from_controls(selected: list[str], controls: list[Control], values: list[Any]) -> list[MethodConfig]:
    """The configs the controls describe, for the selected methods, in registry order. Every field is
    given, as in a saved config, so the cost model setting means what its control says."""
    if not selected:
        raise DemoError("choose at least one method")
    unknown = [n for n in selected if n not in available_methods()]
    if unknown:
        raise DemoError(f"unknown method {unknown[0]!r}; available: {available_methods()}")
    configs = []
    for name in available_methods():
        if name not in selected:
            continue
        fields = {c.option.name: c.value_of(v) for c, v in zip(controls, values) if c.method == name}
        try:
            configs.append(MethodConfig.from_dict({"method": name, **fields}))
        except (TypeError, ValueError) as e:
            raise DemoError(str(e)) from None
    return configs
