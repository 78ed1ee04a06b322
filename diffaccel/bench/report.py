"""The benchmark's outputs: the JSON record (strict JSON: an infinite PSNR is written as null beside
`"identical": true`), a Markdown table, and Pareto plots (PNG): speed-up against PSNR and against
caption following, one marker per method and setting, each peer in its own colour, our front drawn.

`diffaccel bench report RECORD.json` draws them again from a saved record (the notebooks do the same
through `load`, `markdown` and `plot_pareto`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

OURS = "diffaccel"
# our methods in shades of one hue family each, peers in colours of their own
METHOD_COLOURS = {"tome": "#1f77b4", "todo": "#17becf", "sito": "#9467bd", "fora": "#2ca02c", "toca": "#bcbd22",
                  "duca": "#8c564b"}
COMPOSED_COLOUR = "#e377c2"
PEER_COLOURS = {"tomesd": "#d62728", "DeepCache": "#ff7f0e", "T-GATE": "#7f7f7f", "cache-dit": "#d62728",
                "diffusers": "#ff7f0e"}
PEER_MARKERS = "sDv^P*Xh"


# -- JSON ------------------------------------------------------------------------------------------


def _strict(value):
    """The record as strict JSON values: non-finite floats become None (rows keep `identical`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def dumps(record: dict) -> str:
    return json.dumps(_strict(record), indent=1, allow_nan=False) + "\n"


def load(path: str | Path) -> dict:
    """A saved record, with the PSNR of identical outputs infinite again."""
    record = json.loads(Path(path).read_text())
    for row in record.get("rows", []):
        if row.get("identical") and row.get("psnr") is None:
            row["psnr"] = math.inf
    return record


def write(record: dict, out: str | Path) -> list[Path]:
    """Write the record as JSON at `out`; a fidelity record also gets `<out stem>.md` and the plots
    `<out stem>_psnr.png` (and `_caption.png` when caption following was measured) beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(record) if record.get("suite") == "fidelity" else json.dumps(record, indent=2))
    written = [out]
    if record.get("suite") == "fidelity":
        md = out.with_suffix(".md")
        md.write_text(markdown(record) + "\n")
        written.append(md)
        for y in ("psnr", "caption_following"):
            if any(r.get(y) is not None for r in record["rows"][1:]):
                png = out.with_name(f"{out.stem}_{'psnr' if y == 'psnr' else 'caption'}.png")
                plot_pareto(record, png, y=y)
                written.append(png)
    return written


# -- figures ---------------------------------------------------------------------------------------


def ok_rows(record: dict) -> list[dict]:
    return [r for r in record["rows"][1:] if r.get("status") == "ok"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (higher is better in both), by x."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def _psnr(row: dict) -> float:
    """A row's PSNR, infinite where its images are the baseline's (stored as null in strict JSON)."""
    if row.get("identical"):
        return math.inf
    return row["psnr"] if row.get("psnr") is not None else -math.inf


def goal(record: dict, x: str = "speedup") -> dict:
    """Our goal: at every speed-up a peer reaches, one of our settings has a higher PSNR than that peer.
    For each peer row that ran: the best of ours at least as fast (by `x`), and whether it is better."""
    ours = [r for r in ok_rows(record) if r["family"] == OURS]
    checks = []
    idle = []
    for peer in ok_rows(record):
        if peer["family"] == OURS or peer.get(x) is None:
            continue
        if peer.get("identical"):  # it skipped nothing here: its speed-up is the machine's noise
            idle.append(peer["label"])
            continue
        rivals = [r for r in ours if r.get(x) is not None and r[x] >= peer[x]]
        best = max(rivals, key=_psnr, default=None)
        checks.append({"peer": peer["label"], x: peer[x], "psnr": peer["psnr"],
                       "ours": best and best["label"], "ours_" + x: best and best[x], "ours_psnr": best and best["psnr"],
                       "met": bool(best is not None and _psnr(best) > _psnr(peer))})
    return {"by": x, "met": all(c["met"] for c in checks) if checks else None,
            "peers_beaten": sum(c["met"] for c in checks), "peers": len(checks), "checks": checks,
            "identical_to_baseline": idle}


def _fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def markdown(record: dict) -> str:
    """The record as a Markdown table, with the goal's verdict and why any row did not run."""
    m = record.get("machine", {})
    head = [f"**{record['model']}** ({record['kind']}), {record['prompts']} prompts, {record['steps']} steps, "
            f"{record['size']}px, {record['dtype']}, on {m.get('gpu') or m.get('device', '?').upper()} "
            f"({m.get('threads')} threads) — `{record['command']}`", ""]
    caption = any(r.get("caption_following") is not None for r in record["rows"])
    cols = ["setting", "by", "speed-up", "FLOPs speed-up (denoiser)", "s/run", "peak MiB", "PSNR dB", "SSIM", "MS-SSIM"]
    cols += ["caption following"] if caption else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in record["rows"]:
        if r.get("status", "ok") != "ok":
            continue
        mem = r.get("peak_memory_bytes")
        cells = [r["label"], r["family"], _fmt(r.get("speedup"), ".2f") + "×", _fmt(r.get("flop_speedup"), ".2f") + "× ("
                 + _fmt(r.get("denoiser_flop_speedup"), ".2f") + "×)",
                 _fmt(r.get("seconds"), ".1f"), _fmt(None if mem is None else mem / 2**20, ".0f"),
                 _fmt(r.get("psnr"), ".2f"), _fmt(r.get("ssim"), ".4f"), _fmt(r.get("ms_ssim"), ".4f")]
        cells += [_fmt(r.get("caption_following"), ".3f")] if caption else []
        lines.append("| " + " | ".join(cells) + " |")
    out = head + lines
    if record.get("error"):
        out += ["", f"**Error**: {record['error']}."]
    skipped = [r for r in record["rows"] if r.get("status", "ok") != "ok"]
    if skipped:
        out += ["", "Not run:"] + [f"- {r['label']} — {r['status']}: {r['reason']}" for r in skipped]
    g = record.get("goal") or goal(record)
    if g["peers"]:
        verdict = "met" if g["met"] else "not met"
        out += ["", f"Goal (at every speed-up a peer reaches, one of our settings has a higher PSNR): **{verdict}**: "
                    f"one of ours is as fast and closer to the baseline for {g['peers_beaten']} of {g['peers']} peer "
                    "settings." + (" Not for:" if not g["met"] else "")]
        out += [f"- {c['peer']} ({c['speedup']:.2f}×, {_fmt(c['psnr'], '.2f')} dB): "
                + ("no setting of ours is as fast" if c["ours"] is None else
                   f"{c['ours']} ({c['ours_speedup']:.2f}×, {_fmt(c['ours_psnr'], '.2f')} dB)")
                for c in g["checks"] if not c["met"]]
    if g.get("identical_to_baseline"):
        out += ["", "Identical to the baseline (they skipped nothing at these settings; left out of the goal): "
                + ", ".join(g["identical_to_baseline"]) + "."]
    return "\n".join(out)


def _colour(row: dict) -> str:
    if row["family"] == OURS:
        return METHOD_COLOURS.get(row["method"], COMPOSED_COLOUR)
    return PEER_COLOURS.get(row["family"], "#000000")


def plot_pareto(record: dict, path: str | Path | None = None, y: str = "psnr", x: str = "speedup", ax=None):
    """Speed-up (`x`) against `y` ("psnr" or "caption_following"): every setting that ran, ours as
    circles coloured by method (compositions pink), each peer's methods as their own marker in the
    peer's colour; our Pareto front as a line. An output identical to the baseline (PSNR ∞) sits on
    the top edge. Saved as PNG at `path` when given; returns the matplotlib figure."""
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in ok_rows(record) if r.get(x) is not None and r.get(y) is not None]
    finite = [r[y] for r in rows if math.isfinite(r[y])] or [0.0]
    top = max(finite) + (2.0 if y == "psnr" else 0.02)

    def yval(r):
        return top if not math.isfinite(r[y]) else r[y]

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    peer_methods = sorted({(r["family"], r["method"]) for r in rows if r["family"] != OURS})
    markers = {pm: PEER_MARKERS[i % len(PEER_MARKERS)] for i, pm in enumerate(peer_methods)}
    seen = set()
    for r in rows:
        ours = r["family"] == OURS
        key = r["method"] if ours else r["family"] if r["method"].lower() in r["family"].lower() else (
            f"{r['family']} {r['method']}")
        if ours and r["method"] not in METHOD_COLOURS:
            key = "ours, composed"
        ax.scatter(r[x], yval(r), s=46, c=_colour(r), marker="o" if ours else markers[(r["family"], r["method"])],
                   edgecolors="black" if ours else "none", linewidths=0.5, zorder=3,
                   label=None if key in seen else key)
        seen.add(key)
        ax.annotate(r["label"].split(" ", 1)[1] if not ours and " " in r["label"] else r["label"], (r[x], yval(r)),
                    fontsize=5.5, xytext=(3, 2), textcoords="offset points", alpha=0.75)
    front = pareto_front([(r[x], yval(r)) for r in rows if r["family"] == OURS])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="#1f77b4", lw=1.2, alpha=0.6,
                zorder=2, label="our Pareto front")
    if y == "caption_following" and record["rows"][0].get(y) is not None:
        ax.axhline(record["rows"][0][y], color="grey", ls="--", lw=0.8, label="baseline")
    elif y == "psnr":
        ax.axhline(top, color="grey", ls=":", lw=0.8)
        ax.annotate("identical to the baseline", (ax.get_xlim()[0], top), fontsize=6, color="grey",
                    xytext=(2, 2), textcoords="offset points")
    ax.axvline(1.0, color="grey", ls="--", lw=0.8)
    m = record.get("machine", {})
    where = m.get("gpu") or f"CPU, {m.get('threads')} threads"
    ax.set_xlabel(("FLOPs speed-up" if x == "flop_speedup" else "speed-up (latency)") + " against the baseline")
    ax.set_ylabel({"psnr": "PSNR against the baseline (dB)", "caption_following": "caption following"}.get(y, y))
    ax.set_title(f"{record['model']} ({record['kind']}): {record['prompts']} prompts, {record['steps']} steps, "
                 f"{record['size']}px — {where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
            plt.close(fig)
    return fig


# -- `diffaccel bench report` ----------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    record = load(args.record)
    if record.get("suite") != "fidelity":
        raise SystemExit(f"{args.record}: not a fidelity record (its 'suite' is {record.get('suite')!r})")
    out = Path(args.out or args.record)
    for path in write(record, out):
        print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="the Markdown table and Pareto plots again from a saved fidelity record")
    p.add_argument("record", help="a JSON record written by `diffaccel bench fidelity --out`")
    p.add_argument("--out", default=None, help="where to write (default: over the record, .md/.png beside it)")
    p.set_defaults(func=cmd_report)
