"""Configs as data: every registered method's config round-trips through its dict and a saved
acceleration file, compares and hashes by value, and every way of writing a setting gives the same
outputs; bad files give clear errors and leave the pipeline as it was."""

import dataclasses
import json

import pytest
import torch

import diffaccel
from diffaccel import (
    MethodConfig,
    Policy,
    Rule,
    Selector,
    ToCaConfig,
    ToMeConfig,
    accelerate_pipeline,
    is_accelerated,
    load_config,
    remove_acceleration,
    save_config,
)
from diffaccel.methods import method_class
from diffaccel.testing import snapshot

POLICY = {"tome": {"ratio": 0.3}, "todo": {"factor": 3.0}, "sito": {"ratio": 0.25}, "fora": {"interval": 4},
          "toca": {"interval": 4, "fresh_ratio": 0.2}, "duca": {"interval": 4, "fresh_ratio": 0.5},
          "taylorseer": {"interval": 4, "order": 1}}


def _configs():
    """Every registered method: its default, with a policy, with non-default fields, and the papers' presets."""
    for name in diffaccel.available_methods():
        cls = method_class(name)
        yield cls()
        yield cls(policy=Policy((Rule(Selector(kind="self_attn", depth=(0, 1)), POLICY[name]),)))
        yield cls(**cls.zero)
    yield ToCaConfig.paper("flux")
    yield ToCaConfig.paper("pixart-alpha")
    yield diffaccel.DuCaConfig.paper("pixart-alpha")
    yield diffaccel.ToDoConfig(level_factors={1: 1.5}, factor="auto", mode="avg")
    yield diffaccel.FORAConfig(interval=4, forecast="hermite", order=1, threshold=0.15)
    yield ToCaConfig(forecast="taylor", policy={"rules": [{"params": {"interval": 3, "order": 1}}]})


@pytest.mark.parametrize("cfg", list(_configs()), ids=lambda c: c.name)
def test_every_config_round_trips_compares_and_hashes(cfg, tmp_path):
    d = cfg.to_dict()
    assert d["method"] == cfg.name
    assert ("policy" in d) == (cfg.policy is not None)  # a default writes no policy
    back = MethodConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and hash(back) == hash(cfg) and type(back) is type(cfg)
    assert type(cfg).from_dict(d) == cfg
    path = save_config(tmp_path / "a.json", cfg)
    assert load_config(path) == [cfg]
    assert dataclasses.replace(cfg) == cfg
    assert len({cfg, back}) == 1


def test_configs_with_a_policy_hash_and_differ_by_value():
    a = ToMeConfig(policy={"rules": [{"params": {"ratio": 0.3}}]})
    b = ToMeConfig(policy={"rules": [{"params": {"ratio": 0.3}}]})
    c = ToMeConfig(policy={"rules": [{"params": {"ratio": 0.4}}]})
    assert a == b and hash(a) == hash(b) and a != c and len({a, b, c}) == 2
    assert ToCaConfig(kind_weights={"ff": 1.0}) != ToCaConfig()


def test_every_spelling_of_a_setting_gives_the_same_outputs(make_case, tmp_path):
    """The name with options, the config object, its dict and a saved file are one setting: the same
    config (cost_model resolved once, in the config) and bit-identical outputs."""
    save_config(tmp_path / "tome.json", "tome", ratio=0.5)
    spellings = [("tome", {"ratio": 0.5}), (ToMeConfig(ratio=0.5), {}), ({"method": "tome", "ratio": 0.5}, {}),
                 (load_config(tmp_path / "tome.json"), {})]
    outs, configs = [], []
    for method, kw in spellings:
        case = make_case("sd1")
        accelerate_pipeline(case.pipe, method, **kw)
        configs.append(diffaccel.describe(case.pipe)["methods"])
        outs.append(case.run())
    base = make_case("sd1").run()
    assert all(c == configs[0] for c in configs) and configs[0][0]["cost_model"] is False
    assert all(torch.equal(o, outs[0]) for o in outs) and not torch.equal(outs[0], base)


