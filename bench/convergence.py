"""Convergence study: does ResBM compression keep the model learning?

Byte-level language modelling (vocabulary 256) on the Python standard
library's own ``.py`` sources (:mod:`resbm_kernels.data`; train/validation
split by a hash of the file path, nothing downloaded). The model is a small
pre-norm GPT (RMSNorm, RoPE, SwiGLU; :mod:`resbm_kernels.models.gpt`) cut into
pipeline stages, run in one process (:class:`~resbm_kernels.models.ResBMGPT`)
with a boundary module at every cut. ``ResBMBoundary`` has the pipeline's
exact numerics (forward values cross the wire with the activation codec,
gradients come back with the gradient codec, straight-through), so the
losses here are the losses a real multi-process pipeline would see.

Every arm starts from the same GPT weights (same seed), sees the same
batches in the same order (``data.batch`` is a pure function of seed and
step), and runs the same number of steps and tokens.

Arms (``--arms`` takes a comma-separated list of names or shell patterns,
e.g. ``'*-adamw'``; ``--list-arms`` prints them):

    baseline-*        no compression (identity at every cut)
    resbm-bf16-*      ResBM paper preset: d/k = 128, bf16 on the wire, bf16 gradients
    resbm-int8-*      ResBM d/k = 128, int8 (one bf16 scale per token), int8 stochastic gradients
    resbm-int4-*      ResBM d/k = 128, int4 (one bf16 scale per group of <= 32), int8 stochastic gradients
    noid-bf16-adamw   ablation: ResBM without the identity path (h = D(E(RMSNorm x))), bf16 wire
    quant-int4-adamw  quantization only: full width d, int4 group 32, int8 stochastic gradients
    *-2st-*           the same with 2 stages (one cut) instead of 4 (three cuts)
    resbm-bf16-r32-adamw, resbm-bf16-r16-adamw
                      ResBM with milder bottlenecks (d/k = 32, 16), bf16: how the gap depends on k

``*-adamw`` arms train everything with AdamW; ``*-muon`` arms use
``torch.optim.Muon`` for the 2-D matrices inside the transformer blocks and
AdamW for the rest (embedding, head, norms, boundary encoders/decoders).

Resuming: every arm writes its log (``<state>/<arm>.json``) and a checkpoint
(``<state>/<arm>.pt``, every ``--ckpt-every`` steps and on Ctrl-C/SIGTERM;
written to a temporary file and renamed into place). Running the same
command again skips finished arms and continues a partial one from its last
checkpoint, bit for bit as if it had never stopped. A finished arm's
checkpoint is deleted (its log is kept).

Outputs (``--out``, default ``bench/results``): ``convergence.json`` (all
curves and settings), ``convergence.md`` (the table, machine, command),
``convergence.png`` (validation loss vs tokens).

    nice -n 10 python bench/convergence.py                 # the CPU study (~1 h on 2 cores)
    python bench/convergence.py --device cuda --size gpu   # a larger model on a GPU
    python bench/convergence.py --smoke                    # every arm, a few steps (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import math
import os
import pathlib
import platform
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

from resbm_kernels import ops  # noqa: E402
from resbm_kernels.codec import BF16, GRAD_INT8, Codec  # noqa: E402
from resbm_kernels.data import batch, load_corpus  # noqa: E402
from resbm_kernels.models.gpt import GPTConfig, ResBMGPT, muon_param_groups  # noqa: E402
from resbm_kernels.nn import CallSeeded, ResBMBoundary  # noqa: E402

# ---- sizes ----------------------------------------------------------------------------

#: Model and training settings per ``--size``. ``batch`` sequences of ``seq_len``
#: tokens per step; one step is one message per boundary (tokens per message =
#: batch * seq_len). ``eval_every`` steps the validation loss is measured on
#: ``val_batches`` fixed batches of the validation split.
SIZES = {
    "tiny": dict(d=256, n_layers=4, n_heads=4, seq_len=32, batch=4, lr=3e-3, steps=4,
                 eval_every=2, val_batches=2, ckpt_every=2),
    "small": dict(d=256, n_layers=4, n_heads=4, seq_len=128, batch=16, lr=3e-3, steps=250,
                  eval_every=25, val_batches=8, ckpt_every=50),
    "gpu": dict(d=1024, n_layers=8, n_heads=16, seq_len=512, batch=32, lr=1.5e-3, steps=3000,
                eval_every=100, val_batches=16, ckpt_every=250),
}

#: Bottleneck ratio d/k of the paper's headline 128x (bf16) preset.
PAPER_RATIO = 128


# ---- boundaries used only by the study (ablations) -----------------------------------

class NoIdentityBoundary(CallSeeded):
    """ResBM without the identity path: h = D(wire(E(RMSNorm(x)))).

    Same encoder/decoder shapes and init as :class:`ResBMBoundary`, minus the
    ``x[:, :k]`` and ``pad_d`` terms; the wire is :func:`ops.wire_roundtrip`.
    """

    def __init__(self, d: int, k: int, codec: Codec, grad_codec: Codec, seed: int = 0, eps: float = 1e-6):
        super().__init__(seed)
        self.d, self.k, self.codec, self.grad_codec = d, k, codec, grad_codec
        self.norm = nn.RMSNorm(d, eps=eps)
        self.encoder = nn.Linear(d, k, bias=False)
        self.decoder = nn.Linear(k, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        z = self.encoder(self.norm(x.reshape(-1, self.d)))
        zhat = ops.wire_roundtrip(z.contiguous(), self.codec, self.grad_codec, **self._seeds())
        return self.decoder(zhat).reshape(*lead, self.d)

    def wire_bytes(self, tokens: int) -> int:
        return self.codec.payload_bytes(tokens, self.k)


class QuantOnlyBoundary(CallSeeded):
    """No bottleneck: the full-width residual stream crosses the wire quantized."""

    def __init__(self, d: int, codec: Codec, grad_codec: Codec, seed: int = 0):
        super().__init__(seed)
        self.d, self.k, self.codec, self.grad_codec = d, d, codec, grad_codec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.d).contiguous()
        return ops.wire_roundtrip(x2d, self.codec, self.grad_codec, **self._seeds()).reshape(x.shape)

    def wire_bytes(self, tokens: int) -> int:
        return self.codec.payload_bytes(tokens, self.d)


# ---- arms -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run of the study.

    kind: ``baseline`` (identity cuts), ``resbm`` (ResBMBoundary), ``noid``
    (ResBM without identity path) or ``quant`` (full-width quantization).
    codec / grad_codec: wire codec specs (``None`` for the baseline; then the
    reference is bf16 activations at full width). ratio: d/k (bottleneck arms).
    """

    name: str
    kind: str
    optimizer: str
    stages: int = 4
    codec: str | None = None
    grad_codec: str | None = None
    ratio: int | None = None
    description: str = ""

    def k(self, d: int) -> int:
        if self.kind in ("baseline", "quant"):
            return d
        if d % self.ratio:
            raise ValueError(f"arm {self.name}: d={d} is not a multiple of d/k={self.ratio}")
        return d // self.ratio

    def codecs(self, d: int) -> tuple[Codec, Codec]:
        """(forward, backward) codecs; for int codecs the scale group is capped
        at k (the op needs the group to divide k)."""
        if self.kind == "baseline":
            return BF16, BF16
        k = self.k(d)
        out = []
        for spec in (self.codec, self.grad_codec):
            c = Codec.parse(spec)
            if c.quantized and c.group_size is not None and k % c.group_size:
                c = dataclasses.replace(c, group_size=None)  # one scale per token
            c.group(k)
            out.append(c)
        return out[0], out[1]


