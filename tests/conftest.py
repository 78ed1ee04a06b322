import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=FutureWarning)

from diffaccel.tiny import tiny_case  # noqa: E402


@pytest.fixture
def make_case():
    """Build a fresh tiny pipeline of a family."""
    return tiny_case
