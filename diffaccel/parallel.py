"""Context parallelism: diffusers' `enable_parallelism(config=ContextParallelConfig(...))` splits one
generation's tokens across processes (Ulysses or ring attention). Each process then runs every block on
its own slice of the sequence, and the attention processors exchange what attention needs.

What that means for the methods:
- Caching (FORA, TaylorSeer, any CachingMethod that keeps whole sub-layer outputs) runs per process:
  each keeps the outputs of its own slice. Its schedule is the step counter, the same on every process,
  so every process computes and reuses the same sub-layers and the attention exchanges still pair up.
  Adaptive steps (`threshold`) measure the change of the input over the whole sequence: the two sums
  of the relative L1 change are added over the processes (one all-reduce per step) before the one
  comparison, so every process takes the same decision, the one a single process would take.
- Methods that choose or pool tokens by their place in the whole image (ToMe, SiTo, ToDo, ToCa, DuCa)
  are refused with an error naming why and what runs: each process holds only a slice of the tokens.
"""

from __future__ import annotations

from typing import Any

import torch


def context_parallel(model: torch.nn.Module) -> Any:
    """diffusers' ContextParallelConfig of a denoiser that has it enabled (set up: its mesh is built),
    else None."""
    from diffaccel.pipelines import unwrap

    config = getattr(unwrap(model), "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_flattened_mesh", None) is None:
        return None
    return cp


def group_of(cp: Any) -> Any:
    """The process group over which a context-parallel denoiser splits its tokens."""
    return cp._flattened_mesh.get_group()


def refusals(methods: list) -> list[tuple[str, str]]:
    """(method, why) for each method that cannot run under context parallelism."""
    return [(m.name, why) for m in methods if (why := m.context_parallel_refusal())]


def refusal_message(refused: list[tuple[str, str]], methods_running: list[str]) -> str:
    reasons = "; ".join(f"{name}: {why}" for name, why in refused)
    return (f"{', '.join(n for n, _ in refused)} cannot run on a denoiser with diffusers' context parallelism "
            f"(its tokens are split across processes): {reasons}. Under context parallelism these run: "
            f"{', '.join(methods_running)} (docs/scale.md)")


def runs_under_context_parallelism() -> list[str]:
    """The registered methods that run under context parallelism at their defaults."""
    from .methods import available_methods, method_class

    return [n for n in available_methods() if method_class(n)().context_parallel_refusal() is None]


def sum_over(group: Any, *values: torch.Tensor) -> torch.Tensor:
    """The values, stacked and summed over the processes of `group` (one all-reduce)."""
    import torch.distributed as dist

    stacked = torch.stack([v.float() for v in values])
    dist.all_reduce(stacked, group=group)
    return stacked
