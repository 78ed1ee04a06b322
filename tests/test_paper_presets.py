"""The paper presets against the reference code's own formulas.

Each test runs a preset on a tiny model with the reference model's depth, reads from describe() how
many tokens every site computed at every step, and tables that against the formulas of ToCa's and
DuCa's code, transcribed here (PixArt-alpha-ToCa/diffusion/model/cache_functions: fresh_ratio_scheduler,
force_scheduler, global_force_fresh, cache_cutfresh; flux-ToCa/src/flux/modules/cache_functions:
fresh_ratio_scheduler, cal_type). Where ours departs from the code it is said next to the formula."""

import pytest
import torch

from diffaccel import DuCaConfig, ToCaConfig, accelerate_pipeline, describe

STEPS = 20  # the references' PixArt setting: 20 DPM-Solver steps


def computed_table(pipe):
    """{site name: {step: tokens computed}} of the last run (steps a site was idle at are absent)."""
    return {s["name"]: {int(k): v["computed"] for k, v in s["last_run"].items()}
            for s in describe(pipe)["denoisers"][0]["sites"]}


def topk(ratio: float, n: int) -> int:
    """cache_cutfresh: the ratio clamped to [0, 1] as a float32 tensor, times the token count, int()."""
    return int(torch.clamp(torch.tensor(ratio), min=0, max=1) * n)


def pixart_fresh_ratio(R, step, num_steps, layer, module):
    """fresh_ratio_scheduler, schedule 'ToCa' (PixArt-alpha): step_weight -0.9, layer_weight 0.6 over
    layers 0..27, module factor 0.6 for cross-attention and 1.6 for the MLP."""
    step_weight, layer_weight = -0.9, 0.6
    step_factor = 1 - step_weight + 2 * step_weight * step / num_steps
    layer_factor = 1 + layer_weight - 2 * layer_weight * layer / 27
    module_factor = 1 - (1 - 0.6) * 1.0 if module == "cross-attn" else 1 + 0.6 * 1.0
    return R * layer_factor * step_factor * module_factor


def pixart_toca_full_steps(num_steps, fresh_threshold=3):
    """global_force_fresh + force_scheduler: step 0 is full; a later step is full when it is a
    multiple of cal_threshold = round(fresh_threshold / (1 - 0.2 + 0.4 step / num_steps)), set at each
    full step. (The reference sets it inside layer 0 of the full step, so at a step where it changes
    the other 27 layers test the new value: at step 4 of 20 only layer 0 runs in full. Ours decides a
    step for every block alike with the interval set at the previous full step: step 4 is full.)"""
    full, threshold = [], None
    for step in range(num_steps):
        if step == 0 or step % threshold == 0:
            full.append(step)
            threshold = torch.round(fresh_threshold / torch.tensor(1 - 0.2 + 2 * 0.2 * step / num_steps))
    return full


def pixart_partial(R, step, layer, site, n):
    """Tokens a cross-attention or feed-forward site of n tokens computes at a partial step (all of them
    when the reference's top-k reaches n)."""
    k = topk(pixart_fresh_ratio(R, step, STEPS, layer, "cross-attn" if site["kind"] == "cross_attn" else "mlp"), n)
    return n if k >= n else k


def test_toca_pixart_alpha_preset_follows_the_reference(make_case):
    case = make_case("pixart", num_layers=28)
    cfg = ToCaConfig.paper("pixart-alpha")
    assert (cfg.interval, cfg.fresh_ratio, cfg.score, cfg.cell, cfg.cell_weight) == (3, 0.3, "entropy", 4, 0.4)
    accelerate_pipeline(case.pipe, cfg)
    case.run(steps=STEPS)
    table = computed_table(case.pipe)
    full = pixart_toca_full_steps(STEPS)
    assert full == [0, 4, 6, 9, 12, 15, 18]
    sites = describe(case.pipe)["denoisers"][0]["sites"]
    assert len({s["depth"] for s in sites}) == 28
    for site in sites:
        n, layer = table[site["name"]][0], site["depth"]
        for step in range(STEPS):
            got = table[site["name"]][step]
            if step in full:
                want = n
            elif site["kind"] == "self_attn":  # reused whole: no partial computation for attn
                want = 0
            else:
                want = pixart_partial(0.3, step, layer, site, n)
            assert got == want, (site["name"], step, got, want)