INT4_G32 = "int4/g32/bf16/nearest"


def all_arms() -> list[Arm]:
    """Every arm, in run order: the AdamW comparison first, then the ablations,
    Muon, and the 2-stage cut (so an interrupted study has the core first)."""
    def main_arms(opt: str, stages: int = 4, tag: str = "") -> list[Arm]:
        cut = "" if stages == 4 else ", 2 stages (one cut)"
        return [
            Arm(f"resbm-bf16{tag}-{opt}", "resbm", opt, stages, BF16.spec, BF16.spec, PAPER_RATIO,
                f"ResBM paper preset (d/k=128, bf16 wire){cut}"),
            Arm(f"resbm-int8{tag}-{opt}", "resbm", opt, stages, "int8/row/bf16/nearest", GRAD_INT8.spec, PAPER_RATIO,
                f"ResBM d/k=128 + int8{cut}"),
            Arm(f"resbm-int4{tag}-{opt}", "resbm", opt, stages, INT4_G32, GRAD_INT8.spec, PAPER_RATIO,
                f"ResBM d/k=128 + int4{cut}"),
        ]

    return [
        Arm("baseline-adamw", "baseline", "adamw", description="no compression"),
        *main_arms("adamw"),
        Arm("noid-bf16-adamw", "noid", "adamw", codec=BF16.spec, grad_codec=BF16.spec, ratio=PAPER_RATIO,
            description="ablation: ResBM without identity path (d/k=128, bf16)"),
        Arm("quant-int4-adamw", "quant", "adamw", codec=INT4_G32, grad_codec=GRAD_INT8.spec,
            description="quantization only: full width, int4 g32"),
        Arm("baseline-muon", "baseline", "muon", description="no compression"),
        *main_arms("muon"),
        *main_arms("adamw", stages=2, tag="-2st")[::2],  # bf16 and int4
        # context beyond the paper preset: how the gap depends on d/k at this small width
        *(Arm(f"resbm-bf16-r{r}-adamw", "resbm", "adamw", 4, BF16.spec, BF16.spec, r,
              f"ResBM d/k={r}, bf16 wire (milder compression, for context)") for r in (32, 16)),
    ]


