"""describe(pipe): the sites, what acts where, the plan over the steps, and what the last run did."""

from __future__ import annotations

from typing import Any

from diffaccel.pipelines import adapter_for

from .api import _denoisers, installation
from .parallel import context_parallel
from .runtime import SiteHook

DEFAULT_PLAN_STEPS = 50


class Description(dict):
    """A plain dict (JSON-ready) that prints as a table."""

    def __str__(self) -> str:
        return render_table(self)


def _ranges(plan: list[str]) -> str:
    """['ratio=0.5', 'ratio=0.5', '-'] -> 'ratio=0.5 @0-1'."""
    parts, start = [], 0
    for i in range(1, len(plan) + 1):
        if i == len(plan) or plan[i] != plan[start]:
            if plan[start] != "-":
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                parts.append(f"{plan[start]} @{span}")
            start = i
    return "; ".join(parts) if parts else "idle"


def describe(pipe: Any, num_steps: int | None = None) -> Description:
    """Which sites exist, which act, with what, the policy's plan at each step, and (after a run)
    the tokens each site computed at each step."""
    inst = installation(pipe)
    members, _ = _denoisers(pipe)
    if inst is not None:
        steps = num_steps or inst.clock.num_steps or DEFAULT_PLAN_STEPS
    else:
        steps = num_steps or DEFAULT_PLAN_STEPS
    out = Description(
        accelerated=inst is not None,
        methods=[m.to_dict() for m in inst.methods] if inst else [],
        plan_steps=steps,
        denoisers=[],
    )
    out["cost_model"] = _cost_model(inst, members)
    by_model = {id(st.model): st for st in inst.denoisers} if inst else {}
    for attr, model in members:
        st = by_model.get(id(model))
        adapter = st.adapter if st else adapter_for(model)
        sites = st.sites if st else adapter.sites
        hooks: dict[int, SiteHook] = {h.site.index: h for h in st.hooks} if st else {}
        methods = inst.methods if inst else []
        last = st.tracker.last if st and st.tracker else None
        log = st.tracker.log if st and st.tracker else {}
        rows = []
        for site in sites:
            hook = hooks.get(site.index)
            row: dict[str, Any] = dict(name=site.name, kind=site.kind, depth=site.depth, level=site.level,
                                       layout=site.layout, grid=list(site.grid(last.geometry)) if last and
                                       last.geometry else None, methods={})
            for m in methods:
                reason = m.unsupported(site)
                if reason is None and not m.effective_policy().selects(site):
                    reason = "not selected by the policy"
                entry: dict[str, Any] = {"acts": hook is not None and m in hook.methods, "reason": reason}
                if entry["acts"]:
                    i = hook.methods.index(m)
                    entry["plan"] = [m.planned(site, s, steps, hook.params_at(s, steps)[i]) for s in range(steps)]
                row["methods"][m.name] = entry
            done = {s: log[s][site.name] for s in sorted(log) if site.name in log[s]}
            row["last_run"] = {s: {"tokens": t, "computed": c, "keys_values": kv} for s, (t, c, kv) in done.items()}
            notes = st.tracker.notes if st and st.tracker else {}
            row["last_run_note"] = notes.get(site.name)
            rows.append(row)
        tracker = st.tracker if st else None
        cache = None
        if inst is not None and any(m.caches for m in inst.methods):
            cache = dict(entries=0, bytes=0, peak_bytes=0) if tracker is None else dict(
                entries=len(tracker.cache), bytes=tracker.cache_bytes(), peak_bytes=tracker.cache_peak_bytes)
        decisions = tracker.decisions if tracker is not None else {}
        cp = context_parallel(model)
        out["denoisers"].append(dict(
            attr=attr, family=adapter.variant(), cfg_layout=adapter.cfg_layout, cache=cache,
            context_parallel=None if cp is None else dict(processes=cp.ulysses_degree * cp.ring_degree,
                                                          ulysses=cp.ulysses_degree, ring=cp.ring_degree),
            steps={s: dict(v) for s, v in sorted(decisions.items())},
            whole_blocks=st.skippable_blocks if st else [],
            last_call=None if last is None else dict(step=last.step, num_steps=last.num_steps, branch=last.branch,
                                                     batch=last.batch, geometry=None if last.geometry is None
                                                     else vars(last.geometry).copy()),
            sites=rows))
    return out


