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

# Under pytest-xdist, share the cores between the workers: each torch process otherwise starts
# one intra-op thread per core (16 workers x 16 threads on a 16-core GPU machine).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# RESBM_TEST_REPORT=<file>: one line per finished test ("outcome seconds nodeid"), written and
# flushed as each test ends (on the xdist controller), so a run cut short by a time limit
# still says what passed, failed and took the time (bench/gpu_session.sh summarises it)
_REPORT = os.environ.get("RESBM_TEST_REPORT")


def pytest_runtest_logreport(report):
    if not _REPORT or os.environ.get("PYTEST_XDIST_WORKER"):  # workers' reports reach the controller too
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        with open(_REPORT, "a") as f:
            f.write(f"{report.outcome} {report.duration:.2f} {report.nodeid}\n")
