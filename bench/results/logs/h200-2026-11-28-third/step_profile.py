"""Where an eager ResBMBoundary step's host time goes (session 34 probe)."""
import cProfile, pstats, sys, warnings
import torch
sys.path.insert(0, "bench")
from graph_replay import _step, _seconds_per_step
from resbm_kernels import GRAD_INT8, Codec, ResBMBoundary, use_backend

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
backends = sys.argv[1].split(",") if len(sys.argv) > 1 else ["cuda", "triton"]
import os
TOKENS = [int(t) for t in os.environ.get("TOKENS", "256,16384").split(",")]
sync = lambda: torch.cuda.synchronize() if dev.type == "cuda" else None

def make(n, stochastic=True):
    torch.manual_seed(n)
    codec = Codec(bits=4, group_size=16, rounding="stochastic" if stochastic else "nearest")
    b = ResBMBoundary(4096, 32, codec=codec, grad_codec=GRAD_INT8 if stochastic else Codec(bits=8),
                      device=dev, dtype=torch.bfloat16)
    x = torch.randn(n, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, 4096, device=dev, dtype=torch.bfloat16)
    return b, x, g, (x, *b.parameters())

for backend in backends:
    with use_backend(backend):
        for n in TOKENS:
            for stochastic in (True, False):
                b, x, g, leaves = make(n, stochastic)
                for _ in range(3):
                    _step(b, x, g, leaves)
                t = _seconds_per_step(lambda: _step(b, x, g, leaves), 50, 3, dev)
                print(f"{backend} N={n} {'stochastic' if stochastic else 'nearest'}: eager {t*1e6:.1f} us a step "
                      "(warm-up on the default stream)", flush=True)
        b, x, g, leaves = make(256)
        for _ in range(3):
            _step(b, x, g, leaves)
        for name, fn in (("forward", lambda: b(x)), ("forward no-grad", lambda: b(x.detach()))):
            t = _seconds_per_step(fn, 50, 3, dev)
            print(f"{backend} N=256: {name} {t*1e6:.1f} us", flush=True)
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _step(b, x, g, leaves)
            torch.cuda.set_sync_debug_mode(0)
            print(f"{backend}: {len(caught)} synchronising calls in a step:",
                  sorted({str(w.message)[:150] for w in caught}))
        sync()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(int(os.environ.get("PSTEPS", "100"))):
            _step(b, x, g, leaves)
        sync()
        pr.disable()
        print(f"=== {backend}: cProfile of 100 steps, N=256, by own time")
        pstats.Stats(pr).sort_stats("tottime").print_stats(28)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(20):
                _step(b, x, g, leaves)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
