"""Run every CUDA kernel of the project once on small, awkward shapes, for
``compute-sanitizer`` (bench/gpu_session.sh runs it under memcheck,
racecheck, synccheck and initcheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python bench/sanitize_cuda.py

(without PyTorch's caching allocator every tensor is its own cudaMalloc, so
memcheck sees an overrun past a tensor's end instead of into the pool).

What runs, each result checked against the reference backend:

- ``native``: the CUDA codec library ``libresbm_cuda`` (quantize + pack,
  unpack + dequantize) for every bits / scale group / rounding / input dtype;
- ``cuda``: the CUDA backend's four fused passes, if
  ``resbm_kernels.backends.cuda`` imports (else it says so), then on an sm_90 device or
  the emulator the reduced set again, at k = 16 and 128, with every kernel on wgmma
  (``RESBM_CUDA_WGMMA=1``) and with none (``0``; the default puts the projection alone
  on wgmma there);
- ``triton``: the Triton backend's four passes (``--backends`` to choose).

Exit status 0 when everything that exists ran and matched, 1 otherwise; a
backend that rejects a shape with ValueError/TypeError is reported, not failed.

On the CPU (``--device cpu``) the same cases run on the CPU codec library, or
with ``RESBM_CUDA_EMULATE=1`` on the CUDA kernels' emulator; with the libraries
built under AddressSanitizer that is the CPU's memcheck (tests/test_sanitizers.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from unittest import mock

import torch

from resbm_kernels import native, ops
from resbm_kernels.backends import _load, use_backend
from resbm_kernels.backends import reference as R
from resbm_kernels.codec import Codec, empty_payload, payload_views

N_ROWS = (1, 37, 133)  # 1, and row counts that are no multiple of any block size
GROUPS = {16: (None,), 8: (None, 16), 4: (None, 16), 2: (None, 16)}


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Report:
    def __init__(self):
        self.lines, self.failed = [], False

    def ok(self, what, err=None):
        self._add(f"ok       {what}" + ("" if err is None else f"  rel_err={err:.2e}"))

    def fail(self, what, why):
        self.failed = True
        self._add(f"FAILED   {what}: {why}")

    def note(self, what):
        self._add(f"note     {what}")

    def _add(self, line):
        """Printed at once, so a run cut short by a timeout still shows each case."""
        self.lines.append(line)
        print(line, flush=True)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def check_native(rep: Report, dev) -> None:
    lib = "cuda" if dev.type == "cuda" else "cuda_emu" if native.emulating() else "cpu"
    if not native.available(lib):
        rep.note(f"native: libresbm_{lib} not available ({native._errors.get(lib, '?')[:200]})")
        return
    gen = torch.Generator(device=dev).manual_seed(0)
    for bits, groups in GROUPS.items():
        for group in groups:
            for rounding in (("nearest",) if bits == 16 else ("nearest", "stochastic")):
                codec = Codec(bits=bits, group_size=group, rounding=rounding)
                for dtype in (torch.float32, torch.bfloat16):
                    for n in N_ROWS:
                        k = 48
                        what = f"native ({lib}) {codec.spec} {dtype} n={n} k={k}"
                        try:
                            z = torch.randn(n, k, generator=gen, device=dev).to(dtype)
                            payload = empty_payload(codec, n, k, dev)
                            codes, scales = payload_views(payload, codec, n, k)
                            native.quantize_pack(z, codec, 5, codes, scales)
                            out = torch.empty(n, k, dtype=torch.float32, device=dev)
                            native.unpack_dequantize(codes, scales, codec, k, out)
                            sync(dev)
                            ref = R.write_payload(z, codec, 5)
                            if not torch.equal(payload, ref):
                                rep.fail(what, f"{(payload != ref).sum().item()} payload bytes differ from the reference")
                                continue
                            rep.ok(what, rel(out, R.read_payload(ref, codec, n, k, torch.float32)))
                        except Exception as e:  # noqa: BLE001
                            rep.fail(what, f"{type(e).__name__}: {e}")


def check_backend(rep: Report, name: str, dev, quick: bool, label: str | None = None, shapes=None) -> None:
    """The four passes of backend ``name`` against the reference: every bits, (d, k) in
    ``shapes`` (by default one small shape if ``quick``, else two), several N (one if quick)."""
    module, why = _load(name)
    if module is None:
        rep.note(f"{name}: no {name} backend yet ({why})")
        return
    if not module.supports(dev):
        rep.note(f"{name}: backend does not support {dev}")
        return
    gen = torch.Generator(device=dev).manual_seed(1)
    shapes = shapes or (((256, 16),) if quick else ((256, 16), (512, 64)))
    for bits in (16, 8, 4, 2):
        for d, k in shapes:
            for n in ((37,) if quick else N_ROWS):
                for norm in ((True,) if quick else (True, False)):
                    codec = Codec(bits=bits)
                    gcodec = Codec(bits=bits, rounding="stochastic")
                    what = f"{label or name} {codec.spec} n={n} d={d} k={k} norm={norm}"
                    try:
                        x = torch.randn(n, d, generator=gen, device=dev).bfloat16()
                        w_e = (torch.randn(k, d, generator=gen, device=dev) * d ** -0.5).bfloat16()
                        w_d = (torch.randn(d, k, generator=gen, device=dev) * k ** -0.5).bfloat16()
                        gamma = (1 + 0.1 * torch.randn(d, generator=gen, device=dev)).bfloat16() if norm else None
                        grad_h = torch.randn(n, d, generator=gen, device=dev).bfloat16()
                        residual = torch.randn(n, d, generator=gen, device=dev).bfloat16()
                        outs = {}
                        for backend in (name, "reference"):
                            with use_backend(backend):
                                p = ops.encode(x, w_e, codec, norm_weight=gamma, seed=3)
                                h = ops.decode(p, w_d, codec, n, residual=residual)
                                gp, gwd = ops.decode_backward(grad_h, p, w_d, codec, gcodec, grad_seed=4)
                                gx, gwe, gg = ops.encode_backward(gp, x, w_e, gcodec, norm_weight=gamma)
                                sync(dev)
                                outs[backend] = (R.read_payload(p, codec, n, k, torch.float32), h,
                                                 R.read_payload(gp, gcodec, n, k, torch.float32), gwd, gx, gwe)
                        errs = [rel(a, b) for a, b in zip(outs[name], outs["reference"])]
                        worst = max(errs)
                        limit = {16: 1e-2, 8: 3e-2, 4: 0.25, 2: 0.8}[bits]  # about one code step per value
                        if not worst <= limit:
                            rep.fail(what, f"relative errors {['%.2e' % e for e in errs]} (limit {limit})")
                        else:
                            rep.ok(what, worst)
                    except (ValueError, TypeError) as e:
                        rep.note(f"{what}: rejected by the backend ({e})")
                    except Exception as e:  # noqa: BLE001
                        rep.fail(what, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="native,cuda,triton", help="comma-separated: native, cuda, triton")
    p.add_argument("--quick", default="triton",
                   help="comma-separated backends that get the reduced case set (Triton JIT-compiles every case)")
    p.add_argument("--device", default="cuda",
                   help="cuda; or cpu (CPU codec library, or with RESBM_CUDA_EMULATE=1 the CUDA kernels' "
                        "emulator; Triton under TRITON_INTERPRET=1)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing was sanitized", flush=True)
        return 2
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    quick = {q.strip() for q in a.quick.split(",") if q.strip()}
    rep = Report()
    for which in a.backends.split(","):
        which = which.strip()
        if which == "native":
            check_native(rep, dev)
        elif which in ("cuda", "triton"):
            check_backend(rep, which, dev, which in quick)
            if which == "cuda" and (dev.type == "cpu" or torch.cuda.get_device_capability(dev) == (9, 0)):
                # the other loops (read per launch; the caller's environment restored after): every
                # kernel on wgmma, then none, at the smallest and the largest k wgmma takes
                for wgmma in ("1", "0"):
                    with mock.patch.dict(os.environ, RESBM_CUDA_WGMMA=wgmma):
                        check_backend(rep, which, dev, True, label=f"cuda[RESBM_CUDA_WGMMA={wgmma}]",
                                      shapes=((256, 16), (512, 128)))
        else:
            rep.fail(which, "unknown backend name")
    for which, lib in sorted(native._libs.items()):
        print(f"library {which}: {lib._name if lib is not None else 'not loaded'}")
    count = {tag: sum(line.startswith(tag) for line in rep.lines) for tag in ("ok", "FAILED", "note")}
    print(f"summary: {count['ok']} cases ran clean, {count['FAILED']} failed, {count['note']} notes")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
