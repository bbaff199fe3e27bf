"""CI smoke test of the convergence study (bench/convergence.py): every arm
runs a handful of steps on a tiny model; resume is exact; the data split is
deterministic and disjoint; the stage modules chain to the full model. No
convergence claims here."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

from resbm_kernels import data
from resbm_kernels.models import GPT, GPTConfig, ResBMGPT, layer_split, stage_modules

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_convergence():
    name = "resbm_bench_convergence"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


conv = _load_convergence()
ARMS = {a.name: a for a in conv.all_arms()}


@pytest.fixture(scope="module")
def corpus():
    train = data.load_corpus("train", max_bytes=200_000)
    val_data = data.load_corpus("val", max_bytes=50_000)
    return train, val_data


def tiny_settings(steps: int = 3, **overrides) -> "conv.RunSettings":
    s = dict(size="test", steps=steps, seed=0, device="cpu", lr=3e-3, weight_decay=0.1, warmup=1, grad_clip=1.0,
             eval_every=2, val_batches=1, ckpt_every=1000,
             model=dict(d=256, n_layers=4, n_heads=4, seq_len=16), batch=2)
    s.update(overrides)
    return conv.RunSettings(**s)


def _val(settings, val_data):
    return [data.batch(val_data, i, settings.batch, settings.model["seq_len"], seed=99)
            for i in range(settings.val_batches)]


# ---- data ----------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    train, val = data.stdlib_files("train"), data.stdlib_files("val")
    assert train and val
    assert not set(train) & set(val)
    assert train == data.stdlib_files("train") and val == data.stdlib_files("val")
    root = data.stdlib_root()
    for p in train + val:
        parts = p.relative_to(root).parts
        assert not data.EXCLUDED_PARTS.intersection(parts), p
    # about 10% of the files are held out
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.2
    # the split depends only on the relative path
    rel = val[0].relative_to(root).as_posix()
    assert data.split_of(rel) == "val"


def test_corpus_and_batches(corpus):
    train, _ = corpus
    assert train.dtype == torch.uint8 and train.dim() == 1 and train.numel() == 200_000
    x, y = data.batch(train, 5, 3, 16, seed=1)
    x2, y2 = data.batch(train, 5, 3, 16, seed=1)
    assert x.dtype == torch.int64 and x.shape == (3, 16) and y.shape == (3, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.batch(train, 6, 3, 16, seed=1)[0])
    assert not torch.equal(x, data.batch(train, 5, 3, 16, seed=2)[0])
    with pytest.raises(ValueError):
        data.load_corpus("test")


# ---- model ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stage_modules_chain_to_full_model(num_stages):
    cfg = GPTConfig(d=64, n_layers=4, n_heads=2, seq_len=16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    full = GPT(cfg, seed=3)(tokens)
    x = tokens
    stages = stage_modules(cfg, num_stages, seed=3)
    assert [len(s.blocks) for s in stages] == layer_split(4, num_stages)
    for i, stage in enumerate(stages):
        x = stage(x)
        if i < num_stages - 1:
            assert x.shape == (2, 16, 64)
    assert x.shape == (2, 16, 256)
    torch.testing.assert_close(x, full, rtol=0, atol=0)
    torch.testing.assert_close(ResBMGPT(cfg, num_stages, None, seed=3)(tokens), full, rtol=0, atol=0)
    # different seed, different weights
    assert not torch.equal(GPT(cfg, seed=4)(tokens), full)


def test_layer_split_even():
    assert layer_split(8, 3) == [3, 3, 2]
    assert layer_split(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        layer_split(2, 4)


# ---- the arms ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARMS))
def test_each_arm_runs(name, corpus, tmp_path):
    train, val_data = corpus
    # Muon's Newton-Schulz iteration runs in bf16, which the CI's CPU multiplies ~100x slower
    # than fp32 (~8 s a step at this width): one step for a Muon arm
    steps = 1 if ARMS[name].optimizer == "muon" else 3
    settings = tiny_settings(steps=steps)
    log = conv.run_arm(ARMS[name], settings, train, _val(settings, val_data), tmp_path)
    assert log["done"] and len(log["train"]) == steps
    assert all(math.isfinite(loss) for _, loss in log["train"])
    assert [e[0] for e in log["evals"]] == ([0, 2, 3] if steps == 3 else [0, 1])  # every 2 steps, and the last
    assert all(math.isfinite(e[2]) for e in log["evals"])
    assert not (tmp_path / f"{name}.pt").exists()  # finished arms drop their checkpoint
    w = log["wire"]
    arm = ARMS[name]
    assert w["fwd_ratio"] > (0.8 * arm.ratio if arm.kind in ("resbm", "noid") else 0.9)
    # a finished arm is skipped, not rerun
    again = conv.run_arm(ARMS[name], settings, train, _val(settings, val_data), tmp_path)
    assert again["train"] == log["train"]


@pytest.mark.parametrize("name", ["resbm-int8-muon", "noid-bf16-adamw"])
def test_resume_equals_uninterrupted(name, corpus, tmp_path):
    train, val_data = corpus
    steps = 4
    # half the width of the other tests (Muon's cost falls ~8x; no wire ratio is checked here)
    settings = tiny_settings(steps=steps, model=dict(d=128, n_layers=4, n_heads=4, seq_len=16))
    val = _val(settings, val_data)
    straight = conv.run_arm(ARMS[name], settings, train, val, tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(conv.Interrupted):
        conv.run_arm(ARMS[name], settings, train, val, tmp_path / "b", stop_after=steps // 2)
    assert (tmp_path / "b" / f"{name}.pt").exists()
    partial = json.loads((tmp_path / "b" / f"{name}.json").read_text())
    assert not partial["done"] and len(partial["train"]) == steps // 2
    resumed = conv.run_arm(ARMS[name], settings, train, val, tmp_path / "b")
    assert resumed["train"] == straight["train"]
    assert [e[:2] for e in resumed["evals"]] == [e[:2] for e in straight["evals"]]
    for a, b in zip(resumed["evals"], straight["evals"]):
        assert a[2] == pytest.approx(b[2], rel=0, abs=1e-6)


def test_paper_preset_wire_ratio():
    # d/k = 128 at bf16: 4 bytes/token for d=256 (plus the amortised 16-byte header)
    w = conv.wire_stats(ARMS["resbm-bf16-adamw"], 256, 2048)
    assert w["k"] == 2 and w["codec"] == "bf16"
    assert w["fwd_bytes_per_token"] == pytest.approx(4 + 16 / 2048)
    assert 127 < w["fwd_ratio"] < 128
    q = conv.wire_stats(ARMS["quant-int4-adamw"], 256, 2048)
    assert q["fwd_bytes_per_token"] == pytest.approx(256 / 2 + 256 / 32 * 2 + 16 / 2048)


def test_cli_smoke_writes_report(tmp_path):
    out = tmp_path / "out"
    conv.main(["--smoke", "--steps", "2", "--arms", "baseline-adamw,resbm-int4-adamw",
               "--out", str(out), "--state", str(tmp_path / "state")])
    report = (tmp_path / "state" / "convergence.md").read_text()
    assert "resbm-int4-adamw" in report and "gap to baseline" in report
    summary = json.loads((tmp_path / "state" / "convergence.json").read_text())
    assert set(summary["arms"]) == {"baseline-adamw", "resbm-int4-adamw"}
