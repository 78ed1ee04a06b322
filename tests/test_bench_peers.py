"""The peers as benchmark rows (diffaccel/bench/peers.py): every available setting installs on the
trained reference pipelines, runs, changes the output where its schedule says it must, and after
`remove()` the pipeline is exactly as it was (same attributes, hooks and forwards; bit-exact output)."""

import json
import sys

import pytest
import torch

from diffaccel.bench import peers
from diffaccel.bench.peers import Installed, PeerError, install, peer_settings
from diffaccel.testing import snapshot

STEPS = {"unet": 2, "dit": 4}
# methods whose schedule acts within STEPS steps whatever the data (the adaptive thresholds of
# FirstBlockCache, MagCache and cache-dit's DBCache may or may not skip in so few steps)
ACTS = {"ToMe", "DeepCache", "T-GATE", "TaylorSeerCache", "PyramidAttentionBroadcast", "FasterCache"}


def _settings(kind):
    return [s for s in peer_settings(kind, STEPS[kind]) if not s.unavailable]


def _params(kind):
    """Every available setting; the strongest of each method (and of cache-dit's masks) in the fast
    run, the others marked slow."""
    settings = _settings(kind)
    strongest = {(s.peer, s.method, "mask" in s.label): s for s in settings}.values()
    return [pytest.param(s, id=s.label, marks=() if s in strongest else pytest.mark.slow) for s in settings]


@pytest.fixture(scope="module")
def pipes():
    from diffaccel.reference import load_reference_pipeline

    return {kind: load_reference_pipeline(kind) for kind in STEPS}


def _run(pipe, kind, call=None):
    kwargs = {"clean_caption": False} if kind == "dit" else {}
    with torch.no_grad():
        return (call or pipe)(prompt=["a red circle on a blue background"], num_inference_steps=STEPS[kind],
                              guidance_scale=5.0, generator=[torch.Generator().manual_seed(0)], output_type="pt",
                              **kwargs).images


@pytest.fixture(scope="module")
def baselines(pipes):
    return {kind: _run(pipe, kind) for kind, pipe in pipes.items()}


def _state(pipe):
    return snapshot(pipe), type(pipe).__call__, type(pipe).__dict__.keys() - {"__call__"}


def test_settings_table():
    for kind in ("unet", "dit"):
        rows = peer_settings(kind, 20)
        assert [s.label for s in rows] == [s.label for s in peer_settings(kind, 20)]  # stable
        assert len({s.label for s in rows}) == len(rows)
        assert all(s.kinds == (kind,) and not s.unavailable for s in rows)
        json.dumps([s.strength for s in rows])
        methods = {}
        for s in rows:
            methods.setdefault((s.peer, s.method), []).append(s)
        assert all(len(v) % 3 == 0 for v in methods.values())
        assert {p for p, _ in methods} == ({"tomesd", "DeepCache", "T-GATE"} if kind == "unet" else
                                           {"cache-dit", "diffusers", "T-GATE"})
    dit = {s.label: s for s in peer_settings("dit", 20)}
    assert dit["cache-dit DBCache Fn=1 mask=fast"].strength["steps_computation_mask"][-1] == 1
    assert peer_settings("unet", 20)[6].strength["gate_step"] == 12
    with pytest.raises(ValueError):
        peer_settings("vae", 20)


def test_missing_packages_give_unavailable_rows(monkeypatch, pipes):
    for name in ("tomesd", "DeepCache", "tgate", "cache_dit"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = peer_settings("unet", 20) + peer_settings("dit", 20)
    gone = [s for s in rows if s.unavailable]
    assert {s.peer for s in gone} == {"tomesd", "DeepCache", "T-GATE", "cache-dit"}
    assert all('pip install "diffaccel[bench]"' in s.unavailable for s in gone)
    assert {s.peer for s in rows if not s.unavailable} == {"diffusers"}
    before = _state(pipes["unet"])
    with pytest.raises(PeerError, match="not usable"):
        install(gone[0], pipes["unet"], 20)
    assert _state(pipes["unet"]) == before


def test_wrong_kind_and_failed_install_leave_the_pipeline(monkeypatch, pipes, baselines):
    unet, dit = pipes["unet"], pipes["dit"]
    before = _state(dit)
    with pytest.raises(PeerError, match="applies to unet"):
        install(_settings("unet")[0], dit, 4)
    assert _state(dit) == before

    import tomesd

    real = tomesd.apply_patch

    def half_done(*args, **kwargs):  # patches, then fails
        real(*args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(tomesd, "apply_patch", half_done)
    before = _state(unet)
    with pytest.raises(PeerError, match="boom"):
        install(_settings("unet")[0], unet, STEPS["unet"])
    assert _state(unet) == before
    assert torch.equal(_run(unet, "unet"), baselines["unet"])


def _check(setting, pipe, kind, base):
    before = _state(pipe)
    installed = install(setting, pipe, STEPS[kind])
    assert isinstance(installed, Installed)
    out = _run(pipe, kind, installed.call)
    assert out.shape == base.shape and torch.isfinite(out).all()
    if setting.method in ACTS:
        assert not torch.equal(out, base), f"{setting.label} changed nothing"
    installed.remove()
    installed.remove()  # idempotent
    assert _state(pipe) == before
    assert torch.equal(_run(pipe, kind), base), f"{setting.label} left the pipeline changed"
    return out


@pytest.mark.parametrize("setting", _params("unet"))
def test_unet_peer(setting, pipes, baselines):
    _check(setting, pipes["unet"], "unet", baselines["unet"])


@pytest.mark.parametrize("setting", _params("dit"))
def test_dit_peer(setting, pipes, baselines):
    _check(setting, pipes["dit"], "dit", baselines["dit"])


def test_calls_repeat_and_tgate_needs_removal(pipes, baselines):
    """Each call of an installed peer starts afresh (the benchmark repeats calls); after a T-GATE call
    a plain call is wrong (its attention forwards still reuse the gated cache) until removal."""
    pipe = pipes["dit"]
    for method in ("FasterCache", "DBCache"):
        setting = next(s for s in _settings("dit") if s.method == method)
        installed = install(setting, pipe, STEPS["dit"])
        try:
            assert torch.equal(_run(pipe, "dit", installed.call), _run(pipe, "dit", installed.call))
        finally:
            installed.remove()
    unet = pipes["unet"]
    installed = install(next(s for s in _settings("unet") if s.peer == "T-GATE"), unet, STEPS["unet"])
    _run(unet, "unet", installed.call)
    try:
        assert not torch.equal(_run(unet, "unet"), baselines["unet"])
    except RuntimeError:  # with several prompts the reused cache has the wrong batch size
        pass
    installed.remove()
    assert torch.equal(_run(unet, "unet"), baselines["unet"])


def test_mag_cache_calibrates_on_the_pipeline(pipes, monkeypatch):
    seen = []
    real = peers._mag_ratios
    monkeypatch.setattr(peers, "_mag_ratios", lambda *a: seen.append(real(*a)) or seen[-1])
    setting = next(s for s in _settings("dit") if s.method == "MagCache")
    install(setting, pipes["dit"], STEPS["dit"]).remove()
    assert len(seen[0]) == STEPS["dit"] and seen[0][0] == 1.0 and all(r > 0 for r in seen[0])
