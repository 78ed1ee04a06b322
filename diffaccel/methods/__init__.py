"""Methods: one file each, registered by name."""

from .base import MethodConfig, SiteCall, available_methods, method_class
from .duca import DuCaConfig
from .fora import FORAConfig
from .sito import SiToConfig
from .toca import ToCaConfig
from .todo import ToDoConfig
from .tome import ToMeConfig

__all__ = ["DuCaConfig", "FORAConfig", "MethodConfig", "SiToConfig", "SiteCall", "ToCaConfig", "ToDoConfig", "ToMeConfig", "available_methods", "method_class"]
