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


# Under `-n auto --dist loadfile` each file runs whole on one worker, and pytest-xdist hands
# out files largest test count first by default, which left the few slowest files (seconds on
# the 2-core CI machine, 2026-11-27: sanitizers 249, triton_backend 185, triton_static 138,
# cuda_backend 138, pipeline 112, convergence_smoke 86, random_cases 65; the rest under 20)
# for last: one worker ran test_sanitizers alone for minutes at the end. Longest first instead
# (a schedule's speed only: any order gives the same results).
LONGEST_FIRST = ("test_sanitizers.py", "test_triton_backend.py", "test_triton_static.py", "test_cuda_backend.py",
                 "test_pipeline.py", "test_convergence_smoke.py", "test_random_cases.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6: keep the collection's file order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
