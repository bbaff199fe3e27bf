"""pytest configuration of the benchmark suites (``pytest bench/ --benchmark-only``).

Options (see bench/README.md):

  --resbm-grid auto|full|cpu     kernel shape grid (auto: full on a GPU, the CPU-sized subset on the CPU)
  --resbm-compile slice|all|none which shapes get the torch.compile baseline (slice: N=16384 on a GPU)
  --resbm-budget-s SECONDS       skip (with that reason) every benchmark that would start after
                                 SECONDS of the session (also RESBM_BENCH_BUDGET_S); 0 = no budget
  --resbm-cpu-threads N          torch threads for CPU timings (default 1)
  --resbm-pipeline-reps / --resbm-pipeline-steps / --resbm-pipeline-warmup / --resbm-bandwidths

Hooks: the machine description (CPU/GPU model, torch/triton versions, NVML
telemetry, load average) goes into pytest-benchmark's ``machine_info``;
cross-benchmark numbers (kernel speedups over eager and torch.compile,
pipeline throughput retained vs the unlimited link) are added to each
benchmark's ``extra_info`` in the JSON once every benchmark has run.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench helpers import each other

import benchlib  # noqa: E402

_SESSION_START = time.monotonic()


def pytest_addoption(parser):
    group = parser.getgroup("resbm", "resbm_kernels benchmarks")
    group.addoption("--resbm-grid", default="auto", choices=("auto", "full", "cpu"),
                    help="kernel shape grid: full on a GPU, the CPU-sized subset on the CPU (auto)")
    group.addoption("--resbm-compile", default="slice", choices=("slice", "all", "none"),
                    help="torch.compile baseline shapes: slice = N=16384 only on a GPU, every CPU shape")
    group.addoption("--resbm-budget-s", type=float, default=float(os.environ.get("RESBM_BENCH_BUDGET_S", "0") or 0),
                    help="skip benchmarks that would start after this many seconds (0 = no limit)")
    group.addoption("--resbm-cpu-threads", type=int, default=1,
                    help="torch intra-op threads for CPU benchmarks (default 1: see bench/README.md)")
    group.addoption("--resbm-pipeline-reps", type=int, default=5,
                    help="rounds over every (bandwidth, variant) pipeline point")
    group.addoption("--resbm-pipeline-steps", type=int, default=3, help="measured optimizer steps per point and round")
    group.addoption("--resbm-pipeline-warmup", type=int, default=1, help="unmeasured steps before each point's steps")
    group.addoption("--resbm-bandwidths", default="unlimited,1gbit,200mbit,80mbit,10mbit",
                    help="comma-separated tc tbf rates for the pipeline benchmarks")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # a `timeout` (SIGTERM) ends the session like Ctrl-C, so pytest-benchmark still writes its JSON
    signal.signal(signal.SIGTERM, _interrupt)
    # On a shared CPU an intra-op thread pool turns every parallel op into a wait
    # for a descheduled thread (a 4096 x 16 payload write: 100 ms with 2 threads on
    # this 2-core machine under load, 0.2 ms with 1), so CPU timings use one thread.
    if not benchlib.is_gpu(benchlib.device()):
        import torch

        torch.set_num_threads(max(1, config.getoption("--resbm-cpu-threads")))


def elapsed_s() -> float:
    return time.monotonic() - _SESSION_START


@pytest.fixture(autouse=True)
def _time_budget(request):
    budget = request.config.getoption("--resbm-budget-s")
    if budget and elapsed_s() > budget:
        pytest.skip(f"time budget exhausted: {elapsed_s():.0f} s of --resbm-budget-s={budget:.0f} s used "
                    "(items run in priority order; rerun with a larger budget or a narrower -k)")


@pytest.fixture(scope="session")
def bench_device():
    return benchlib.device()


@pytest.fixture(scope="session")
def copy_bw(bench_device):
    """Device-to-device copy bandwidth, measured once per session (read + write bytes)."""
    return benchlib.copy_bandwidth(bench_device)


@pytest.fixture(scope="session")
def matmul_rate(bench_device):
    """Dense matmul throughput, measured once per session (the roofline's compute side)."""
    return benchlib.matmul_throughput(bench_device)


def pytest_collection_modifyitems(config, items):
    """Kernel items run in priority order (see test_bench_kernels.priority), so
    a time budget cuts the least important shapes; other items keep their order."""
    kernel = [(i, it) for i, it in enumerate(items) if hasattr(it, "callspec") and "kcase" in it.callspec.params]
    if not kernel:
        return
    slots = [i for i, _ in kernel]
    ordered = sorted((it for _, it in kernel), key=lambda it: it.callspec.params["kcase"].priority)
    for slot, it in zip(slots, ordered):
        items[slot] = it


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(benchlib.machine_description(benchlib.device()))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Cross-benchmark numbers, computed once every benchmark has run."""
    rows = output_json.get("benchmarks", [])
    kernels, pipes = {}, {}
    for b in rows:
        info = b.get("extra_info", {})
        if info.get("suite") == "kernels":
            kernels.setdefault(_kernel_key(info), {})[info["backend"]] = info["median_s"]
        elif info.get("suite") == "pipeline" and "tokens_per_s" in info:
            pipes[(info["stages"], info["bandwidth"], info["variant"])] = info["tokens_per_s"]
    for b in rows:
        info = b.get("extra_info", {})
        if info.get("suite") == "kernels":
            same = kernels.get(_kernel_key(info), {})
            for base in ("eager", "compile"):
                t = same.get(base)
                info[f"speedup_vs_{base}"] = (t / info["median_s"]) if t else None
        elif info.get("suite") == "pipeline" and "tokens_per_s" in info:
            unl = pipes.get((info["stages"], "unlimited", info["variant"]))
            unc = pipes.get((info["stages"], info["bandwidth"], "uncompressed"))
            info["retained_vs_unlimited"] = info["tokens_per_s"] / unl if unl else None
            info["speedup_vs_uncompressed"] = info["tokens_per_s"] / unc if unc else None
    output_json["resbm"] = dict(
        session_s=round(elapsed_s(), 1),
        triton_autotune=os.environ.get("RESBM_TRITON_AUTOTUNE", "1").strip() != "0",
        env={name: value for name, value in sorted(os.environ.items()) if name.startswith("RESBM_")},  # switches
        argv=sys.argv[1:],
        budget_s=config.getoption("--resbm-budget-s"),
        grid=config.getoption("--resbm-grid"),
        compile=config.getoption("--resbm-compile"),
    )


def _kernel_key(info):
    return (info["pass"], info["N"], info["d"], info["k"], info["bits"])
