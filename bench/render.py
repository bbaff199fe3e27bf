"""Render the pytest-benchmark JSON files in bench/results/ as markdown tables
and PNG plots.

    python bench/render.py [--results bench/results] [--out bench/results/README.md]

Reads every ``*.json`` that pytest-benchmark wrote (files without a
``benchmarks`` list, e.g. the convergence study's, are left alone) and writes
one markdown file with a section per run -- the machine and date taken from
the JSON's ``machine_info`` / ``datetime`` -- plus, per run,
``<name>-pipeline.png`` (throughput vs bandwidth) and ``<name>-kernels.png``
(% of the measured copy bandwidth per pass).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
PASSES = ("encode_forward", "decode_forward", "decode_backward", "encode_backward")
BACKENDS = ("eager", "compile", "triton", "cuda")
BACKWARD = ("decode_backward", "encode_backward")
RATE_ORDER = ("10mbit", "80mbit", "200mbit", "1gbit", "unlimited")


def load(results: pathlib.Path) -> list[tuple[pathlib.Path, dict]]:
    runs = []
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"render: skipping {path.name}: {e}", file=sys.stderr)
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            runs.append((path, data))
    return runs


def rows(data: dict, suite: str) -> list[dict]:
    return [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("suite") == suite]


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt(x, digits=2, suffix="") -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}"


def rate_key(rate: str) -> int:
    return RATE_ORDER.index(rate) if rate in RATE_ORDER else -1


# ---- sections ----------------------------------------------------------------------------


def machine_section(path: pathlib.Path, data: dict) -> list[str]:
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    out = [f"## {path.stem}", ""]
    out.append(f"- **Machine:** {m.get('resbm_label', m.get('node', '?'))}")
    out.append(f"- **Date:** {data.get('datetime', '?')} (UTC)")
    sw = f"Python {m.get('python_version', '?')}, torch {m.get('torch', '?')}, triton {m.get('triton', '–')}"
    out.append(f"- **Software:** {sw}; torch threads {m.get('torch_threads', '?')}; {m.get('system', '')} {m.get('release', '')}")
    if m.get("gpu"):
        tel = ", ".join(f"{k[5:]}={m[k]}" for k in sorted(m) if k.startswith("nvml_"))
        out.append(f"- **GPU:** {m['gpu']}, {m.get('gpu_sms')} SMs, {m.get('gpu_memory_gib')} GiB, "
                   f"L2 {m.get('gpu_l2_mib')} MiB; NVML at start: {tel}")
    else:
        load = m.get("load_average_at_start")
        out.append(f"- **CPU:** {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} cores, shared with other "
                   f"users (load average at start {', '.join(f'{x:.1f}' for x in load) if load else '?'})")
    if c:
        out.append(f"- **Commit:** {str(c.get('id', '?'))[:12]}{' (dirty tree)' if c.get('dirty') else ''}")
    r = data.get("resbm", {})
    if r:
        env = " ".join(f"{name}={value}" for name, value in r.get("env", {}).items())
        out.append(f"- **Run:** `{env + ' ' if env else ''}pytest {' '.join(r.get('argv', []))}` — "
                   f"{r.get('session_s', '?')} s; "
                   f"grid {r.get('grid')}, compile {r.get('compile')}, budget {r.get('budget_s') or 'none'}"
                   + (_triton_tuning(r) if any(b["backend"] == "triton" for b in rows(data, "kernels")) else ""))
    return out + [""]


def _triton_tuning(run: dict) -> str:
    """How the run chose the Triton kernels' launch configs."""
    tuned = run.get("triton_autotune")
    return "" if tuned is None else "; Triton autotuned" if tuned else \
        "; Triton untuned (RESBM_TRITON_AUTOTUNE=0: each kernel's first launchable config)"