def test_a_default_config_stays_default_through_every_spelling(tmp_path):
    save_config(tmp_path / "d.json", ["todo", "tome"])
    for configs in (load_config(tmp_path / "d.json"), [MethodConfig.from_dict({"method": "todo"}), ToMeConfig()]):
        assert [c.cost_model for c in configs] == [None, None]
        assert all(c.uses_cost_model() for c in configs)
    # fields that are not a strength leave the decision to the cost model; a strength makes it act
    assert ToMeConfig(metric="hidden").uses_cost_model() and not ToMeConfig(ratio=0.5).uses_cost_model()
    assert dataclasses.replace(ToMeConfig(), ratio=0.7).uses_cost_model() is False
    assert dataclasses.replace(ToMeConfig(), metric="hidden").uses_cost_model()


def test_a_saved_file_is_versioned_json(tmp_path):
    path = save_config(tmp_path / "acc.json", ["todo", ToCaConfig(interval=4)])
    data = json.loads(path.read_text())
    assert data["format"] == "diffaccel.acceleration" and data["version"] == 1
    assert [m["method"] for m in data["methods"]] == ["todo", "toca"]
    assert load_config(path) == [diffaccel.ToDoConfig(), ToCaConfig(interval=4)]


BAD_FILES = [
    ("[1, 2]", ValueError, r"is a JSON object with keys 'format', 'version' and 'methods'"),
    ("{not json", ValueError, r"is not valid JSON"),
    ('{"format": "other", "version": 1, "methods": []}', ValueError, r"'format' must be 'diffaccel.acceleration'"),
    ('{"format": "diffaccel.acceleration", "version": 9, "methods": [{"method": "tome"}]}', ValueError,
     r"version 9; this diffaccel reads versions up to 1"),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [], "x": 1}', ValueError,
     r"unknown keys \['x'\].*allowed: \['format', 'version', 'methods'\]"),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": []}', ValueError, r"a non-empty list"),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "nope"}]}', ValueError,
     r"unknown method 'nope'; available: \["),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "tome", "colour": 1}]}', TypeError,
     r"unknown option 'colour' for tome; allowed: \["),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "tome", "ratio": 2}]}', ValueError,
     r"ToMeConfig.ratio must be in \[0.0, 0.75\]"),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"ratio": 0.5}]}', ValueError,
     r"needs a 'method' key"),
    ('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "tome"}, {"method": "tome"}]}',
     ValueError, r"each method may be given once"),
]


@pytest.mark.parametrize("text,exc,match", BAD_FILES)
def test_a_bad_file_gives_a_clear_error_and_changes_nothing(make_case, tmp_path, text, exc, match):
    case = make_case("sd1")
    before = snapshot(case.pipe)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(exc, match=match):
        accelerate_pipeline(case.pipe, load_config(path))
    assert str(path) in str(pytest.raises(exc, load_config, path).value)
    assert snapshot(case.pipe) == before and not is_accelerated(case.pipe)


def test_save_config_refuses_an_invalid_spec_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        save_config(tmp_path / "x.json", "nope")
    with pytest.raises(ValueError, match="ToMeConfig.ratio must be in"):
        save_config(tmp_path / "x.json", "tome", ratio=3)
    assert not (tmp_path / "x.json").exists()


def test_is_accelerated_follows_apply_and_remove(make_case):
    case = make_case("pixart")
    assert not is_accelerated(case.pipe) and not is_accelerated(case.pipe.transformer)
    accelerate_pipeline(case.pipe, "fora")
    assert is_accelerated(case.pipe) and is_accelerated(case.pipe.transformer)
    remove_acceleration(case.pipe)
    assert not is_accelerated(case.pipe) and not is_accelerated(case.pipe.transformer)


def test_a_method_without_a_name_or_a_dataclass_is_not_registered():
    from diffaccel.methods import register

    class Nameless(diffaccel.CachingMethod):
        pass

    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        register(Nameless)

    class NotADataclass(diffaccel.CachingMethod):
        name = "plain"

    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        register(NotADataclass)
    assert "plain" not in diffaccel.available_methods()


# -- declared options: what the faces offer is what validation checks -----------------------------


