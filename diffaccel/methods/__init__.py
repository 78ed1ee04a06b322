"""Methods: one file each, registered by name."""

from .base import MethodConfig, SiteCall, available_methods, method_class
from .fora import FORAConfig
from .sito import SiToConfig
from .todo import ToDoConfig
from .tome import ToMeConfig

__all__ = ["FORAConfig", "MethodConfig", "SiToConfig", "SiteCall", "ToDoConfig", "ToMeConfig", "available_methods", "method_class"]
