import json

import pytest

from diffaccel import Constant, Cosine, Linear, Piecewise, Policy, Rule, Selector, ToMeConfig, Window
from diffaccel.sites import Site


def _site(kind="self_attn", depth=0, level=0, name="down_blocks.0.attn1"):
    return Site(name=name, kind=kind, module=None, block="b", depth=depth, level=level)


def test_schedules():
    assert Constant(0.3)(0.7) == 0.3
    lin = Linear(0.6, 0.2)
    assert lin(0) == 0.6 and lin(1) == pytest.approx(0.2) and lin(0.5) == pytest.approx(0.4)
    assert Linear(1.0, 0.0, p0=0.5, p1=1.0)(0.25) == 1.0
    cos = Cosine(1.0, 0.0)
    assert cos(0) == 1.0 and cos(0.5) == pytest.approx(0.5) and cos(1) == pytest.approx(0.0)
    pw = Piecewise(((0.0, 0.5), (0.4, 0.3), (0.8, 0.0)))
    assert [pw(p) for p in (0.0, 0.39, 0.4, 0.9)] == [0.5, 0.5, 0.3, 0.0]
    assert Piecewise(((0.0, 0.0), (1.0, 1.0)), interpolate=True)(0.25) == pytest.approx(0.25)


def test_windows_in_progress_and_steps():
    assert Window(0.2, 0.6).contains(2, 10) and not Window(0.2, 0.6).contains(6, 10)
    assert Window(3, 5, unit="step").contains(4, None) and not Window(3, 5, unit="step").contains(5, None)
    assert Window(5, unit="step").contains(100, 10)


def test_selectors():
    s = _site(kind="ff", depth=3, level=1, name="up_blocks.1.attentions.0.transformer_blocks.0.ff")
    assert Selector().matches(s)
    assert Selector(kind=("ff", "self_attn")).matches(s)
    assert not Selector(kind="self_attn").matches(s)
    assert Selector(depth=(2, 4)).matches(s) and not Selector(depth=0).matches(s)
    assert Selector(level=1).matches(s) and not Selector(level=(0, 0)).matches(s)
    assert Selector(name="up_blocks.*.ff").matches(s) and not Selector(name="down_blocks.*").matches(s)


def test_last_active_rule_wins_and_inactive_gives_none():
    pol = Policy((
        Rule(Selector(kind="self_attn"), {"ratio": Linear(0.6, 0.2)}),
        Rule(Selector(depth=(1, 9)), {"ratio": 0.1}, Window(0.5, 1.0)),
    ))
    assert pol.evaluate(_site(depth=0), 0, 10) == {"ratio": 0.6}
    assert pol.evaluate(_site(depth=2), 2, 10) == {"ratio": pytest.approx(0.52)}
    assert pol.evaluate(_site(depth=2), 6, 10) == {"ratio": 0.1}
    assert pol.evaluate(_site(kind="cross_attn"), 0, 10) is None


def test_json_round_trip():
    pol = Policy((
        Rule(Selector(kind=("self_attn", "ff"), depth=(0, 3), level=0, name="*attn1"),
             {"ratio": Cosine(0.7, 0.3, 0.1, 0.9)}, Window(2, 30, unit="step")),
        Rule(Selector(), {"ratio": Piecewise(((0.0, 0.5), (0.5, 0.2)), interpolate=True)}),
        Rule(Selector(level=(1, 2)), {"ratio": 0.25}),
    ))
    text = pol.to_json()
    back = Policy.from_json(text)
    assert back == pol
    assert json.loads(back.to_json()) == json.loads(text)
    # a config with that policy round-trips too
    cfg = ToMeConfig(policy=text)
    assert cfg.policy == pol


@pytest.mark.parametrize("bad, match", [
    ("{not json", "malformed policy JSON"),
    ("[1, 2]", "needs a 'rules' list"),
    ('{"rules": [], "extra": 1}', "unknown policy fields"),
    ('{"rules": [{"select": {"kind": "attention"}}]}', "unknown site kind 'attention'"),
    ('{"rules": [{"params": {"ratio": {"type": "exp"}}}]}', "unknown schedule type 'exp'"),
    ('{"rules": [{"params": {"ratio": {"type": "linear", "start": 0.5}}}]}', "bad fields for schedule"),
    ('{"rules": [{"when": {"start": 0.8, "end": 0.2}}]}', "end > start"),
    ('{"rules": [{"select": {"depth": [3, 1]}}]}', "low, high"),
    ('{"rules": [{"select": {"colour": "red"}}]}', "bad selector fields"),
])
def test_malformed_policies_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Policy.from_json(bad)


def test_policy_values_validated_against_the_method():
    with pytest.raises(ValueError, match=r"ratio must be in \[0.0, 0.75\]"):
        ToMeConfig(policy=Policy((Rule(Selector(), {"ratio": Linear(0.9, 0.2)}),)))
    with pytest.raises(ValueError, match="does not read"):
        ToMeConfig(policy={"rules": [{"params": {"factor": 2}}]})
    with pytest.raises((TypeError, ValueError), match="must be a number"):
        Policy.from_dict({"rules": [{"params": {"ratio": {"type": "constant", "value": "0.5"}}}]})