@pytest.mark.parametrize("name", diffaccel.available_methods())
def test_every_option_is_declared_for_the_faces(name):
    cls = method_class(name)
    options = cls.options()
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "policy"}
    assert {o.name for o in options} == fields
    assert [o.name for o in options if o.main] == [p for p in cls.params if p in fields]  # strengths first
    assert all(o.main for o in options[:len(cls.params)])
    for o in options:
        assert len(o.doc) > 10, (name, o.name)
        assert o.kind in ("float", "int", "bool", "choice", "number_or_choice", "json"), (name, o.name)
        if o.kind in ("float", "int", "number_or_choice"):
            assert o.low is not None and o.high is not None
            assert o.low <= o.default <= o.high if isinstance(o.default, (int, float)) else o.default in o.choices
        if o.kind == "choice":
            assert o.default in o.choices
        json.dumps(o.to_dict())  # JSON-ready for faces outside Python


@pytest.mark.parametrize("name", diffaccel.available_methods())
def test_declared_bounds_and_choices_are_what_validation_checks(name):
    cls = method_class(name)
    for o in cls.options():
        if o.kind in ("float", "int", "number_or_choice"):
            step = 1 if o.kind == "int" else 0.5
            for outside in (o.low - step, o.high + step):
                with pytest.raises(ValueError, match=rf"{cls.__name__}\.{o.name} must be"):
                    cls(**{o.name: outside})
        if o.kind in ("choice", "number_or_choice"):
            with pytest.raises((TypeError, ValueError), match=rf"{cls.__name__}\.{o.name} must be"):
                cls(**{o.name: "no-such-choice"})
        if o.kind == "bool":
            with pytest.raises(TypeError, match=rf"{cls.__name__}\.{o.name} must be True or False"):
                cls(**{o.name: 1})
        if o.kind == "int":
            with pytest.raises(TypeError, match=rf"{cls.__name__}\.{o.name} must be an int"):
                cls(**{o.name: o.default + 0.5})


def test_a_ratio_bound_narrowed_by_the_cell_is_the_one_reported():
    with pytest.raises(ValueError, match=r"ToMeConfig.ratio must be in \[0.0, 0.875\], got 0.9"):
        diffaccel.ToMeConfig(ratio=0.9, sx=2, sy=4)
    assert diffaccel.ToMeConfig(ratio=0.85, sx=2, sy=4).ratio == 0.85
    with pytest.raises(ValueError, match=r"ToMeConfig.ratio must be in \[0.0, 1.0\], got 1.5"):
        diffaccel.ToMeConfig(ratio=1.5, sx=0)  # sx out of range too: the declared bound is the one said
    with pytest.raises(ValueError, match=r"ToMeConfig.sx must be in \[1, 64\], got 0"):
        diffaccel.ToMeConfig(ratio=0.5, sx=0)


def test_config_code_is_the_shortest_exact_expression():
    from diffaccel.config import config_code

    cases = [["todo", diffaccel.ToCaConfig(interval=4)], diffaccel.ToMeConfig(ratio=0.5),
             diffaccel.ToMeConfig.from_dict({**diffaccel.ToMeConfig(ratio=0.6).to_dict(), "cost_model": None}),
             {"method": "fora", "policy": {"rules": [{"select": {"kind": "ff"}, "params": {"interval": 2}}]}}]
    for spec in cases:
        code = config_code(spec)
        scope: dict = {}
        *imports, expr = code.split("\n")
        exec("\n".join(imports), scope)
        made = eval(expr, scope)
        made = made if isinstance(made, list) else [made]
        assert made == diffaccel.api.resolve_methods(spec, {}), code
    assert config_code(["todo", diffaccel.ToCaConfig(interval=4)]).endswith("[ToDoConfig(), ToCaConfig(interval=4)]")
    assert config_code(diffaccel.ToMeConfig(ratio=0.6)).endswith("ToMeConfig(ratio=0.6)")
    assert config_code(diffaccel.ToMeConfig.from_dict({**diffaccel.ToMeConfig(ratio=0.6).to_dict(),
                                                         "cost_model": None})).endswith("cost_model=None)")


def test_numeric_choices_take_any_number_of_that_value_but_not_a_bool():
    import numpy as np

    assert diffaccel.ToMeConfig(max_downsample=np.int64(2)).max_downsample == 2
    assert diffaccel.ToMeConfig(max_downsample=2.0).max_downsample == 2
    with pytest.raises(ValueError, match=r"ToMeConfig.max_downsample must be one of \[1, 2, 4, 8\], got True"):
        diffaccel.ToMeConfig(max_downsample=True)
    with pytest.raises(TypeError, match="ToMeConfig.cost_model must be True or False, got 1"):
        diffaccel.ToMeConfig(cost_model=1)
