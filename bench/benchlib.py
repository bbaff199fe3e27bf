"""Shared machinery of the benchmark suites: device choice, timing, the copy
bandwidth ceiling, GPU telemetry, and handing externally measured times to
pytest-benchmark.

Timing method (see bench/README.md):

- GPU: every timed call is bracketed by its own pair of CUDA events, all
  calls are enqueued back to back and synchronised once (as
  ``triton.testing.do_bench`` does); before each call the GPU is kept busy
  with ``torch.cuda._sleep`` so the host enqueues the call before the GPU
  reaches it, and the events measure device time rather than Python launch
  latency. Inputs rotate through enough buffer sets that the sets together
  exceed 4x the L2 cache, so no call finds its input in L2.
- CPU: ``time.perf_counter`` around each call, inputs rotated the same way
  against the last-level cache.
- Warm-up calls first (compilation, autotuning, allocator growth); the
  statistic reported is the median.

The per-call times become the benchmark's pytest-benchmark stats through
:data:`REPLAY`, a timer that replays them (``@pytest.mark.benchmark(timer=REPLAY)``
plus ``benchmark.pedantic(REPLAY.tick, rounds=len(times))``): pytest-benchmark's
min/median/mean/rounds columns are then exactly the measured per-call times.
"""

from __future__ import annotations

import math
import os
import pathlib
import platform
import statistics
import time

import torch

MiB = 1 << 20
GiB = 1 << 30


# ---- device -------------------------------------------------------------------------


def device() -> torch.device:
    """Where the kernel benchmarks run: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_gpu(dev) -> bool:
    return torch.device(dev).type == "cuda"


def sync(dev) -> None:
    if is_gpu(dev):
        torch.cuda.synchronize(dev)


def cache_bytes(dev) -> int:
    """L2 of a GPU, or the CPU's last-level cache (32 MiB if unknown)."""
    if is_gpu(dev):
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * MiB))
    best = 0
    for f in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best or 32 * MiB


def rotation(bytes_per_set: int, dev, *, at_least: int = 2, at_most: int = 16) -> int:
    """Number of input sets so that together they exceed 4x the cache."""
    need = math.ceil(4 * cache_bytes(dev) / max(bytes_per_set, 1)) + 1
    return max(at_least, min(at_most, need))


# ---- timing ---------------------------------------------------------------------------


SLEEP_CYCLES = 2_000_000  # ~1 ms at 2 GHz: the host enqueues the whole next call (op dispatch, checks,
# several launches: 0.1-0.3 ms) meanwhile, so no launch gap falls inside the timed window


def time_calls(call, dev, *, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``call(i)`` (i = 0, 1, ... selects the input set).

    ``warmup`` untimed calls first, then ``reps`` timed calls.
    """
    i = 0
    for _ in range(warmup):
        call(i)
        i += 1
    sync(dev)
    if is_gpu(dev):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        sleep = getattr(torch.cuda, "_sleep", None)
        for r in range(reps):
            if sleep is not None:
                sleep(SLEEP_CYCLES)
            starts[r].record()
            call(i)
            ends[r].record()
            i += 1
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return times


HOST_REPS = 20  # calls timed on the host per item


def host_times(call, dev, *, reps: int = HOST_REPS) -> list[float] | None:
    """Seconds the host spends in each of ``reps`` calls of ``call(i)`` while the
    GPU is kept busy (GPU only, else None): the Python, dispatch and launch cost
    a training loop pays per call whatever the kernels take. Each call is
    enqueued behind its own ~1 ms ``torch.cuda._sleep``, so an op that waited
    for the device inside would take ~1 ms or more here."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if not is_gpu(dev) or sleep is None:
        return None
    sync(dev)
    times = []
    for i in range(reps):
        sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize(dev)
    return times


def adaptive_reps(call, dev, *, target_s: float, lo: int, hi: int, warmup: int) -> tuple[int, float]:
    """Run the warm-up; return (reps that fill ``target_s``, one call's estimate)."""
    est = time_calls(call, dev, warmup=warmup, reps=1)[0]
    return max(lo, min(hi, int(target_s / max(est, 1e-7)))), est


def summary(times: list[float]) -> dict:
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), rounds=len(times))


class ReplayTimer:
    """A pytest-benchmark timer that replays measured durations.

    ``load(times)``, then ``benchmark.pedantic(REPLAY.tick, rounds=len(times))``:
    each round reads the clock before and after ``tick`` and sees exactly the
    next measured duration between the two readings.
    """

    __name__ = "resbm_replay_timer"  # what pytest-benchmark writes as options.timer

    def __init__(self):
        self._times: list[float] = []
        self._clock = 0.0
        self._before = True

    def load(self, times) -> None:
        self._times, self._clock, self._before = list(times), 0.0, True

    def tick(self) -> None:  # the benchmarked "function": the work was already done
        pass

    def __call__(self) -> float:
        if not self._before:
            if not self._times:
                raise RuntimeError("ReplayTimer: more rounds than loaded times")
            self._clock += self._times.pop(0)
        self._before = not self._before
        return self._clock

    def drained(self) -> bool:
        return not self._times


