"""An accelerated denoiser under `torch.compile(fullgraph=True)`: every method on the SD 1.5, PixArt and
Flux tiny pipelines traces without a graph break, runs a whole run (and a longer second one) with a
small fixed number of compiled graphs counted by torch._dynamo, and gives eager's outputs.

Dynamo's tracing is what is checked (backend "eager" runs the captured graphs as they are; one test
runs them through AOTAutograd, which functionalises the custom ops); inductor's code generation is
torch's own and too slow for CI on two cores."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from diffaccel import accelerate_pipeline, describe, remove_acceleration
from diffaccel.testing import tiny_case

# token methods at an explicit strength: at their defaults the cost model leaves tiny models alone
METHODS = {"tome": {"ratio": 0.5}, "todo": {"factor": 2}, "sito": {"ratio": 0.5}, "fora": {}, "toca": {},
           "duca": {}}
SHORT, LONG = 4, 7
# distinct compiled graphs over both runs: one per distinct set of decisions (full and cached steps,
# partial steps with a symbolic fresh count, a fresh count of one) — never one per step
MAX_GRAPHS = 6

pytestmark = pytest.mark.slow


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _graphs() -> int:
    return dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled_runs(family: str, method: str, backend: str = "eager", **options):
    case = tiny_case(family)
    accelerate_pipeline(case.pipe, method, **options)
    eager = [case.run(steps=n) for n in (SHORT, LONG)]
    dynamo.reset()
    dynamo.utils.counters.clear()
    _denoiser(case.pipe).compile(fullgraph=True, backend=backend)
    short = case.run(steps=SHORT)
    after_short = _graphs()
    long = case.run(steps=LONG)
    again = case.run(steps=LONG)
    return case, eager, (short, long, again), after_short


@pytest.mark.parametrize("family", ["sd1", "pixart", "flux"])
@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_compile_bounded_graphs_equal_outputs(family, method):
    case, eager, (short, long, again), after_short = _compiled_runs(family, method, **METHODS[method])
    total = _graphs()
    assert 1 <= after_short <= total <= MAX_GRAPHS, (after_short, total)
    assert total - after_short <= 2, "a longer run compiled graph after graph: decisions leak the step"
    assert not dynamo.utils.counters["graph_break"], dict(dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(short, eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(long, eager[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, long, rtol=0, atol=0)  # a rerun reuses the graphs as they are
    text = str(describe(case.pipe))
    assert f"over {LONG} steps" in text  # the compiled calls are logged per step, as eager ones


def test_compiled_methods_act_where_eager_ones_do():
    """Not a silent no-op: the compiled run's log says tokens were merged or reused."""
    case, eager, (short, long, _), _ = _compiled_runs("sd1", "fora")
    base = tiny_case("sd1").run(steps=LONG)
    assert not torch.allclose(long, base, atol=1e-3)
    text = str(describe(case.pipe))
    assert "reused" in text


def test_aot_autograd_functionalises_the_custom_ops():
    """ToMe's seeded draws and ToCa's symbolic fresh count are custom ops / dynamic sizes that
    AOTAutograd must trace too."""
    for method in ("tome", "toca"):
        _, eager, (short, long, _), _ = _compiled_runs("sd1", method, backend="aot_eager", **METHODS[method])
        torch.testing.assert_close(short, eager[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(long, eager[1], rtol=1e-4, atol=1e-4)


def test_compiled_bare_denoiser_runs_as_eager():
    """Without a pipeline there is no point between steps to decide in: a compiled bare denoiser traces
    its per-call decisions as an eager one makes them (correct, but a graph per step)."""
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 8, 32, generator=gen)
    outs = []
    for compiled in (False, True):
        unet = tiny_case("sd1").pipe.unet  # the same weights each time
        accelerate_pipeline(unet, "fora", num_steps=4)
        if compiled:
            dynamo.reset()
            unet.compile(backend="eager")
        with torch.no_grad():
            outs.append([unet(x, t, encoder_hidden_states=text).sample for t in range(4)])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compiled_before_patching():
    case = tiny_case("sd1")
    dynamo.reset()
    case.pipe.unet = torch.compile(case.pipe.unet, fullgraph=True, backend="eager")
    accelerate_pipeline(case.pipe, "fora")
    dynamo.utils.counters.clear()
    out = case.run(steps=SHORT)
    remove_acceleration(case.pipe)
    dynamo.reset()
    eager = tiny_case("sd1")
    accelerate_pipeline(eager.pipe, "fora")
    torch.testing.assert_close(out, eager.run(steps=SHORT), rtol=1e-4, atol=1e-4)


def test_removal_after_compiled_runs_is_exact():
    case = tiny_case("sd1")
    base = case.run(steps=SHORT)
    accelerate_pipeline(case.pipe, "toca")
    dynamo.reset()
    case.pipe.unet.compile(fullgraph=True, backend="eager")
    case.run(steps=SHORT)
    remove_acceleration(case.pipe)
    dynamo.reset()
    torch.testing.assert_close(case.run(steps=SHORT), base, rtol=0, atol=0)