def _cost_model(inst: Any, members: list) -> dict | None:
    """Which calibration the cost model uses (diffaccel.cost), where an installed method consults it:
    that of the first denoiser's device."""
    if inst is None or not any(getattr(m, "uses_cost_model", lambda: False)() for m in inst.methods):
        return None
    from .cost import calibration_for

    param = next((p for _, model in members for p in model.parameters()), None)
    cal = calibration_for(param.device if param is not None else "cpu")
    return dict(device=cal.device, device_type=cal.device_type, origin=cal.origin, measured=cal.measured,
                date=cal.date, command=cal.command, path=cal.path, flops=cal.flops, bandwidth=cal.bandwidth,
                launch=cal.launch, summary=cal.summary())


def render_table(d: dict) -> str:
    lines = []
    names = [m["method"] for m in d["methods"]]
    head = "accelerated with " + ", ".join(names) if names else "not accelerated"
    lines.append(f"diffaccel: {head}; plan over {d['plan_steps']} steps")
    if d.get("cost_model"):
        lines.append(d["cost_model"]["summary"])
    for den in d["denoisers"]:
        lines.append(f"\n[{den['attr']}] {den['family']}  (CFG layout: {den['cfg_layout']})")
        if den.get("context_parallel"):
            cp = den["context_parallel"]
            lines.append(f"context parallelism: {cp['processes']} processes (Ulysses {cp['ulysses']} x ring "
                         f"{cp['ring']}); each holds a slice of the tokens: the token counts are this process's")
        if den.get("cache") is not None:
            c = den["cache"]
            lines.append(f"cache: {c['entries']} outputs held, {c['bytes'] / 2**20:.1f} MiB now; "
                         f"peak {c['peak_bytes'] / 2**20:.1f} MiB in the last run (released when a run ends)")
        if den.get("steps"):
            steps = den["steps"]
            computed = [s for s, v in steps.items() if v["decision"] == "compute"]
            cached = [s for s, v in steps.items() if v["decision"] == "cached"]
            lines.append(f"adaptive steps ({steps[next(iter(steps))]['method']}, last run): computed "
                         f"{_steps(computed)}; cached {_steps(cached)}")
        if den.get("whole_blocks"):
            lines.append(f"whole-block reuse: {len(den['whole_blocks'])} blocks hand back their stored output on "
                         "aggressive steps without running")
        header = ["site", "kind", "depth", "level", "grid"] + names + ["last run (tokens -> computed)"]
        table = []
        for row in den["sites"]:
            cells = [row["name"], row["kind"], str(row["depth"]), str(row["level"]),
                     "x".join(map(str, row["grid"])) if row["grid"] else "-"]
            for n in names:
                e = row["methods"][n]
                if e["acts"]:
                    cells.append(_ranges([_fmt(p) for p in e["plan"]]))
                else:
                    cells.append(f"- ({e['reason']})" if e["reason"] else "-")
            runs = row["last_run"]
            if runs:
                t = [v["tokens"] for v in runs.values()]
                c = [v["computed"] for v in runs.values()]
                kv = [v["keys_values"] for v in runs.values()]
                txt = f"{max(t)} -> {min(c)}..{max(c)} over {len(runs)} steps"
                if c.count(0):
                    txt += f", {c.count(0)} reused"
                if min(kv) != max(t):
                    txt += f", kv {min(kv)}"
                if row.get("last_run_note"):
                    txt += f" ({row['last_run_note']})"
                cells.append(txt)
            else:
                cells.append(f"- ({row['last_run_note']})" if row.get("last_run_note") else "-")
            table.append(cells)
        widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
        for r in [header] + table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _steps(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    if not steps:
        return "none"
    parts, start = [], steps[0]
    for a, b in zip(steps, steps[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if a == start else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def _fmt(params: dict | None) -> str:
    if params is None:
        return "-"
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