REPLAY = ReplayTimer()


def record(benchmark, times: list[float]) -> None:
    """Make ``times`` (seconds) this benchmark's pytest-benchmark stats."""
    if not times:
        raise ValueError("record: no times")
    REPLAY.load(times)
    benchmark.pedantic(REPLAY.tick, rounds=len(times), iterations=1, warmup_rounds=0)
    if not REPLAY.drained():
        raise RuntimeError("record: pytest-benchmark did not consume every measured time "
                           "(is the test marked @pytest.mark.benchmark(timer=REPLAY)?)")


# ---- ceilings ------------------------------------------------------------------------


def copy_bandwidth(dev) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    size = (1 * GiB) if is_gpu(dev) else (256 * MiB)
    if is_gpu(dev):
        free, _ = torch.cuda.mem_get_info(dev)
        size = min(size, free // 4)
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = time_calls(lambda i: dst.copy_(src), dev, warmup=2, reps=20 if is_gpu(dev) else 7)
    med = statistics.median(times)
    return dict(copy_bytes=size, copy_GBps=2 * size / med / 1e9, copy_median_s=med, copy_rounds=len(times))


def matmul_throughput(dev) -> dict:
    """Measured dense matmul rate (FLOP/s): a square GEMM big enough to run the
    tensor cores at their sustained rate (bf16, 8192^3, on a GPU; fp32, 1024^3,
    the CPU reference's math, on the CPU), timed as the kernels are. The
    compute side of the roofline: a pass's FLOPs at this rate take at least
    ``compute_floor_s``, which at k = d/32 can exceed the time its bytes take."""
    n, dtype = (8192, torch.bfloat16) if is_gpu(dev) else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=dev, dtype=dtype)
    times = time_calls(lambda i: torch.mm(a, b, out=out), dev, warmup=2, reps=10 if is_gpu(dev) else 3)
    med = statistics.median(times)
    return dict(matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."), matmul_median_s=med,
                matmul_TFLOPS=2 * n**3 / med / 1e12)


_SAME_SIZE_COPY: dict = {}


def same_size_copy_s(nbytes: int, dev) -> float:
    """Median seconds of a device-to-device copy that moves ``nbytes`` (read +
    write), timed as the kernels are (rotating buffers, sleep before each
    call): the fastest a pass of that size could be with its launch and ramp,
    which a large copy (``copy_bandwidth``) amortises away. Once per size on a
    2 % grid (within 1 %: the codecs' items differ by their small payloads)."""
    size = round(1.02 ** round(math.log(max(nbytes, 1), 1.02)))
    key = (size, str(dev))
    if key not in _SAME_SIZE_COPY:
        half = max(1, size // 2)
        sets = rotation(2 * half, dev)
        pairs = [(torch.zeros(half, dtype=torch.uint8, device=dev), torch.zeros(half, dtype=torch.uint8, device=dev))
                 for _ in range(sets)]
        times = time_calls(lambda i: pairs[i % sets][1].copy_(pairs[i % sets][0]), dev,
                           warmup=2, reps=15 if is_gpu(dev) else 5)
        _SAME_SIZE_COPY[key] = statistics.median(times)
    return _SAME_SIZE_COPY[key]


# ---- telemetry and machine description ------------------------------------------------


def _nvml_handle(dev):
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(dev)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        try:
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(pci.encode())
        except Exception:
            pass
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.device(dev).index or 0)


def telemetry(dev) -> dict:
    """Name, clocks, power and temperature of the GPU from nvidia-ml-py
    (empty on the CPU; an 'nvml_error' entry if NVML is unavailable)."""
    if not is_gpu(dev):
        return {}
    try:
        nv, h = _nvml_handle(dev)
        name = nv.nvmlDeviceGetName(h)
        out = dict(
            gpu_name=name.decode() if isinstance(name, bytes) else name,
            sm_clock_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            mem_clock_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
        )
    except Exception as e:  # no library, no permission: say so, never fail a benchmark
        return dict(nvml_error=f"{type(e).__name__}: {e}")
    optional = dict(  # each may be unsupported (e.g. in a VM): keep the rest
        power_w=lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
        temperature_c=lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
        max_sm_clock_mhz=lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
        power_limit_w=lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        driver=lambda: nv.nvmlSystemGetDriverVersion(),
    )
    for key, read in optional.items():
        try:
            value = read()
            out[key] = value.decode() if isinstance(value, bytes) else value
        except Exception as e:
            out[f"{key}_error"] = type(e).__name__
    return out


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(dev) -> dict:
    """What the results came from (goes into the JSON's machine_info)."""
    info = dict(
        resbm_device=str(dev),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        load_average_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        torch_threads=torch.get_num_threads(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if is_gpu(dev):
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / GiB, 1),
                    gpu_l2_mib=round(cache_bytes(dev) / MiB, 1))
        info.update({f"nvml_{k}": v for k, v in telemetry(dev).items()})
        label = f"{props.name} (torch {torch.__version__})"
    else:
        label = f"CPU only: {info['cpu_model']}, {info['cpu_count']} cores (torch {torch.__version__}, no GPU)"
    info["resbm_label"] = label
    return info