def select_arms(patterns: str | None) -> list[Arm]:
    arms = all_arms()
    if not patterns:
        return arms
    chosen = []
    for pat in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = [a for a in arms if fnmatch.fnmatchcase(a.name, pat)]
        if not hits:
            raise SystemExit(f"--arms: {pat!r} matches no arm; choose from {[a.name for a in arms]}")
        chosen += [a for a in hits if a not in chosen]
    return [a for a in arms if a in chosen]  # canonical order (baselines first)


def wire_stats(arm: Arm, d: int, tokens_per_message: int) -> dict:
    """Forward/backward bytes per token per boundary (header amortised over one
    message of ``tokens_per_message`` tokens) and the ratio to bf16 activations."""
    fwd, bwd = arm.codecs(d)
    k = arm.k(d)
    f_bytes = fwd.payload_bytes(tokens_per_message, k)
    b_bytes = bwd.payload_bytes(tokens_per_message, k)
    raw = 2 * d * tokens_per_message
    return dict(k=k, codec=fwd.spec, grad_codec=bwd.spec,
                fwd_bytes_per_token=f_bytes / tokens_per_message, bwd_bytes_per_token=b_bytes / tokens_per_message,
                fwd_ratio=raw / f_bytes, bwd_ratio=raw / b_bytes, tokens_per_message=tokens_per_message)


def build_model(arm: Arm, cfg: GPTConfig, seed: int) -> ResBMGPT:
    d = cfg.d
    fwd, bwd = arm.codecs(d)
    k = arm.k(d)

    def factory(i: int) -> nn.Module:
        bseed = seed * 1000 + i
        if arm.kind == "baseline":
            return nn.Identity()
        if arm.kind == "resbm":
            return ResBMBoundary(d, k, codec=fwd, grad_codec=bwd, seed=bseed)
        if arm.kind == "noid":
            return NoIdentityBoundary(d, k, fwd, bwd, seed=bseed)
        if arm.kind == "quant":
            return QuantOnlyBoundary(d, fwd, bwd, seed=bseed)
        raise ValueError(f"unknown arm kind {arm.kind!r}")

    return ResBMGPT(cfg, arm.stages, factory, seed=seed)


