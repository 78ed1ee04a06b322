"""diffaccel's nodes for ComfyUI: copy or link this folder into ComfyUI's `custom_nodes/`, with diffaccel
installed in ComfyUI's Python environment (`pip install diffaccel`, or `pip install -e <this repo>`)."""

from diffaccel.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
