import os
import pathlib
import sys

import torch

# tests import their helpers module directly
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Without a GPU the Triton kernels run under the interpreter. The variable must be set
# before any module decorates a kernel (triton.jit reads it then), so here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # pytest-xdist's marker, declared for runs without the plugin (see test_triton_static.py)
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one pytest-xdist worker")
