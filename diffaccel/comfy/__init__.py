"""diffaccel's ComfyUI nodes: every registered method as a node that takes a MODEL and returns an
accelerated clone, plus a Policy node, a Load acceleration config node and an Acceleration report node.

ComfyUI loads them from a folder in `custom_nodes/` whose `__init__.py` re-exports this module's
mappings (the project ships one: `comfyui/diffaccel/`). Importing this module does not import ComfyUI;
the nodes use it when they run.
"""

from .nodes import build

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
