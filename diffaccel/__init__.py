"""diffaccel: make diffusers pipelines faster without retraining.

    pipe = accelerate_pipeline(pipe, "tome", ratio=0.5)
    print(describe(pipe))
    remove_acceleration(pipe)
"""

from diffaccel.pipelines import UnsupportedModelError, supported_families

from .api import accelerate_pipeline, remove_acceleration, reset
from .describe import Description, describe
from .methods import (
                      DuCaConfig,
                      FORAConfig,
                      MethodConfig,
                      SiToConfig,
                      ToCaConfig,
                      ToDoConfig,
                      ToMeConfig,
                      available_methods,
)
from .policy import Constant, Cosine, Linear, Piecewise, Policy, Rule, Selector, Window
from .reference import load_reference_pipeline

__version__ = "0.1.0"

__all__ = [
    "Constant", "Cosine", "Description", "DuCaConfig", "FORAConfig", "Linear", "MethodConfig", "Piecewise", "Policy", "Rule", "Selector",
    "SiToConfig", "ToCaConfig", "ToDoConfig", "ToMeConfig", "UnsupportedModelError", "Window", "accelerate_pipeline",
    "available_methods", "describe", "load_reference_pipeline", "remove_acceleration", "reset", "supported_families",
]
