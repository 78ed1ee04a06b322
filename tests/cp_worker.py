"""One process of the context-parallel test (tests/test_scale.py runs two with torchrun, gloo on the
CPU): accelerated tiny pipelines under diffusers' Ulysses context parallelism against the same settings
on one process, and the methods that are refused there. Writes what it saw as JSON to argv[2].<rank>."""

import json
import sys
import warnings

import torch
import torch.distributed as dist

from diffaccel import accelerate_pipeline, describe, remove_acceleration
from diffaccel.api import installation
from diffaccel.testing import snapshot, tiny_case

RUNS = {  # label -> method spec: these run under context parallelism
    "fora": "fora",
    "taylorseer": {"method": "taylorseer", "interval": 3, "warmup": 1},
    "fora_hermite": {"method": "fora", "interval": 2, "forecast": "hermite", "order": 1},
    "fora_adaptive": {"method": "fora", "interval": 4, "threshold": 0.15},
    "todo": {"method": "todo", "factor": 2},
    "todo_fora": [{"method": "todo", "factor": 2, "mode": "avg"}, "fora"],
    "todo_adaptive_cfg": [{"method": "todo", "factor": 2}, {"method": "fora", "interval": 4, "threshold": 0.15}],
    "toca": "toca",  # the "change" score, cells, staleness
    "toca_attention": {"method": "toca", "score": "attention", "cell": 0, "fresh_ratio": 0.2},
    "toca_random_cfg": {"method": "toca", "score": "random", "interval": 2},
    "duca": "duca",  # the "vnorm" score, whole blocks on aggressive steps
    "duca_sublayers": {"method": "duca", "aggressive": "sublayers", "score": "attention"},
}
GUIDED = {"todo_adaptive_cfg", "toca_random_cfg"}  # with classifier-free guidance: two denoiser calls per step
REFUSED = {"tome": "tome", "sito": "sito", "toca_entropy": {"method": "toca", "score": "entropy"},
           "toca_forecast": {"method": "toca", "forecast": "taylor", "order": 1}}
STEPS = 8


def main() -> None:
    family, out = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    if not torch.accelerator.device_count():
        # diffusers' enable_parallelism divides the rank by the accelerator count to pick a device
        torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    case = tiny_case(family)
    result: dict = {"rank": rank, "world": world, "runs": {}}

    def run(label=""):
        return case.run(steps=STEPS, guidance=label in GUIDED)

    def decisions():
        tracker = installation(case.pipe).denoisers[0].tracker
        return {str(k): v for k, v in sorted(tracker.decisions.items())}

    single = {"baseline": run(), "baseline_cfg": run(next(iter(GUIDED)))}
    single_decisions = {}
    for label, spec in RUNS.items():
        accelerate_pipeline(case.pipe, spec)
        single[label] = run(label)
        single_decisions[label] = decisions()
        remove_acceleration(case.pipe)

    case.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    base = run()
    result["runs"]["baseline"] = {"max_diff": float((base - single["baseline"]).abs().max()),
                                  "scale": float(single["baseline"].abs().max())}
    for label, spec in RUNS.items():
        accelerate_pipeline(case.pipe, spec)
        out_cp = run(label)
        base_single = single["baseline_cfg" if label in GUIDED else "baseline"]
        if label == "toca":
            result["describe"] = str(describe(case.pipe))
        result["runs"][label] = {"max_diff": float((out_cp - single[label]).abs().max()),
                                 "acted": float((single[label] - base_single).abs().max()),
                                 "decisions": decisions(), "single_decisions": single_decisions[label]}
        remove_acceleration(case.pipe)

    before = snapshot(case.pipe)
    result["refused"] = {}
    for label, spec in REFUSED.items():
        try:
            accelerate_pipeline(case.pipe, spec)
            message = None
            remove_acceleration(case.pipe)
        except ValueError as e:
            message = str(e)
        result["refused"][label] = {"message": message, "unchanged": snapshot(case.pipe) == before}

    # ring attention: ToDo and ToCa are refused, FORA is not
    ringed = tiny_case(family, seed=2)
    ringed.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    try:
        accelerate_pipeline(ringed.pipe, ["todo", "toca"])
        result["ring_todo"] = None
    except ValueError as e:
        result["ring_todo"] = str(e)
    accelerate_pipeline(ringed.pipe, "fora")
    result["ring_fora"] = installation(ringed.pipe) is not None

    # slices of unequal length (ulysses_anything): the token methods are refused, caching is not
    anything = tiny_case(family, seed=4)
    anything.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world,
                                                                              ulysses_anything=True))
    result["uneven"] = {}
    for name in ("todo", "toca", "duca", "fora"):
        try:
            accelerate_pipeline(anything.pipe, name)
            remove_acceleration(anything.pipe)
            result["uneven"][name] = None
        except ValueError as e:
            result["uneven"][name] = str(e)

    # a compiled denoiser: token selections under context parallelism refused before the first step
    compiled = tiny_case(family, seed=5)
    compiled.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    accelerate_pipeline(compiled.pipe, [{"method": "todo", "factor": 2}, "fora"])
    compiled.pipe.transformer.compile()
    try:
        compiled.run(steps=STEPS, guidance=False)
        result["compiled"] = None
    except RuntimeError as e:
        result["compiled"] = str(e)

    # context parallelism enabled after the acceleration: read at the next run's first call
    after = tiny_case(family, seed=3)
    accelerate_pipeline(after.pipe, RUNS["toca"])
    alone = after.run(steps=STEPS, guidance=False)
    after.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    result["enabled_after"] = float((after.run(steps=STEPS, guidance=False) - alone).abs().max())

    # ... where a method cannot run there: refused at the first call
    later = tiny_case(family, seed=1)
    accelerate_pipeline(later.pipe, "tome")
    later.pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    try:
        later.run(steps=STEPS, guidance=False)
        result["refused_at_call"] = None
    except RuntimeError as e:
        result["refused_at_call"] = str(e)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
