"""The ComfyUI node package without ComfyUI: importing it needs no ComfyUI, and its nodes are generated
from the registry. (The nodes run inside a real ComfyUI core in tests_comfy/, in .venv-comfy.)"""

import sys

import pytest

import diffaccel
from diffaccel.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from diffaccel.comfy.nodes import config_from_inputs, input_spec, node_id
from diffaccel.methods.base import available_methods, method_class


def defaults(name):
    required = NODE_CLASS_MAPPINGS[node_id(name)].INPUT_TYPES()["required"]
    return {k: spec[1]["default"] for k, spec in required.items() if k != "model"}


def test_importing_the_nodes_needs_no_comfyui():
    assert "comfy" not in sys.modules and "nodes" not in sys.modules
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert {node_id(n) for n in available_methods()} | {"DiffAccelPolicy", "DiffAccelLoadConfig",
                                                          "DiffAccelReport"} == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", available_methods())
def test_node_defaults_are_the_config_defaults_and_values_round_trip(name):
    cls = method_class(name)
    assert config_from_inputs(name, defaults(name)) == cls()
    for opt in cls.options():
        kind, spec = input_spec(opt)
        assert spec["tooltip"].startswith(opt.doc)
        if opt.kind in ("int", "float"):
            assert (spec["min"], spec["max"]) == (opt.low, opt.high)


def test_node_values_become_config_values():
    config = config_from_inputs("todo", {**defaults("todo"), "factor": "auto", "cost_model": "off",
                                         "max_downsample": "2", "level_factors": '{"1": 1.5}'})
    assert config == diffaccel.ToDoConfig(factor="auto", cost_model=False, max_downsample=2, level_factors={1: 1.5})
    assert config_from_inputs("tome", {**defaults("tome"), "cost_model": "auto"}).cost_model is None
    with pytest.raises(ValueError, match=r"todo.factor must be a number or auto, got 'x'"):
        config_from_inputs("todo", {**defaults("todo"), "factor": "x"})
    with pytest.raises(ValueError, match=r"tome.metric must be one of \['block', 'hidden'\]"):
        config_from_inputs("tome", {**defaults("tome"), "metric": "keys"})
    with pytest.raises(ValueError, match="has no option 'strength'"):
        config_from_inputs("fora", {"strength": 1})
