"""The supported families x methods table, computed from the adapters and the methods."""

from __future__ import annotations

from diffaccel.pipelines import ADAPTERS, UNetAdapter

from .methods.base import available_methods, method_class

MARK_BEGIN = "<!-- support-table:begin -->"
MARK_END = "<!-- support-table:end -->"


def _families():
    for adapter in ADAPTERS:
        names = ["SD 1.x/2.x", "SDXL"] if adapter is UNetAdapter else [adapter.family]
        for name in names:
            yield name, adapter


def _probe_sites(adapter: type) -> list:
    """Sites of the kinds the family has: its declared block children, else (families whose sites are
    found in the model, e.g. U-Nets) self-attention, cross-attention and feed-forward on image tokens."""
    probe = adapter.__new__(adapter)
    declared = [(kind, layout, rope[0] if rope else None)
                for _, children in adapter.blocks for kind, layout, *rope in children.values()]
    kinds = declared or [("self_attn", "image", None), ("cross_attn", "image", None), ("ff", "image", None)]
    return [probe.make_site("probe", kind, None, "probe", 0, layout, rope=rope) for kind, layout, rope in kinds]


def support_matrix() -> dict[str, dict[str, bool]]:
    """{family: {method: acts}}: whether a method, with its default policy, acts on some site the family
    has."""
    out = {}
    for name, adapter in _families():
        sites = _probe_sites(adapter)
        out[name] = {}
        for method in available_methods():
            config = method_class(method)()
            policy = config.effective_policy()
            out[name][method] = any(config.unsupported(s) is None and policy.selects(s) for s in sites)
    return out


def support_table() -> str:
    matrix = support_matrix()
    methods = available_methods()
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for family, row in matrix.items():
        lines.append(f"| {family} | " + " | ".join("yes" if row[m] else "not yet" for m in methods) + " |")
    return "\n".join(lines)
