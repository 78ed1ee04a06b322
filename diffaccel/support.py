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


def support_matrix() -> dict[str, dict[str, bool]]:
    """{family: {method: acts}}: whether a method acts on the family's image-token sub-layers."""
    out = {}
    for name, adapter in _families():
        probe = adapter.__new__(adapter)
        out[name] = {}
        for method in available_methods():
            cls = method_class(method)
            site = probe.make_site("probe", "self_attn", None, "probe", 0, "image")
            out[name][method] = cls().unsupported(site) is None
    return out


def support_table() -> str:
    matrix = support_matrix()
    methods = available_methods()
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for family, row in matrix.items():
        lines.append(f"| {family} | " + " | ".join("yes" if row[m] else "not yet" for m in methods) + " |")
    return "\n".join(lines)
