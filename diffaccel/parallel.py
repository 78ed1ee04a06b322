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
- ToDo pools keys and values where Ulysses attention has gathered the whole sequence (for its share of
  the heads): each process pools the whole image's keys over the whole grid, as one process does. The
  gathered sequence is the processes' slices one after another; where a slice is [text, image] (Flux)
  the keys and values are first put back in the sequence's own order (attention does not depend on
  the order of the keys). Ring attention hands each attention call one slice of the keys: refused.
- ToCa and DuCa (Ulysses) score the whole sequence on every process (the slices' scores gathered, the
  attention statistics summed over the head groups) and pick the fresh tokens one process would; each
  process computes the picks in its slice, padded to the most any process picked (Ulysses exchanges
  equal numbers of queries), the padding's outputs thrown away (`TokenwiseCache._refresh_slice`).
- ToMe and SiTo, which merge or prune by place and similarity across the whole image, are refused with
  an error naming why and what runs, as is what is not done here (ring attention for the token
  methods, ToCa's "entropy" score and token-wise forecasts).
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


def refusals(methods: list, cp: Any) -> list[tuple[str, str]]:
    """(method, why) for each method that cannot run under the context parallelism `cp`."""
    return [(m.name, why) for m in methods if (why := m.context_parallel_refusal(cp))]


def refusal_message(refused: list[tuple[str, str]], methods_running: list[str]) -> str:
    reasons = "; ".join(f"{name}: {why}" for name, why in refused)
    return (f"{', '.join(n for n, _ in refused)} cannot run on a denoiser with diffusers' context parallelism "
            f"(its tokens are split across processes): {reasons}. Under this context parallelism these run: "
            f"{', '.join(methods_running)} (docs/scale.md)")


def runs_under_context_parallelism(cp: Any, compiled: bool = False) -> list[str]:
    """The registered methods that run under the context parallelism `cp` at their defaults (in a
    compiled denoiser: the caching methods that select no tokens)."""
    from .methods import available_methods, method_class

    names = []
    for n in available_methods():
        try:
            config = method_class(n)()
        except (TypeError, ValueError):  # a registered method without defaults for every field
            continue
        if config.context_parallel_refusal(cp) is None and not (compiled and selects_tokens(config)):
            names.append(n)
    return names


def ring(cp: Any) -> bool:
    """Whether `cp` passes keys and values around a ring (each attention call then sees one slice of
    them) rather than gathering the whole sequence per head group (Ulysses)."""
    return (getattr(cp, "ring_degree", 1) or 1) > 1


def selects_tokens(config: Any) -> bool:
    """Whether a method chooses or pools tokens (every method but the caching ones that keep whole
    outputs)."""
    return not config.caches or config.reduces_tokens


def unequal_slices(cp: Any) -> str | None:
    """Why a method built on equal slices refuses `cp`, where it may give the processes slices of unequal
    length (diffusers' ulysses_anything / ring_anything); else None."""
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        return "slices of unequal length (ulysses_anything / ring_anything) are not done: it runs on equal slices"
    return None


def gather_along(group: Any, t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every process's `t` (of one shape) concatenated along `dim` in process order: the whole
    sequence's values where each process holds a slice."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def rank_in(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def sum_over(group: Any, *values: torch.Tensor) -> torch.Tensor:
    """The values, stacked and summed over the processes of `group` (one all-reduce)."""
    import torch.distributed as dist

    stacked = torch.stack([v.float() for v in values])
    dist.all_reduce(stacked, group=group)
    return stacked
