import json

import torch

from diffaccel import (
    Linear,
    Policy,
    Rule,
    Selector,
    ToMeConfig,
    accelerate_pipeline,
    describe,
    remove_acceleration,
)


def test_describe_before_and_after_a_run(make_case):
    case = make_case("sd1")
    plain = describe(case.pipe)
    assert plain["accelerated"] is False and plain["denoisers"][0]["family"] == "SD 1.x"
    assert len(plain["denoisers"][0]["sites"]) == 12

    pol = Policy((Rule(Selector(kind="self_attn", level=0), {"ratio": Linear(0.6, 0.2)}),))
    accelerate_pipeline(case.pipe, ToMeConfig(policy=pol))
    d = describe(case.pipe, num_steps=5)
    site = next(s for s in d["denoisers"][0]["sites"] if s["methods"]["tome"]["acts"])
    plan = [p["ratio"] for p in site["methods"]["tome"]["plan"]]
    assert plan == [0.6, 0.52, 0.44, 0.36, 0.28] or all(abs(a - b) < 1e-9 for a, b in
                                                         zip(plan, [0.6, 0.52, 0.44, 0.36, 0.28]))
    idle = next(s for s in d["denoisers"][0]["sites"] if s["kind"] == "cross_attn")
    assert idle["methods"]["tome"] == {"acts": False, "reason": "not selected by the policy"}
    json.dumps(d)  # plain data

    case.run(steps=5)
    d = describe(case.pipe)
    site = next(s for s in d["denoisers"][0]["sites"] if s["methods"]["tome"]["acts"])
    computed = [site["last_run"][k]["computed"] for k in sorted(site["last_run"])]
    assert computed == [1024 - int(r * 1024) for r in (0.6, 0.52, 0.44, 0.36, 0.28)]
    call = d["denoisers"][0]["last_call"]
    assert call["num_steps"] == 5 and call["branch"] == "cond_uncond" and call["batch"] == 2
    text = str(d)
    assert "ratio=0.6 @0" in text and "1024 -> 410..738 over 5 steps" in text


def test_describe_reports_why_sites_are_skipped(make_case):
    """At its default factor ToDo asks the cost model: on 1024 image tokens pooling pays off, on 4 it
    does not and describe says so per site; text-only sites say why they are never touched."""
    case = make_case("flux")
    accelerate_pipeline(case.pipe, ["todo", ToMeConfig(merge_attn=False, merge_mlp=True)])
    case.run(steps=2, guidance=True, size=512)
    d = describe(case.pipe)
    den = d["denoisers"][0]
    assert den["family"] == "Flux" and den["cfg_layout"] == "separate"
    assert den["last_call"]["branch"] == "uncond"  # true CFG: the second call of the step
    assert den["last_call"]["geometry"] == {"frames": 1, "height": 32, "width": 32, "text_tokens": 8,
                                            "text_first": True, "frame_span": 1, "pixels": 16}
    attn = [s for s in den["sites"] if s["kind"] == "self_attn"]
    assert attn and all(s["methods"]["todo"]["acts"] and s["last_run_note"] is None for s in attn)
    assert all(v["keys_values"] < v["tokens"] for s in attn for v in s["last_run"].values())
    text = [s for s in den["sites"] if s["name"].endswith("ff_context")]
    assert text and all(s["methods"]["tome"]["reason"] == "text tokens only" for s in text)

    case.run(steps=2, guidance=True, size=32)  # a 2 x 2 token grid
    d = describe(case.pipe)
    attn = [s for s in d["denoisers"][0]["sites"] if s["kind"] == "self_attn"]
    assert all(v["keys_values"] == v["tokens"] for s in attn for v in s["last_run"].values())  # nothing pooled
    assert all(s["last_run_note"].startswith("cost model: saves ~") and "so this site is skipped" in s["last_run_note"]
               for s in attn)
    assert "cost model: saves" in str(d)
    remove_acceleration(case.pipe)
    accelerate_pipeline(case.pipe, "todo", factor=2)  # an explicit factor acts wherever it is selected
    case.run(steps=2, guidance=True, size=32)
    attn = [s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["kind"] == "self_attn"]
    assert all(v["keys_values"] < v["tokens"] for s in attn for v in s["last_run"].values())


def test_video_geometry_is_read_per_family(make_case):
    import warnings

    expect = {"cogvideox": (3, 8, 8, 8), "wan": (2, 16, 16, 0), "hunyuan_video": (2, 16, 16, 8), "ltx": (2, 16, 16, 0)}
    for family, (f, h, w, text) in expect.items():
        case = make_case(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            accelerate_pipeline(case.pipe, "tome")
        case.run(steps=1)
        geo = describe(case.pipe)["denoisers"][0]["last_call"]["geometry"]
        assert (geo["frames"], geo["height"], geo["width"], geo["text_tokens"]) == (f, h, w, text), family


def test_wan22_tracks_both_transformers_on_one_clock(make_case):
    import warnings

    case = make_case("wan22")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        accelerate_pipeline(case.pipe, "tome")
    case.run(steps=4)
    dens = describe(case.pipe)["denoisers"]
    assert [d["attr"] for d in dens] == ["transformer", "transformer_2"]
    steps = [d["last_call"]["step"] for d in dens]
    assert steps[0] < steps[1] == 3  # the high-noise expert ran first, the low-noise one last
    assert all(d["last_call"]["num_steps"] == 4 for d in dens)
    assert torch.is_tensor(case.run(steps=2))