def test_duca_pixart_alpha_preset_follows_the_reference(make_case):
    """DuCa-PixArt: full steps every 3 (its force_scheduler has no step weight), then a conservative
    (ToCa) and an aggressive step; R=0.75 through ToCa's ratio formula, clamped once: at the deepest
    block's first conservative step its feed-forward refreshes 0.87 of the tokens."""
    case = make_case("pixart", num_layers=28)
    accelerate_pipeline(case.pipe, DuCaConfig.paper("pixart-alpha"))
    case.run(steps=STEPS)
    table = computed_table(case.pipe)
    deepest_ff = pixart_fresh_ratio(0.75, 1, STEPS, 27, "mlp")
    assert round(deepest_ff, 2) == 0.87
    for site in describe(case.pipe)["denoisers"][0]["sites"]:
        n, layer = table[site["name"]][0], site["depth"]
        for step in range(STEPS):
            got = table[site["name"]][step]
            phase = step % 3  # cal_type: step % 3 == 0 full, (step % 3) % 2 == 1 ToCa, else aggressive
            if phase == 0:
                want = n
            elif phase == 2 or site["kind"] == "self_attn":
                want = 0
            else:
                want = pixart_partial(R=0.75, step=step, layer=layer, site=site, n=n)
            assert got == want, (site["name"], step, got, want)


def flux_fresh_ratio(R, layer, stream):
    """flux-ToCa fresh_ratio_scheduler 'ToCa': no step weight, layer weight 0.5 over a layer index
    counted per stream and divided by 27, stream factor 0.4 (double) / 1.6 (single), no module factor."""
    layer_factor = 1 + 0.5 - 2 * 0.5 * layer / 27
    stream_factor = 1 - 0.6 if stream == "double_stream" else 1 + 0.6
    return R * layer_factor * 1.0 * stream_factor


def flux_full_steps(num_steps, interval=4):
    """cal_type: the first 3 steps are full and each resets the counter; then full when the counter
    reaches interval - 1."""
    full, counter = [], 0
    for step in range(num_steps):
        if step <= 2 or counter == interval - 1:
            full.append(step)
            counter = 0
        else:
            counter += 1
    return full


def test_toca_flux_preset_follows_the_reference(make_case):
    """FLUX.1-dev's depth (19 double- and 38 single-stream blocks): attention reused whole on cached
    steps, the image and text MLPs of double-stream blocks and the shared MLP/output projection of
    single-stream blocks refresh fresh tokens by flux-ToCa's formula."""
    steps = 12
    case = make_case("flux", num_layers=19, num_single_layers=38)
    accelerate_pipeline(case.pipe, ToCaConfig.paper("flux"))
    case.run(steps=steps, guidance=False)
    table = computed_table(case.pipe)
    full = flux_full_steps(steps)
    assert full == [0, 1, 2, 6, 10]
    sites = describe(case.pipe)["denoisers"][0]["sites"]
    assert {s["name"].split(".")[0] for s in sites} == {"transformer_blocks", "single_transformer_blocks"}
    for site in sites:
        name = site["name"]
        stream, layer = name.split(".")[0], int(name.split(".")[1])
        log = table[name]
        n = log[2]
        assert sorted(log) == list(range(2, steps)), name  # warm-up 0, 1 idle (computed in full)
        for step in range(2, steps):
            if step in full:
                want = n
            elif site["kind"] == "self_attn":
                want = 0
            else:
                k = topk(flux_fresh_ratio(0.1, layer, "double_stream" if stream == "transformer_blocks"
                                          else "single_stream"), n)
                want = n if k >= n else k
            assert log[step] == want, (name, step, log[step], want)


def test_flux_single_stream_projections_share_one_fresh_token_set(make_case, monkeypatch):
    """flux-ToCa picks one fresh set per single-stream block for its MLP input and its output
    projection: proj_out's fresh rows then see freshly computed MLP activations."""
    from diffaccel.methods.toca import TokenwiseCache

    picks, refresh = {}, TokenwiseCache.refresh

    def recording(self, site, ctx, params, entry, call):
        refresh(self, site, ctx, params, entry, call)
        stale = entry.extra["staleness"]  # 0 at the tokens just picked
        picks.setdefault(site.name, []).append((ctx.step, stale.numel(), (stale == 0).nonzero().tolist()))

    monkeypatch.setattr(TokenwiseCache, "refresh", recording)
    case = make_case("flux", num_layers=1, num_single_layers=2)
    accelerate_pipeline(case.pipe, ToCaConfig.paper("flux", fresh_ratio=0.3))
    case.run(steps=6, guidance=False)
    for i in range(2):
        mlp, out = (picks[f"single_transformer_blocks.{i}.{c}"] for c in ("proj_mlp", "proj_out"))
        assert [s for s, _, _ in mlp] == [3, 4, 5] and mlp == out
        assert all(0 < len(fresh) < tokens for _, tokens, fresh in mlp)


@pytest.mark.parametrize("model", ["pixart-alpha", "flux"])
def test_paper_presets_take_overrides_and_name_the_known_models(model):
    cfg = ToCaConfig.paper(model, fresh_ratio=0.2)
    assert cfg.fresh_ratio == 0.2 and cfg.to_dict()["method"] == "toca"
    with pytest.raises(ValueError, match=r"no paper setting of toca for 'sdxl'; available: \['flux', 'pixart-alpha'\]"):
        ToCaConfig.paper("sdxl")