def set_boundary_calls(model: ResBMGPT, value: int) -> None:
    """Pin the stochastic-rounding counters (a pure function of the step)."""
    for b in model.boundaries:
        if hasattr(b, "calls"):
            b.calls = value


# ---- optimizers ---------------------------------------------------------------------

class Optimizers:
    """Several optimizers stepped together (Muon + AdamW), one state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states):
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def _adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Optimizers:
    if name == "adamw":
        opts = [_adamw(list(model.parameters()), lr, weight_decay)]
    elif name == "muon":
        matrices, rest = muon_param_groups(model)
        # "match_rms_adamw" scales Muon's update to AdamW's RMS, so one lr serves both
        muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
        opts = [muon, _adamw(rest, lr, weight_decay)]
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    for o in opts:
        for g in o.param_groups:
            g["base_lr"] = lr
    return Optimizers(opts)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- one arm ---------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _atomic_write_bytes(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_json(path: pathlib.Path, obj) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def atomic_torch_save(path: pathlib.Path, obj) -> None:
    _atomic_write_bytes(path, lambda tmp: torch.save(obj, tmp))


@dataclasses.dataclass
class RunSettings:
    size: str
    steps: int
    seed: int
    device: str
    lr: float
    weight_decay: float
    warmup: int
    grad_clip: float
    eval_every: int
    val_batches: int
    ckpt_every: int
    model: dict
    batch: int


def evaluate(model: nn.Module, val: list, device, autocast) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad(), autocast():
        for x, y in val:
            logits = model(x.to(device))
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1)).item()
    model.train()
    return total / len(val)


def run_arm(arm: Arm, settings: RunSettings, train_data: torch.Tensor, val: list, state_dir: pathlib.Path,
            progress=None, stop_after: int | None = None) -> dict:
    """Train one arm to ``settings.steps`` (resuming from its checkpoint) and
    return its log. ``stop_after``: save a checkpoint and raise
    :class:`Interrupted` once that many steps are done (tests)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path = state_dir / f"{arm.name}.json", state_dir / f"{arm.name}.pt"
    meta = {"arm": dataclasses.asdict(arm), "settings": dataclasses.asdict(settings)}
    if log_path.exists():
        log = json.loads(log_path.read_text())
        if log.get("done") and log.get("meta") == meta:
            if progress is not None:
                progress.update(settings.steps)
            return log
    cfg = GPTConfig(**settings.model)
    device = torch.device(settings.device)
    tokens_per_step = settings.batch * cfg.seq_len
    model = build_model(arm, cfg, settings.seed).to(device)
    opt = build_optimizer(model, arm.optimizer, settings.lr, settings.weight_decay)
    log = {"meta": meta, "wire": wire_stats(arm, cfg.d, tokens_per_step), "params": sum(p.numel() for p in model.parameters()),
           "evals": [], "train": [], "done": False, "seconds": 0.0}
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["log"]["meta"] != meta:
            raise SystemExit(f"{ckpt_path}: checkpoint was made with other settings; delete it or use another --state")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        log, start = ckpt["log"], ckpt["step"]
    if progress is not None:
        progress.update(start)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else (lambda: torch.autocast("cpu", enabled=False)))

    def save(step: int) -> None:
        atomic_torch_save(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log})
        atomic_json(log_path, log)

    stop = {"signal": None}
    handlers = {}
    if _main_thread():
        def request_stop(signum, frame):
            stop["signal"] = signum
            signal.signal(signum, handlers[signum])  # a second Ctrl-C kills at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, request_stop)

    t0 = time.perf_counter() - log["seconds"]
    try:
        if start == 0 and not log["evals"]:
            log["evals"].append([0, 0, evaluate(model, val, device, autocast)])
        for step in range(start, settings.steps):
            factor = lr_factor(step, settings.steps, settings.warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            x, y = batch(train_data, step, settings.batch, cfg.seq_len, settings.seed)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            set_boundary_calls(model, 2 * step)
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            lval = loss.item()
            if not math.isfinite(lval):
                raise FloatingPointError(f"arm {arm.name}: loss is {lval} at step {step}")
            log["train"].append([step, round(lval, 5)])
            done = step + 1
            if done % settings.eval_every == 0 or done == settings.steps:
                set_boundary_calls(model, 2 * step + 1)
                log["evals"].append([done, done * tokens_per_step, evaluate(model, val, device, autocast)])
            log["seconds"] = time.perf_counter() - t0
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{arm.name} loss {lval:.3f}", refresh=False)
            if done < settings.steps and (done % settings.ckpt_every == 0 or done == stop_after
                                          or stop["signal"] is not None):
                save(done)
            if done == stop_after and done < settings.steps:
                raise Interrupted(f"{arm.name}: stopped after {done} steps (checkpoint saved)")
            if stop["signal"] is not None and done < settings.steps:
                raise Interrupted(f"{arm.name}: signal {stop['signal']} after {done} steps (checkpoint saved)")
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    log["done"] = True
    log["final_val_loss"] = log["evals"][-1][2]
    log["tokens"] = settings.steps * tokens_per_step
    atomic_json(log_path, log)
    ckpt_path.unlink(missing_ok=True)
    return log


def collect_logs(arms: list[Arm], settings: RunSettings, state: pathlib.Path) -> dict[str, dict]:
    """Logs in ``state`` (finished or partial) that were made with ``settings``."""
    logs = {}
    for a in arms:
        path = state / f"{a.name}.json"
        if path.exists():
            lg = json.loads(path.read_text())
            if lg.get("meta", {}).get("settings") == json.loads(json.dumps(dataclasses.asdict(settings))):
                logs[a.name] = lg
    return logs


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---- reporting --------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_report(out: pathlib.Path, logs: dict[str, dict], arms: list[Arm], settings: RunSettings,
                 command: str, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = {"date": date, "command": command, "machine": info, "settings": dataclasses.asdict(settings),
               "arms": {a.name: {"arm": dataclasses.asdict(a), **{k: v for k, v in logs[a.name].items() if k != "meta"}}
                        for a in arms if a.name in logs}}
    atomic_json(out / "convergence.json", summary)

    cfg = GPTConfig(**settings.model)
    tps = settings.batch * cfg.seq_len
    base = {a.optimizer: logs[a.name].get("final_val_loss") for a in arms
            if a.kind == "baseline" and a.name in logs and logs[a.name].get("done")}
    lines = [
        "# Convergence study: ResBM activation compression",
        "",
        f"Generated by `bench/convergence.py` on {date}.",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads)"
        + (f", GPU {info['gpu']}" if "gpu" in info else "") + f"; device `{info['device']}`; "
        f"torch {info['torch']}, Python {info['python']}.",
        f"- Data: byte-level LM (vocab 256) on the Python {platform.python_version()} standard library's `.py` "
        "sources (tests and site-packages excluded); ~10% of files (by SHA-1 of the path) held out for validation.",
        f"- Model: pre-norm GPT, d={cfg.d}, {cfg.n_layers} layers, {cfg.n_heads} heads, SwiGLU hidden "
        f"{cfg.mlp_hidden}, RoPE, seq {cfg.seq_len}; cut into 4 stages ({cfg.n_layers // 4 or 1} layer(s) each, "
        "3 boundaries) unless the arm says 2 stages (1 boundary).",
        f"- Training: {settings.steps} steps x {settings.batch} x {cfg.seq_len} = {settings.steps * tps:,} tokens per "
        f"arm, same seed ({settings.seed}), same batches in the same order for every arm; lr {settings.lr} "
        f"(warm-up {settings.warmup} steps, cosine to 10%), weight decay {settings.weight_decay} on matrices, grad clip "
        f"{settings.grad_clip}. Muon arms: `torch.optim.Muon` (momentum 0.95, Nesterov, `adjust_lr_fn=match_rms_adamw`, "
        "same lr) for the 2-D matrices inside the blocks, AdamW for embedding, head, norms and boundary weights.",
        f"- Validation loss: mean cross-entropy (nats/byte) over {settings.val_batches} fixed batches "
        f"({settings.val_batches * tps:,} tokens) of the validation files, every {settings.eval_every} steps.",
        f"- Wire bytes are per token per boundary, for messages of {tps:,} tokens (one step's batch), 16-byte header "
        "and bf16 scales included; the compression ratio is bf16 activations (2·d bytes/token) over those bytes. "
        "Gradients travel back with the gradient codec shown (its ratio in the last column).",
        "",
        "| arm | optimizer | stages | k | wire codec (fwd) | wire bytes/token | compression ratio | grad codec (bwd) "
        "| grad ratio | final val loss | gap to baseline | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        lg = logs.get(a.name)
        if lg is None:
            continue
        w = lg["wire"]
        final = lg.get("final_val_loss")
        if final is None:
            last = lg["evals"][-1] if lg["evals"] else None
            val = f"(partial: {last[2]:.4f} at step {last[0]})" if last else "(not started)"
            gap = ""
        else:
            val = f"{final:.4f}"
            b = base.get(a.optimizer)
            gap = "—" if a.kind == "baseline" else (f"{100 * (final - b) / b:+.2f}%" if b else "n/a")
        codec = "none (bf16 d)" if a.kind == "baseline" else f"`{w['codec']}`"
        gcodec = "none (bf16 d)" if a.kind == "baseline" else f"`{w['grad_codec']}`"
        lines.append(
            f"| {a.name} | {a.optimizer} | {a.stages} | {w['k']} | {codec} | {w['fwd_bytes_per_token']:.2f} | "
            f"{w['fwd_ratio']:.1f}x | {gcodec} | {w['bwd_ratio']:.1f}x | {val} | {gap} | {lg['seconds'] / 60:.1f} min |")
    lines += [
        "",
        "Gap to baseline: (final val loss − baseline final val loss) / baseline, baseline with the same optimizer. "
        "Time: wall clock per arm (training + evaluation) on this machine, which may have been shared with other jobs.",
        "",
        "Notes:",
        "",
        "- One seed per arm and no error bars: treat differences of a few percent between arms as noise "
        "unless a run with another `--seed` confirms them.",
        f"- With d={cfg.d} the paper's d/k={PAPER_RATIO} leaves k={cfg.d // PAPER_RATIO if cfg.d % PAPER_RATIO == 0 else 'n/a'} "
        "channels per token. Integer codecs need the scale group to divide k, so `int4/g32` falls back to one "
        "scale per token (group = k); a bf16 scale then costs as much as the codes it scales, and int8 sends "
        "as many bytes as bf16.",
        "- Single process, pipeline numerics: `ResBMBoundary` quantizes and packs the forward values with the "
        "wire codec and the returning gradient with the gradient codec (straight-through), as the multi-process "
        "pipeline does; the transport and the stochastic-rounding seeds differ.",
        "",
        "![validation loss vs tokens](convergence.png)",
        "",
    ]
    (out / "convergence.md").write_text("\n".join(lines))
    plot(out / "convergence.png", logs, arms, settings)


def plot(path: pathlib.Path, logs: dict, arms: list[Arm], settings: RunSettings) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    opts = [o for o in ("adamw", "muon") if any(a.optimizer == o and a.name in logs for a in arms)]
    fig, axes = plt.subplots(1, len(opts), figsize=(6.5 * len(opts), 4.8), squeeze=False, sharey=True)
    styles = {"baseline": "-", "resbm": "-", "noid": ":", "quant": "-."}
    for ax, o in zip(axes[0], opts):
        for a in arms:
            if a.optimizer != o or a.name not in logs or not logs[a.name]["evals"]:
                continue
            ev = logs[a.name]["evals"]
            ls = "--" if a.stages == 2 else styles[a.kind]
            lw = 2.4 if a.kind == "baseline" else 1.4
            ax.plot([e[1] / 1e6 for e in ev], [e[2] for e in ev], ls, lw=lw, label=a.name)
        ax.set_title(f"{o}: validation loss vs tokens")
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    # the first evals (random init ~5.5, then the steep drop) squash the interesting part
    later = [e[2] for lg in logs.values() for e in lg["evals"][2:]]
    if later:
        axes[0][0].set_ylim(min(later) - 0.05, max(later) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------------

def make_settings(args) -> RunSettings:
    size = dict(SIZES["tiny" if args.smoke else args.size])
    model = {k: size.pop(k) for k in ("d", "n_layers", "n_heads", "seq_len")}
    steps = args.steps if args.steps is not None else size["steps"]
    return RunSettings(
        size="tiny" if args.smoke else args.size, steps=steps, seed=args.seed, device=args.device,
        lr=args.lr if args.lr is not None else size["lr"], weight_decay=args.weight_decay,
        warmup=max(1, int(steps * args.warmup_frac)), grad_clip=args.grad_clip,
        eval_every=args.eval_every or size["eval_every"], val_batches=args.val_batches or size["val_batches"],
        ckpt_every=args.ckpt_every or size["ckpt_every"], model=model, batch=args.batch or size["batch"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: per --size; small=250, gpu=3000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains in bf16 autocast)")
    p.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="small",
                   help="small: d=256, 4 layers, seq 128, batch 16 (CPU); gpu: d=1024, 8 layers, seq 512, batch 32")
    p.add_argument("--arms", default=None, help="comma-separated arm names or patterns (default: all)")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--out", type=pathlib.Path, default=REPO / "bench" / "results", help="where the report goes")
    p.add_argument("--state", type=pathlib.Path, default=None,
                   help="per-arm logs and checkpoints (default: <out>/convergence_state[_smoke])")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps per arm (CI); no convergence claims")
    p.add_argument("--seed", type=int, default=0, help="model init and data order seed (shared by all arms)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW and Muon)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of steps of linear warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0: off)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--val-batches", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the logs in --state (finished and partial arms) without training")
    p.add_argument("--max-train-bytes", type=int, default=None, help="truncate the training corpus (smoke tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    arms = select_arms(args.arms)
    if args.list_arms:
        for a in arms:
            print(f"{a.name:24s} {a.description}")
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    settings = make_settings(args)
    state = args.state or args.out / ("convergence_state_smoke" if args.smoke else "convergence_state")
    state.mkdir(parents=True, exist_ok=True)
    max_train = args.max_train_bytes or (1_000_000 if args.smoke else None)
    train_data = load_corpus("train", max_train)
    val_data = load_corpus("val")
    cfg = GPTConfig(**settings.model)
    val = [batch(val_data, i, settings.batch, cfg.seq_len, seed=10_000 + settings.seed) for i in range(settings.val_batches)]
    if args.device.startswith("cuda"):
        train_data = train_data.to(args.device)
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python bench/convergence.py " + " ".join(a for a in given if a != "--report-only")
    info = machine_info(args.device)

    report_dir = args.out if not args.smoke else state
    if args.report_only:
        logs = collect_logs(arms, settings, state)
        write_report(report_dir, logs, arms, settings, command, info)
        return logs

    from tqdm import tqdm
    logs = {}
    bar = tqdm(total=settings.steps * len(arms), unit="step", desc="convergence", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for arm in arms:
            logs[arm.name] = run_arm(arm, settings, train_data, val, state, progress=bar)
            lg = logs[arm.name]
            bar.write(f"{arm.name}: final val loss {lg['final_val_loss']:.4f} "
                      f"({lg['seconds'] / 60:.1f} min, wire {lg['wire']['fwd_bytes_per_token']:.2f} B/token, "
                      f"{lg['wire']['fwd_ratio']:.1f}x)")
            write_report(report_dir, logs, arms, settings, command, info)
    except (KeyboardInterrupt, Interrupted) as e:
        bar.close()
        write_report(report_dir, collect_logs(arms, settings, state), arms, settings, command, info)
        print(f"\ninterrupted ({e or 'Ctrl-C'}); partial report written; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130)
    bar.close()
    return logs


if __name__ == "__main__":
    main()