def kernel_section(data: dict) -> list[str]:
    ks = rows(data, "kernels")
    if not ks:
        return ["No kernel benchmarks in this run.", ""]
    copy = statistics.median(k["copy_GBps"] for k in ks)
    present = [b for b in BACKENDS if any(k["backend"] == b for k in ks)]
    out = ["### Kernels", "",
           f"Median time per call, achieved GB/s over the minimum bytes the pass must move "
           f"(each input read once, each output written once) and that as % of the device-to-device copy "
           f"bandwidth measured in the same run ({copy:.1f} GB/s, read + write; where given, also against a "
           f"copy of the same bytes timed the same way, which pays the same launch and ramp). "
           f"Backends present: {', '.join(present)}. Speedups are over eager (and over torch.compile where "
           f"that baseline was timed)."]
    rates = [k["matmul_TFLOPS"] for k in ks if k.get("matmul_TFLOPS")]
    if rates:
        out[-1] += (f" Where a pass's FLOPs at the dense matmul rate measured in the same run "
                    f"({statistics.median(rates):.3g} TFLOP/s) take longer than a copy of its bytes, the cell also "
                    f"gives that compute floor as % of the median (§: compute-bound).")
    if any(b in present for b in ("triton", "cuda")):
        out[-1] += (" Some fused backward passes re-read their big input by design (decode backward's weight "
                    "gradient is a second pass over grad_h, the CUDA encode backward's a second pass over x), so "
                    "their last columns give the % of copy bandwidth over the bytes those kernels actually move.")
    out.append("")
    by = {}
    for k in ks:
        by.setdefault((k["pass"], k["N"], k["d"], k["k"], k["bits"]), {})[k["backend"]] = k
    for p in PASSES:
        keys = sorted(key for key in by if key[0] == p)
        if not keys:
            continue
        head = ["N", "d", "k", "bits"] + [f"{b}: time, GB/s (% copy)" for b in present]
        fast = [b for b in present if b not in ("eager", "compile")]
        head += [f"{b} ×eager / ×compile" for b in fast]
        head += [f"{b} % copy, design bytes" for b in fast if p in BACKWARD]
        if not fast and "compile" in present:
            head += ["compile ×eager"]
        out += [f"**{p}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            cell = by[key]
            line = [str(key[1]), str(key[2]), str(key[3]), str(key[4])]
            for b in present:
                r = cell.get(b)
                mark = " ‡" if r and r.get("host_bound") else ""
                same = f"; {100 * r['frac_same_size_copy']:.3g}% same-size" if r and r.get("frac_same_size_copy") else ""
                if r and r.get("compute_floor_s", 0) > r.get("same_size_copy_s", float("inf")):
                    same += f"; {100 * r['frac_roofline']:.3g}% compute floor §"
                line.append(f"{fmt_time(r['median_s'])}, {r['GBps']:.3g} ({100 * r['frac_copy_bw']:.3g}%{same}){mark}"
                            if r else "–")
            for b in fast:
                r = cell.get(b)
                line.append(f"{fmt(r.get('speedup_vs_eager'))} / {fmt(r.get('speedup_vs_compile'))}" if r else "–")
            for b in (fast if p in BACKWARD else ()):
                r = cell.get(b)
                line.append(f"{100 * r['frac_copy_bw_design']:.3g}%" if r and r.get("frac_copy_bw_design") else "–")
            if not fast and "compile" in present:
                r = cell.get("compile")
                line.append(fmt(r.get("speedup_vs_eager")) if r else "–")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    host_bound = [k for k in ks if k.get("host_bound")]
    if host_bound:
        out += [f"‡ host-bound ({len(host_bound)} items): the host spends longer per call (Python, dispatch, "
                "launches; measured while the GPU was kept busy, `host_median_s` in the JSON) than the device, so a "
                "loop calling this pass back to back runs at the host's pace.", ""]
    errs = [k["max_rel_err_vs_eager"] for k in ks if k["backend"] != "eager"]
    if errs:
        out += [f"Largest relative error of a non-eager backend against the eager reference: {max(errs):.3g}.", ""]
    return out


def wire_section(data: dict) -> list[str]:
    ws = rows(data, "wire")
    if not ws:
        return []
    out = ["### Wire", "",
           f"Measured payload bytes of one message of {ws[0]['tokens']} tokens (16-byte header and scales "
           "included), per token, and the compression ratio against bf16 activations (2·d bytes per token).", "",
           "| preset | codec | d | k | bytes/token | of which scales | ratio vs bf16 |", "|---|---|---|---|---|---|---|"]
    order = ["uncompressed", "BF16", "INT8", "INT4", "INT2", "GRAD_INT8"]
    for w in sorted(ws, key=lambda w: (w["d"], order.index(w["preset"]) if w["preset"] in order else 99, w["k"])):
        out.append(f"| {w['preset']} | `{w['codec']}` | {w['d']} | {w['k']} | {w['bytes_per_token']:.3f} | "
                   f"{w['scale_bytes'] / w['tokens']:.2f} | {w['compression_ratio']:.1f}× |")
    return out + [""]


def pipeline_section(data: dict, png: str | None) -> list[str]:
    ps = rows(data, "pipeline")
    if not ps:
        return []
    first = ps[0]
    variants = list(dict.fromkeys(p["variant"] for p in ps))
    out = ["### Pipeline", "",
           f"Training throughput (tokens/s) of a d={first['d']} byte-level model cut into stages, gloo over the "
           f"loopback of a private network namespace shaped with `tc tbf` (all boundaries share the one link); "
           f"{first['tokens_per_step']} tokens per optimizer step; median step time over {first['measured_steps']} "
           f"measured steps ({first.get('reps', '?')} rounds interleaving every bandwidth and variant, "
           f"{first['warmup_steps']} unmeasured step before each point's steps). `uncompressed` is a full-width (k = d) bf16 boundary. In each cell: "
           "tokens/s, speedup over uncompressed at the same bandwidth, fraction of the same variant's "
           "unlimited-link throughput retained.", ""]
    if png:
        out += [f"![throughput vs bandwidth]({png})", ""]
    for stages in sorted({p["stages"] for p in ps}):
        sub = [p for p in ps if p["stages"] == stages]
        head = ["link (nominal)", "link (measured Mbit/s)"] + variants
        out += [f"**{stages} stages**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rate in sorted({p["bandwidth"] for p in sub}, key=rate_key):
            cells = {p["variant"]: p for p in sub if p["bandwidth"] == rate}
            anyp = next(iter(cells.values()))
            line = [rate, f"{anyp['measured_link_mbit_s']:.0f}"]
            for v in variants:
                p = cells.get(v)
                line.append(f"{p['tokens_per_s']:.0f} ({fmt(p.get('speedup_vs_uncompressed'))}×, "
                            f"{fmt(100 * p['retained_vs_unlimited'] if p.get('retained_vs_unlimited') else None, 0, '%')})"
                            if p else "–")
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    wire = {p["variant"]: p["wire_bytes_per_token_per_boundary"] for p in ps}
    out += ["Bytes per token crossing one boundary per step (forward + backward payloads): "
            + ", ".join(f"{v} {wire[v]:.1f}" for v in variants) + ".", ""]
    return out


# ---- plots ---------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, data: dict, title: str, path: pathlib.Path) -> None:
    """Title the figure with the machine and date of the run, write it, close it."""
    m = data.get("machine_info", {})
    fig.suptitle(f"{title} — {m.get('resbm_label', '')}, {data.get('datetime', '')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pipeline(data: dict, path: pathlib.Path) -> bool:
    ps = rows(data, "pipeline")
    if not ps:
        return False
    plt = _pyplot()
    stages = sorted({p["stages"] for p in ps})
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.2), squeeze=False)
    for ax, s in zip(axes[0], stages):
        sub = [p for p in ps if p["stages"] == s]
        rates = sorted({p["bandwidth"] for p in sub}, key=rate_key)
        x = {r: i for i, r in enumerate(rates)}
        for v in dict.fromkeys(p["variant"] for p in sub):
            pts = sorted((x[p["bandwidth"]], p["tokens_per_s"]) for p in sub if p["variant"] == v)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=v)
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("link (tc tbf rate)")
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"{s} stages")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, data, "Pipeline throughput vs bandwidth", path)
    return True


