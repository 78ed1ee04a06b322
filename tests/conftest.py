import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors in Triton's interpreter (must be set before any @triton.jit runs)
os.environ.setdefault("TRITON_INTERPRET", "1")
# a calibration the developer ran on this machine (`diffaccel calibrate`) must not change what tests see
os.environ["DIFFACCEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffaccel-cache-")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=FutureWarning)

from diffaccel.testing import tiny_case  # noqa: E402


@pytest.fixture
def make_case():
    """Build a fresh tiny pipeline of a family."""
    return tiny_case


@pytest.fixture(scope="session")
def smoke_weights(tmp_path_factory):
    """A smoke run of the training script (0.2% of the steps): real folders, untrained weights."""
    from diffaccel.reference.train import main

    out = tmp_path_factory.mktemp("reference")
    assert main(["--out", str(out), "--scale", "0.002", "--latents", "16", "--quiet"]) == 0
    return out
