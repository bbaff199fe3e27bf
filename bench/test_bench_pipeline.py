"""Pipeline benchmarks: tokens/s of a 2- and 4-stage ResBM pipeline over gloo
on this machine with real bandwidth shaping (``unshare -n`` + ``tc tbf`` on
the namespace's loopback), uncompressed activations vs the ResBM presets.

Method (details in pipeline_run.py and bench/README.md): one launch per
stage count runs every bandwidth and variant in the same stage processes,
interleaved over several rounds. Throughput is measured inside the workers:
the interval between consecutive optimizer-step ends, max over ranks,
median over the measured steps; pytest-benchmark's stats for an item are
those per-step times (rounds = measured steps). extra_info carries tokens/s, the speedup
over the uncompressed variant at the same bandwidth, the fraction of the
unlimited-link throughput retained, the link rate the check measured, the
wire bytes, and the qdisc's own counters (bytes sent, drops).
"""

from __future__ import annotations

import pytest

import pipeline_run
from benchlib import REPLAY, record

STAGES = (2, 4)
D = 256


def _rates(config) -> list[str]:
    rates = [r.strip() for r in config.getoption("--resbm-bandwidths").split(",") if r.strip()]
    return rates if "unlimited" in rates else ["unlimited"] + rates  # the reference for "retained"


def pytest_generate_tests(metafunc):
    if "pipe_point" not in metafunc.fixturenames:
        return
    rates = _rates(metafunc.config)
    points = [(s, r, v) for s in STAGES for r in rates for v in pipeline_run.variants(D)]
    metafunc.parametrize("pipe_point", points, ids=[f"{s}stages-{r}-{v}" for s, r, v in points])


class _Runs:
    """One launch per stage count (every rate, interleaved), shared by its items."""

    def __init__(self, config):
        self.reps = config.getoption("--resbm-pipeline-reps")
        self.steps = config.getoption("--resbm-pipeline-steps")
        self.warmup = config.getoption("--resbm-pipeline-warmup")
        self.rates = _rates(config)
        self.problem = pipeline_run.namespace_problem()
        self.cache = {}

    def get(self, stages: int) -> dict:
        if stages not in self.cache:
            rates = self.rates if self.problem is None else ["unlimited"]
            try:
                self.cache[stages] = pipeline_run.run(stages, rates, netns="auto" if self.problem is None else "off",
                                                      d=D, reps=self.reps, steps=self.steps, warmup=self.warmup)
            except pipeline_run.NamespaceError as e:
                self.problem = str(e)
                self.cache[stages] = pipeline_run.run(stages, ["unlimited"], netns="off", d=D, reps=self.reps,
                                                      steps=self.steps, warmup=self.warmup)
        return self.cache[stages]


@pytest.fixture(scope="session")
def pipeline_runs(request):
    return _Runs(request.config)


@pytest.mark.benchmark(timer=REPLAY)
def test_pipeline(benchmark, pipe_point, pipeline_runs):
    stages, rate, variant = pipe_point
    res = pipeline_runs.get(stages)
    if "errors" in res:
        traces = "\n".join(t or "" for t in res.get("traces", {}).values())
        pytest.fail(f"pipeline with {stages} stages: stage errors {res['errors']}\n{traces[-3000:]}")
    if rate not in res["rates"]:
        pytest.skip(f"bandwidth shaping unavailable ({pipeline_runs.problem}); only the unshaped loopback was run")
    at = res["rates"][rate]
    point, base = at["variants"][variant], at["variants"]["uncompressed"]
    unlimited = res["rates"].get("unlimited", {}).get("variants", {}).get(variant)
    spec = pipeline_run.variants(D)[variant]
    net = at["net"]
    benchmark.group = f"pipeline {stages} stages (step time)"
    benchmark.extra_info.update(
        suite="pipeline", stages=stages, bandwidth=rate, variant=variant, d=D, k=spec["k"],
        codec=spec["codec"].spec, grad_codec=spec["grad_codec"].spec,
        nominal_mbit_s=(pipeline_run.rate_bits(rate) or 0) / 1e6 or None,
        measured_link_mbit_s=net["link"]["measured_mbit_s"],
        namespace=res["namespace"], qdisc=net.get("qdisc"),
        qdisc_sent_bytes=net.get("sent_bytes"), qdisc_dropped_packets=net.get("dropped"),
        qdisc_overlimits=net.get("overlimits"),
        tokens_per_s=point["tokens_per_s"], tokens_per_s_best_step=point["tokens_per_s_best_step"],
        step_s=point["step_s"], tokens_per_step=point["tokens_per_step"],
        speedup_vs_uncompressed=point["tokens_per_s"] / base["tokens_per_s"],
        retained_vs_unlimited=(point["tokens_per_s"] / unlimited["tokens_per_s"]) if unlimited else None,
        wire_bytes_per_step_per_boundary=point["wire_bytes_per_step_per_boundary"],
        wire_bytes_per_token_per_boundary=point["wire_bytes_per_token_per_boundary"],
        blocked_s_per_step_rank0=point["blocked_s_per_step_rank0"], overlap_rank0=point["overlap_rank0"],
        per_rank_median_step_s=point["per_rank_median_step_s"],
        loss_first=point["loss_first"], loss_last=point["loss_last"],
        reps=res["args"]["reps"], warmup_steps=res["args"]["warmup"], measured_steps=len(point["steps_s"]),
        launch_wall_s=res["wall_s"],
    )
    assert point["loss_last"] == point["loss_last"], "loss is NaN"
    record(benchmark, point["steps_s"])