def plot_kernels(data: dict, path: pathlib.Path) -> bool:
    ks = rows(data, "kernels")
    if not ks:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PASSES), figsize=(4.2 * len(PASSES), 4), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], PASSES):
        sub = [k for k in ks if k["pass"] == p]
        shapes = sorted({(k["N"], k["d"], k["k"], k["bits"]) for k in sub}, key=lambda s: (s[0] * s[1], s[2], -s[3]))
        x = {s: i for i, s in enumerate(shapes)}
        for b in BACKENDS:
            pts = sorted((x[(k["N"], k["d"], k["k"], k["bits"])], 100 * k["frac_copy_bw"]) for k in sub if k["backend"] == b)
            if pts:
                ax.plot([a for a, _ in pts], [c for _, c in pts], marker=".", linestyle="-", label=b)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("shape (sorted by N·d, then k, bits)", fontsize=8)
        labels = [f"{n // 1024}K×{d // 1024}K k{k} b{bits}" for n, d, k, bits in shapes]
        step = max(1, len(labels) // 12)
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("% of measured copy bandwidth")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8)
    _save(plt, fig, data, "Kernel passes: achieved bandwidth as % of the copy bandwidth", path)
    return True


def render(results: pathlib.Path, out: pathlib.Path) -> str:
    runs = load(results)
    lines = ["# Benchmark results", "",
             "Generated by `python bench/render.py` from the pytest-benchmark JSON files in this folder "
             "(`pytest bench/ --benchmark-only --benchmark-json=bench/results/<name>.json`). Method: "
             "[bench/README.md](../README.md). Every number below was measured on the machine its section "
             "names; CPU numbers come from a shared 2-core machine and are noisy.", ""]
    if not runs:
        lines += ["No results yet.", ""]
    for path, data in sorted(runs, key=lambda r: r[1].get("datetime", "")):
        lines += machine_section(path, data)
        pipe_png = path.with_name(f"{path.stem}-pipeline.png")
        kern_png = path.with_name(f"{path.stem}-kernels.png")
        has_pipe = plot_pipeline(data, pipe_png)
        lines += pipeline_section(data, pipe_png.name if has_pipe else None)
        if plot_kernels(data, kern_png):
            lines += [f"![kernel bandwidth]({kern_png.name})", ""]
        lines += kernel_section(data)
        lines += wire_section(data)
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=None, help="markdown output (default: <results>/README.md)")
    a = p.parse_args(argv)
    results = pathlib.Path(a.results)
    out = pathlib.Path(a.out) if a.out else results / "README.md"
    render(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
