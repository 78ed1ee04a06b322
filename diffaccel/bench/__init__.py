"""`diffaccel bench`: speed and fidelity of the methods side by side with the peers, in one run.

One suite per module, one subcommand each:
- `fidelity` (fidelity.py): whole pipeline runs (the trained reference models, or any pipeline):
  every method and every peer at several strengths against the baseline of the same seeds: latency,
  FLOPs, peak memory, PSNR / SSIM / MS-SSIM, caption following; JSON, Markdown and Pareto plots;
- `unet` (unet.py): per denoiser call on the SD 1.5 U-Net architecture, our token methods beside tomesd;
- `tokens` (tokens.py): per denoiser call on PixArt-alpha / Flux architectures, the token methods;
- `caching` (caching.py): whole runs of the caching methods on PixArt-alpha / Flux architectures;
- `flux-peers` (flux_peers.py): Euler runs on the Flux architecture beside cache-dit and diffusers' caches;
- `report` (report.py): the Markdown table and the plots again from a saved JSON record.
"""

from __future__ import annotations

import argparse

import torch

from . import caching, fidelity, flux_peers, report, tokens, unet
from .archs import caching_arch

__all__ = ["add_bench_parser", "caching_arch"]
SUITES = (fidelity, unet, tokens, caching, flux_peers)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    record = args.suite(args)
    if args.out:
        written = report.write(record, args.out)
        print("wrote " + ", ".join(str(p) for p in written))
    return 1 if record.get("error") else 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed and fidelity of the methods beside the peers (subcommands: "
                                     + ", ".join(s.NAME for s in SUITES) + ", report)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = p.add_subparsers(dest="suite_name", required=True, metavar="SUITE")
    for suite in SUITES:
        sp = suite.add_parser(suites)
        sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
        sp.add_argument("--out", help="write the JSON record here (fidelity: also the .md table and .png plots "
                                      "beside it)")
        sp.set_defaults(func=_run, suite=suite.run)
    report.add_parser(suites)
