"""Methods: one file each, registered by name."""

from .base import MethodConfig, SiteCall, available_methods, method_class
from .sito import SiToConfig
from .todo import ToDoConfig
from .tome import ToMeConfig

__all__ = ["MethodConfig", "SiToConfig", "SiteCall", "ToDoConfig", "ToMeConfig", "available_methods", "method_class"]
