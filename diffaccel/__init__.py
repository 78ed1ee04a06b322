"""diffaccel: make diffusers pipelines faster without retraining.

    pipe = accelerate_pipeline(pipe, "tome", ratio=0.5)
    print(describe(pipe))
    remove_acceleration(pipe)
"""

from diffaccel.pipelines import UnsupportedModelError, supported_families

from .api import accelerate_pipeline, is_accelerated, remove_acceleration, reset
from .calibration import calibrate
from .config import load_config, save_config
from .cost import Calibration
from .describe import Description, describe
from .methods import (
    CachingMethod,
    DuCaConfig,
    FORAConfig,
    MethodConfig,
    Option,
    SiToConfig,
    TaylorSeerConfig,
    ToCaConfig,
    ToDoConfig,
    TokenMethod,
    ToMeConfig,
    available_methods,
    option,
    register,
)
from .policy import Constant, Cosine, Linear, Piecewise, Policy, Rule, Selector, Window
from .reference import load_reference_pipeline

__version__ = "0.1.0"

__all__ = [
    "CachingMethod", "Calibration", "Constant", "Cosine", "Description", "DuCaConfig", "FORAConfig", "Linear", "MethodConfig",
    "Piecewise", "Policy", "Rule", "Selector", "SiToConfig", "TaylorSeerConfig", "ToCaConfig", "ToDoConfig", "ToMeConfig", "TokenMethod",
    "UnsupportedModelError", "Window", "accelerate_pipeline", "available_methods", "calibrate", "describe", "is_accelerated",
    "load_config", "load_reference_pipeline", "Option", "option", "register", "remove_acceleration", "reset", "save_config",
    "supported_families",
]
