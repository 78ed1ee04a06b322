"""Methods: one file each, registered by name (see `base` for the protocol)."""

from ..call import CacheEntry, Context, Plan, SiteCall
from .base import (
           CachingMethod,
           MethodConfig,
           Option,
           TokenMethod,
           available_methods,
           method_class,
           option,
           register,
)
from .duca import DuCaConfig
from .fora import FORAConfig
from .sito import SiToConfig
from .taylorseer import TaylorSeerConfig
from .toca import ToCaConfig
from .todo import ToDoConfig
from .tome import ToMeConfig

__all__ = ["CacheEntry", "CachingMethod", "Context", "DuCaConfig", "FORAConfig", "MethodConfig", "Plan", "SiToConfig",
           "SiteCall", "TaylorSeerConfig", "ToCaConfig", "ToDoConfig", "ToMeConfig", "TokenMethod", "available_methods", "method_class",
           "register", "Option", "option"]
