"""The pipeline runtime: schedules, equivalence with the single-process
boundary, handshake, faults and checkpoint/resume (gloo on CPU, spawned
processes)."""

import time

import pytest
import torch

from helpers import tolerance
from pipeline_harness import batch, loss_fn, spawn, stage_module
from resbm_kernels import BF16, GRAD_INT8, INT4, INT8, Codec, ResBMBoundary
from resbm_kernels.pipeline import PipelineConfig, PipelineStage, checkpoint, handshake, schedule

D, K, SEQ, BATCH, MB = 32, 8, 16, 8, 4


# ---- schedules as data ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 4), (4, 7), (3, 1)])
def test_schedules_are_complete_and_deadlock_free(name, stages, micro):
    plan = schedule.build(name, stages, micro)
    for actions in plan:
        assert sorted(map(str, actions)) == sorted([f"F{m}" for m in range(micro)] + [f"B{m}" for m in range(micro)])
        assert all(actions.index(schedule.Action("F", m)) < actions.index(schedule.Action("B", m)) for m in range(micro))
    timeline = schedule.simulate(plan)
    assert len(timeline) >= 2 * (micro + stages - 1)
    assert schedule.grid(plan).splitlines()[0].startswith("step r0")


def test_1f1b_bounds_micro_batches_in_flight():
    for s, actions in enumerate(schedule.one_f_one_b(4, 8)):
        live = peak = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak == 4 - s


def test_simulate_detects_deadlock():
    bad = [[schedule.Action("F", 0), schedule.Action("B", 0)], [schedule.Action("B", 0), schedule.Action("F", 0)]]
    with pytest.raises(RuntimeError, match="deadlocks"):
        schedule.simulate(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="k=5 must divide the model width d=32"):
        PipelineConfig(d=32, k=5)
    with pytest.raises(ValueError, match="schedule='zb'"):
        PipelineConfig(d=32, k=8, schedule="zb")
    with pytest.raises(ValueError, match="group_size=32 does not divide k=8"):
        PipelineConfig(d=32, k=8, codec=INT4)
    with pytest.raises(ValueError, match="timeout_s=inf must be a finite number of seconds"):
        PipelineConfig(d=32, k=8, timeout_s=float("inf"))
    with pytest.raises(ValueError, match="micro_batches=0 must be at least 1"):
        PipelineConfig(d=32, k=8, micro_batches=0)
    with pytest.raises(TypeError, match="micro_batches=2.0 must be an integer"):
        PipelineConfig(d=32, k=8, micro_batches=2.0)


# ---- workers (run in spawned processes) ------------------------------------------

def _make_stage(rank, world, config, seed=0, group=None):
    torch.manual_seed(10_000 + rank)  # encoder/decoder init
    return PipelineStage(stage_module(rank, world, D, seed), config, micro_batch_shape=(BATCH // MB, SEQ),
                         loss_fn=loss_fn if rank == world - 1 else None, group=group)


def _train_worker(rank, world, codec, grad_codec, schedules, steps):
    """For each schedule: init weights, `steps` optimizer steps; returns the
    initial state, losses, final grads and comm stats."""
    out = {}
    for name in schedules:
        config = PipelineConfig(d=D, k=K, codec=codec, grad_codec=grad_codec, micro_batches=MB, schedule=name)
        stage = _make_stage(rank, world, config)
        init = {k: v.clone() for k, v in stage.state_dict().items()}
        opt = torch.optim.SGD(stage.parameters(), lr=0.05)
        losses, stats = [], []
        for step in range(steps):
            inputs, targets = batch(step, BATCH, SEQ)
            opt.zero_grad()
            result = stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
            grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
            opt.step()
            losses.append(result.loss)
            stats.append(result.comm)
        out[name] = dict(init=init, losses=losses, grads=grads, stats=stats)
    return out


def _single_process(inits, world, codec, grad_codec, steps):
    """The same model in one process with ResBMBoundary at each cut."""
    modules, boundaries = [], []
    for s in range(world):
        m = stage_module(s, world, D)
        m.load_state_dict({k[len("module."):]: v for k, v in inits[s].items() if k.startswith("module.")})
        modules.append(m)
    for s in range(world - 1):
        b = ResBMBoundary(D, K, codec=codec, grad_codec=grad_codec)
        b.encoder.weight.data.copy_(inits[s]["encoder.weight"])
        b.encoder.norm_weight.data.copy_(inits[s]["encoder.norm_weight"])
        b.decoder.weight.data.copy_(inits[s + 1]["decoder.weight"])
        boundaries.append(b)
    params = [p for m in modules + boundaries for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for step in range(steps):
        inputs, targets = batch(step, BATCH, SEQ)
        opt.zero_grad()
        total = 0.0
        for x, t in zip(inputs.chunk(MB), targets.chunk(MB)):
            h = modules[0](x)
            for s in range(1, world):
                h = modules[s](boundaries[s - 1](h))
            loss = loss_fn(h, t) / MB
            loss.backward()
            total += loss.item()
        grads = [{f"module.{n}": p.grad.clone() for n, p in m.named_parameters()} for m in modules]
        for s, b in enumerate(boundaries):
            grads[s]["encoder.weight"] = b.encoder.weight.grad.clone()
            grads[s]["encoder.norm_weight"] = b.encoder.norm_weight.grad.clone()
            grads[s + 1]["decoder.weight"] = b.decoder.weight.grad.clone()
        opt.step()
        losses.append(total)
    return losses, grads


def _ok(results):
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}: {res.get('error') or res}\n{res.get('trace', '')}"
    return [res["ok"] for res in results]


# ---- equivalence --------------------------------------------------------------------

@pytest.mark.parametrize("world, codec", [(2, BF16), (4, BF16), (2, INT8), (3, Codec(bits=4, group_size=8))],
                         ids=["2-bf16", "4-bf16", "2-int8", "3-int4"])
def test_pipeline_equals_single_process(world, codec, tmp_path):
    """Deterministic codecs both ways (round to nearest): the pipeline's losses
    and every gradient are the single-process model's."""
    steps = 2
    outs = _ok(spawn(_train_worker, world, codec, codec, ("gpipe", "1f1b"), steps, out_dir=str(tmp_path)))
    for name in ("gpipe", "1f1b"):
        inits = [o[name]["init"] for o in outs]
        ref_losses, ref_grads = _single_process(inits, world, codec, codec, steps)
        torch.testing.assert_close(outs[-1][name]["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        for s in range(world):
            got = outs[s][name]["grads"]
            assert set(got) == set(ref_grads[s])
            for n in got:
                torch.testing.assert_close(got[n], ref_grads[s][n], **tolerance(torch.float32, 64), msg=f"{name} stage {s} {n}")


def test_quantized_pipeline_tracks_single_process(tmp_path):
    steps, world = 6, 2
    outs = _ok(spawn(_train_worker, world, INT8, GRAD_INT8, ("1f1b",), steps, out_dir=str(tmp_path)))
    ref_losses, _ = _single_process([o["1f1b"]["init"] for o in outs], world, INT8, GRAD_INT8, steps)
    losses = outs[-1]["1f1b"]["losses"]
    assert losses[-1] < losses[0]
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) < 0.02 * b


def test_comm_stats_count_message_bytes(tmp_path):
    """Each message: the payload, padded to 8 bytes, and an 8-byte trailer."""
    outs = _ok(spawn(_train_worker, 2, INT8, GRAD_INT8, ("1f1b",), 1, out_dir=str(tmp_path)))
    tokens = (BATCH // MB) * SEQ
    fwd, bwd = (-(-c.payload_bytes(tokens, K) // 8) * 8 + 8 for c in (INT8, GRAD_INT8))
    first, last = outs[0]["1f1b"]["stats"][0], outs[1]["1f1b"]["stats"][0]
    assert (first.bytes_sent, first.bytes_received) == (MB * fwd, MB * bwd)
    assert (last.bytes_sent, last.bytes_received) == (MB * bwd, MB * fwd)
    assert 0.0 <= first.overlap <= 1.0 and first.blocked_s >= 0.0


def _evaluate_worker(rank, world, evaluations):
    """Three 1F1B steps (int8 forward, stochastic int8 gradients); with
    ``evaluations``, before each step an evaluation of a held-out batch and of
    the step's own batch. Returns the losses, the final gradients, and whether
    an evaluation touched a gradient."""
    stage = _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=INT8, grad_codec=GRAD_INT8, micro_batches=MB))
    opt = torch.optim.SGD(stage.parameters(), lr=0.05)
    first, last = rank == 0, rank == world - 1
    out = dict(steps=[], evals=[], touched=False)
    for step in range(3):
        inputs, targets = batch(step, BATCH, SEQ)
        opt.zero_grad()
        if evaluations:
            before = [None if q.grad is None else q.grad.clone() for q in stage.parameters()]
            held_in, held_out = batch(100 + step, BATCH, SEQ)
            out["evals"].append(stage.evaluate(held_in if first else None, held_out if last else None).loss)
            out["evals"].append(stage.evaluate(inputs if first else None, targets if last else None).loss)
            out["touched"] |= any((b is None) != (q.grad is None) or (b is not None and not torch.equal(b, q.grad))
                                  for b, q in zip(before, stage.parameters()))
        out["steps"].append(stage.step(inputs if first else None, targets if last else None).loss)
        out["grads"] = {n: q.grad.clone() for n, q in stage.named_parameters()}
        opt.step()
    return out


def test_evaluate_leaves_training_unchanged(tmp_path):
    """Steps with evaluations between them are the steps without, bit for bit
    (losses and every gradient, stochastic gradient rounding included); an
    evaluation touches no gradient, and of a step's own batch gives that
    step's loss (the forward codec rounds to nearest)."""
    world = 3
    plain = _ok(spawn(_evaluate_worker, world, False, out_dir=str(tmp_path / "plain")))
    evals = _ok(spawn(_evaluate_worker, world, True, out_dir=str(tmp_path / "evals")))
    assert evals[-1]["steps"] == plain[-1]["steps"]
    for s in range(world):
        assert not evals[s]["touched"]
        for n, g in plain[s]["grads"].items():
            assert torch.equal(evals[s]["grads"][n], g), (s, n)
    losses = evals[-1]["evals"]
    assert losses[1::2] == evals[-1]["steps"]
    assert all(a != b for a, b in zip(losses[0::2], losses[1::2]))  # the held-out batches are other data
    assert all(loss is None for s in range(world - 1) for loss in evals[s]["evals"])


def _evaluate_mismatch_worker(rank, world):
    """Stage 0 evaluates while stage 1 steps."""
    stage = _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB, timeout_s=5.0))
    inputs, targets = batch(0, BATCH, SEQ)
    return (stage.evaluate(inputs, None) if rank == 0 else stage.step(None, targets)).loss


def test_an_evaluation_met_by_a_step_is_named(tmp_path):
    results = spawn(_evaluate_mismatch_worker, 2, out_dir=str(tmp_path), timeout=60)
    error = results[1].get("error", "")
    assert error.startswith("PipelineError: stage 1: forward activations message for micro-batch 0 of step 0 "
                            "has the trailer"), results
    assert "out of step" in error



def _replica_worker(rank, world, steps):
    """Two 2-stage pipelines side by side (ranks 0-1 and 2-3, data-parallel
    replicas, each its own data): `steps` 1F1B steps, as _train_worker."""
    groups = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    replica, stage_rank = divmod(rank, 2)
    config = PipelineConfig(d=D, k=K, codec=INT8, grad_codec=GRAD_INT8, micro_batches=MB, schedule="1f1b")
    torch.manual_seed(10_000 + stage_rank)
    stage = PipelineStage(stage_module(stage_rank, 2, D), config, micro_batch_shape=(BATCH // MB, SEQ),
                          loss_fn=loss_fn if stage_rank == 1 else None, group=groups[replica])
    opt = torch.optim.SGD(stage.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        inputs, targets = batch(step + 10 * replica, BATCH, SEQ)
        opt.zero_grad()
        losses.append(stage.step(inputs if stage_rank == 0 else None, targets if stage_rank == 1 else None).loss)
        grads = {n: q.grad.clone() for n, q in stage.named_parameters()}
        opt.step()
    return dict(losses=losses, grads=grads)


def test_pipelines_side_by_side(tmp_path):
    """Two pipelines in one world, each given its process group: replica 0 is the
    lone 2-stage pipeline on the same data, bit for bit (losses and every
    gradient); replica 1 trains on its own data. (Each pipeline created only its
    own link groups, which process-group creation, collective over the world,
    paired across the pipelines: every handshake timed out.)"""
    steps = 2
    replicas = _ok(spawn(_replica_worker, 4, steps, out_dir=str(tmp_path / "replicas"), timeout=120))
    lone = _ok(spawn(_train_worker, 2, INT8, GRAD_INT8, ("1f1b",), steps, out_dir=str(tmp_path / "lone")))
    assert replicas[1]["losses"] == lone[1]["1f1b"]["losses"]
    for s in range(2):
        for n, g in lone[s]["1f1b"]["grads"].items():
            assert torch.equal(replicas[s]["grads"][n], g), (s, n)
    assert replicas[3]["losses"] != replicas[1]["losses"] and all(0 < x < 10 for x in replicas[3]["losses"])


def _overlap_worker(rank, world):
    """Ranks 0 and 1 form a pipeline; rank 2 claims one with rank 1 as well."""
    groups = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([1, 2])]
    return _make_stage(min(rank, 1), 2, PipelineConfig(d=D, k=K, micro_batches=MB, timeout_s=20),
                       group=groups[rank == 2]) and None


def test_overlapping_pipelines_are_named(tmp_path):
    results = spawn(_overlap_worker, 3, out_dir=str(tmp_path), timeout=60)
    for r in range(3):
        assert "rank 2 reported the pipeline [1, 2], which does not hold it or overlaps another ([[0, 1]])" in \
            results[r].get("error", ""), results[r]

# ---- handshake ----------------------------------------------------------------------

def _mismatch_worker(rank, world):
    codec = INT8 if rank == 0 else Codec(bits=4, group_size=8)
    return _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=codec, micro_batches=MB)) and None


def test_handshake_mismatch_fails_on_both_sides(tmp_path):
    results = spawn(_mismatch_worker, 2, out_dir=str(tmp_path), timeout=60)
    for res in results:
        assert "error" in res, res
        assert "codec_bits" in res["error"] and "same pipeline configuration" in res["error"]
    assert "stage 1 has codec_bits=4, but stage 0 has codec_bits=8" in results[0]["error"]
    assert "stage 0 has codec_bits=8, but stage 1 has codec_bits=4" in results[1]["error"]


def test_handshake_descriptor_keeps_its_size():
    """A descriptor is always 32 int64 values (a peer's message of another size would abort
    gloo, not raise): a field a later version adds takes a reserved slot, which this
    version names."""
    mine = handshake.descriptor(PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB), 3, (BATCH // MB, SEQ))
    assert mine.shape == (32,) and mine.dtype == torch.int64
    assert mine[0] == handshake.MAGIC and mine[len(handshake.FIELDS):].eq(0).all()
    handshake.compare(mine, mine.clone(), stage=0, peer=1)
    theirs = mine.clone()
    theirs[-1] = 7
    with pytest.raises(ValueError, match="stage 1 sets descriptor reserved slot 31 to 7, which stage 0's version"):
        handshake.compare(mine, theirs, stage=0, peer=1)


def _schedule_mismatch_worker(rank, world):
    config = PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB, schedule="1f1b" if rank == 0 else "gpipe")
    return _make_stage(rank, world, config) and None


def test_handshake_names_a_schedule_mismatch(tmp_path):
    """(Two schedules on two stages deadlocked until the timeout.)"""
    results = spawn(_schedule_mismatch_worker, 2, out_dir=str(tmp_path), timeout=60)
    assert "stage 1 has schedule=gpipe, but stage 0 has schedule=1f1b" in results[0].get("error", ""), results
    assert "stage 0 has schedule=1f1b, but stage 1 has schedule=gpipe" in results[1].get("error", ""), results


def _message_worker(rank, world, fault):
    """Stage 0 misbehaves in step 1: sends its forward message for micro-batch 2 without its
    last 16 bytes ("short"), or runs a step ahead of stage 1 ("ahead"), or its module fails
    in micro-batch 1 and the caller carries on ("carry_on"). Returns each step's outcome."""
    stage = _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB, timeout_s=5.0))
    if rank == 0 and fault == "short":
        send = stage.peers.send
        stage.peers.send = lambda t, direction, i: send(
            t[:-16] if stage.steps_done == 1 and direction == "forward activations" and i == 2 else t, direction, i)
    if rank == 0 and fault == "carry_on":
        forward = stage.module.forward

        def failing(x):
            if stage.steps_done == 1 and failing.calls == MB + 1:
                failing.calls += 1
                raise RuntimeError("CUDA out of memory (simulated)")
            failing.calls += 1
            return forward(x)
        failing.calls = 0
        stage.module.forward = failing
    outcomes = []
    for step in range(3):
        if rank == 0 and fault == "ahead" and step == 1:
            stage.steps_done += 1
        inputs, targets = batch(step, BATCH, SEQ)
        try:
            stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
            outcomes.append("ok")
        except Exception as e:
            outcomes.append(f"{type(e).__name__}: {e}")
            if not (rank == 0 and fault == "carry_on"):
                break
    return outcomes


@pytest.mark.parametrize("fault", ["short", "ahead"])
def test_a_short_or_out_of_step_message_is_named(fault, tmp_path):
    """The trailer after each payload: a short message (its trailer is then the previous
    step's) or one of another step fails the receiving stage's step (gloo took both silently)."""
    results = _ok(spawn(_message_worker, 2, fault, out_dir=str(tmp_path), timeout=120))
    assert results[1][0] == "ok" and results[1][1].startswith("PipelineError: stage 1: forward activations message "
                                                              f"for micro-batch {2 if fault == 'short' else 0}")
    assert "has the trailer" in results[1][1] and "out of step" in results[1][1], results[1]


def test_a_stage_takes_no_step_after_a_failed_one(tmp_path):
    """A step that raised left receives posted: a later step() raises instead of taking the next
    step's messages for the failed one's (a stale message was decoded as new data)."""
    results = _ok(spawn(_message_worker, 2, "carry_on", out_dir=str(tmp_path), timeout=120))
    first = results[0]
    assert first[0] == "ok" and "CUDA out of memory (simulated)" in first[1], first
    assert first[2].startswith("PipelineError: stage 0: a step failed (RuntimeError: CUDA out of memory"), first
    assert "takes no more steps" in first[2]
    assert results[1][0] == "ok" and results[1][1].startswith("PipelineError"), results[1]


def _corrupt_worker(rank, world):
    """As on CUDA: the ops do not read headers (that would sync the device) and
    the stage checks them at the end of the step; stage 0 corrupts the header
    of its forward payload for micro-batch 1 in step 1."""
    from resbm_kernels import checks

    checks._is_fake = lambda t: True  # the ops' CPU-only header check, off as for CUDA tensors
    stage = _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB, timeout_s=20.0))
    stage._defer_checks = True
    if rank == 0:
        send = stage.peers.send

        def corrupting_send(tensor, direction, micro_batch):
            if stage.steps_done == 1 and direction == "forward activations" and micro_batch == 1:
                tensor = tensor.clone()
                tensor[5] ^= 0x01  # a header byte
            send(tensor, direction, micro_batch)

        stage.peers.send = corrupting_send
    opt = torch.optim.SGD(stage.parameters(), lr=0.05)
    for step in range(3):
        inputs, targets = batch(step, BATCH, SEQ)
        try:
            stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
        except Exception as e:
            return step, f"{type(e).__name__}: {e}"
        opt.step()
    return 3, "no error"


def test_corrupt_payload_fails_every_stage_in_the_same_step(tmp_path):
    """A corrupt header found at the end of a step (CUDA defers the check)
    taints every payload computed from it, so all stages fail that step, each
    naming the header, and none steps its optimizer on the corrupted data."""
    results = _ok(spawn(_corrupt_worker, 3, out_dir=str(tmp_path), timeout=120))
    for rank, (step, msg) in enumerate(results):
        assert step == 1 and msg.startswith("PipelineError") and "unexpected header" in msg, (rank, msg)
    assert "stage 1: forward activations payload for micro-batch 1" in results[1][1]
    zeros = "[" + ", ".join(["0"] * 16) + "]"
    assert f"stage 2: forward activations payload for micro-batch 1 has an unexpected header {zeros}" in results[2][1]
    assert f"stage 0: backward gradients payload for micro-batch 1 has an unexpected header {zeros}" in results[0][1]


def _absent_worker(rank, world):
    """Rank 1 never builds its stage (e.g. crashed during start-up)."""
    if rank == 1:
        return None
    config = PipelineConfig(d=D, k=K, codec=INT8, micro_batches=MB, timeout_s=5.0)
    start = time.monotonic()
    try:
        _make_stage(rank, world, config)
    except Exception as e:
        return f"{type(e).__name__}: {e} [after {time.monotonic() - start:.1f} s]"
    return "no error"


def test_absent_stage_fails_start_up_within_timeout(tmp_path):
    results = spawn(_absent_worker, 2, out_dir=str(tmp_path), timeout=60)
    msg = results[0]["ok"]
    assert msg.startswith("PipelineError: stage 0: creating the pipeline's process groups failed"), msg
    assert float(msg.rsplit("[after ", 1)[1].split(" s]")[0]) < 5.0 + 5


# ---- faults and checkpoint/resume ------------------------------------------------------

def _resumable_worker(rank, world, ckpt_dir, steps, die_at, timeout_s):
    """Train ``steps`` steps with a checkpoint after each; rank ``die_at[0]``
    exits abruptly in the middle of step ``die_at[1]``."""
    config = PipelineConfig(d=D, k=K, codec=INT8, grad_codec=GRAD_INT8, micro_batches=MB, timeout_s=timeout_s)
    stage = _make_stage(rank, world, config)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    checkpoint.load_latest(ckpt_dir, stage, opt)
    resumed_from = stage.steps_done
    losses = {}
    while stage.steps_done < steps:
        step = stage.steps_done
        if die_at is not None and (rank, step) == die_at:
            original = stage.module.forward

            def dying_forward(*a):  # die after the first micro-batch's forward
                out = original(*a)
                stage.module.forward = lambda *b: __import__("os")._exit(1)
                return out

            stage.module.forward = dying_forward
        inputs, targets = batch(step, BATCH, SEQ)
        opt.zero_grad()
        started = time.perf_counter()
        try:
            result = stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
        except Exception as e:
            raise type(e)(f"{e} [after {time.perf_counter() - started:.1f} s]") from e
        opt.step()
        losses[step] = result.loss
        checkpoint.save(ckpt_dir, stage, opt)
    return dict(resumed_from=resumed_from, losses=losses, params=[p.detach().clone() for p in stage.parameters()])


@pytest.mark.parametrize("world, victim", [(2, 1), (4, 2)])
def test_killed_stage_errors_everywhere_then_resume_matches(world, victim, tmp_path):
    steps, timeout_s = 4, 20.0
    crashed = spawn(_resumable_worker, world, str(tmp_path / "ckpt"), steps, (victim, 2), timeout_s,
                    out_dir=str(tmp_path / "crash"), timeout=120)
    assert crashed[victim] == {"died": 1}
    for r, res in enumerate(crashed):
        if r == victim:
            continue
        assert "error" in res, f"rank {r} should have failed: {res}"
        msg = res["error"]
        assert msg.startswith("PipelineError") and f"stage {r}:" in msg and "micro-batch" in msg, msg
        assert "forward activations" in msg or "backward gradients" in msg
        assert float(msg.rsplit("[after ", 1)[1].split(" s]")[0]) < timeout_s + 5
        if abs(r - victim) == 1:
            assert f"stage {victim} (rank {victim})" in msg

    resumed = _ok(spawn(_resumable_worker, world, str(tmp_path / "ckpt"), steps, None, timeout_s,
                        out_dir=str(tmp_path / "resume")))
    assert all(res["resumed_from"] == 2 for res in resumed)
    clean = _ok(spawn(_resumable_worker, world, str(tmp_path / "ckpt-clean"), steps, None, timeout_s,
                      out_dir=str(tmp_path / "clean")))
    assert resumed[-1]["losses"][3] == pytest.approx(clean[-1]["losses"][3], rel=1e-6)
    for a, b in zip(resumed, clean):
        for p, q in zip(a["params"], b["params"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---- the example, as users launch it ---------------------------------------------------

def test_train_gpt_example_under_torchrun(tmp_path):
    """examples/train_gpt.py trains over 2 stages with torchrun, checkpoints,
    and resumes from the checkpoint when started again."""
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "train_gpt.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "--width", "64", "--layers", "2", "--heads", "2", "--seq", "32", "--batch", "8",
           "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "2"]
    first = subprocess.run(cmd + ["--steps", "4"], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 stages on cpu, 4 steps" in first.stdout and "compression ratio" in first.stdout
    val = re.search(r"validation loss (\d+\.\d+)", first.stdout)
    assert val and 0 < float(val.group(1)) < 10, first.stdout  # bytes: ln(256) = 5.5 at the start
    again = subprocess.run(cmd + ["--steps", "6"], capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 stages on cpu, 2 steps" in again.stdout  # resumed at step 4


def test_train_gpt_example_failure_names_its_cause_under_torchrun():
    """A rank's exception reaches torchrun's summary ("Root Cause"), not only its
    exit code (the example's main is wrapped in torch's elastic ``record``)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "train_gpt.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "--width", "64", "--layers", "2", "--heads", "2", "--seq", "32", "--steps", "1", "--codec", "int7"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    root_cause = run.stderr[run.stderr.index("Root Cause"):]
    assert "ValueError: Codec: cannot parse spec 'int7'" in root_cause, run.stderr[-3000:]


def test_train_gpt_example_with_replicas(tmp_path):
    """--replicas 2 over 4 ranks: two 2-stage pipelines side by side, gradients
    averaged across them, each replica checkpointing into its own directory."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "train_gpt.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script),
           "--width", "64", "--layers", "2", "--heads", "2", "--seq", "32", "--batch", "8", "--steps", "3",
           "--replicas", "2", "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 pipelines x 2 stages on cpu, 3 steps, 1,536 tokens" in run.stdout, run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica-0", "replica-1"]
    for stage in range(2):  # other batches, averaged gradients: the replicas' weights stay the same
        a, b = (torch.load(tmp_path / f"replica-{r}" / "step-00000003" / f"stage-{stage}.pt", weights_only=True)
                for r in range(2))
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"] if n != "_extra_state")


def _checkpoint_worker(rank, world, ckpt_dir, steps, micro_batches=MB, skip_load=False):
    """``steps`` steps (from a checkpoint if there is one), saving after each;
    returns (step resumed from, or the error of load_latest)."""
    config = PipelineConfig(d=D, k=K, codec=INT8, micro_batches=micro_batches, timeout_s=3.0)
    stage = PipelineStage(stage_module(rank, world, D, 0), config, micro_batch_shape=(BATCH // micro_batches, SEQ),
                          loss_fn=loss_fn if rank == world - 1 else None)
    opt = torch.optim.SGD(stage.parameters(), lr=0.05)
    if skip_load:
        time.sleep(8)
        return "skipped"
    try:
        checkpoint.load_latest(ckpt_dir, stage, opt)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    resumed = stage.steps_done
    while stage.steps_done < steps:
        inputs, targets = batch(stage.steps_done, BATCH, SEQ)
        stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
        opt.step()
        checkpoint.save(ckpt_dir, stage, opt)
    return resumed


def test_checkpoint_resumes_when_a_stage_is_a_checkpoint_ahead(tmp_path):
    """Stage 1 died before saving step 3, stage 0 had saved it: both resume from step 2 (with
    keep=1 stage 0 had only step 3 and both started over)."""
    ckpt = tmp_path / "ckpt"
    assert _ok(spawn(_checkpoint_worker, 2, str(ckpt), 3, out_dir=str(tmp_path / "a"))) == [0, 0]
    (ckpt / "step-00000003" / "stage-1.pt").unlink()
    assert _ok(spawn(_checkpoint_worker, 2, str(ckpt), 3, out_dir=str(tmp_path / "b"))) == [2, 2]
    assert sorted(p.name for p in (ckpt / "step-00000003").iterdir()) == ["stage-0.pt", "stage-1.pt"]
    assert not (ckpt / "step-00000001").exists()  # keep=2: steps 2 and 3


def test_checkpoint_save_removes_an_abandoned_runs_later_steps(tmp_path):
    """Stage 1's checkpoints lost: the stages start over, and stage 0's saves remove its own
    later checkpoints (keeping the newest by step number deleted the file just written)."""
    ckpt = tmp_path / "ckpt"
    _ok(spawn(_checkpoint_worker, 2, str(ckpt), 3, out_dir=str(tmp_path / "a")))
    for f in ckpt.glob("step-*/stage-1.pt"):
        f.unlink()
    assert _ok(spawn(_checkpoint_worker, 2, str(ckpt), 1, out_dir=str(tmp_path / "b"))) == [0, 0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000001"]
    assert sorted(p.name for p in (ckpt / "step-00000001").iterdir()) == ["stage-0.pt", "stage-1.pt"]


def test_checkpoint_of_another_pipeline_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _ok(spawn(_checkpoint_worker, 2, str(ckpt), 1, out_dir=str(tmp_path / "a")))
    results = _ok(spawn(_checkpoint_worker, 2, str(ckpt), 1, 2, out_dir=str(tmp_path / "b")))
    for r in results:
        assert r.startswith("ValueError: checkpoint ") and "micro_batches=4, this one has micro_batches=2" in r, r


def test_checkpoint_agreement_is_bounded_by_the_timeout(tmp_path):
    """A stage that never calls load_latest: the others fail within timeout_s (was 30 minutes)."""
    results = spawn(_checkpoint_worker, 2, str(tmp_path / "ckpt"), 1, MB, out_dir=str(tmp_path / "a"), timeout=60)
    assert results[0]["ok"] == 0 and results[1]["ok"] == 0  # (both load: nothing there)
    started = time.monotonic()
    results = spawn(_skipping_worker, 2, str(tmp_path / "ckpt"), out_dir=str(tmp_path / "b"), timeout=60)
    msg = results[0]["ok"]
    assert msg.startswith("PipelineError: stage 0: ") and "checkpoint.load_latest's agreement" in msg, results
    assert "timed out after 3.0 s" in msg, msg
    assert time.monotonic() - started < 30


def _skipping_worker(rank, world, ckpt_dir):
    return _checkpoint_worker(rank, world, ckpt_dir, 1, MB, skip_load=rank == 1)


def test_checkpoint_keeps_at_least_two(tmp_path):
    with pytest.raises(ValueError, match="keep=1 must be at least 2"):
        checkpoint.save(tmp_path, object(), None, keep=1)


# ---- gradient clipping ---------------------------------------------------------------

def _clip_worker(rank, world, max_norm, norm_type):
    """One step, then the pipeline-wide clip; returns the gradients before and after and the norm."""
    stage = _make_stage(rank, world, PipelineConfig(d=D, k=K, codec=INT8, grad_codec=GRAD_INT8, micro_batches=MB))
    inputs, targets = batch(0, BATCH, SEQ)
    stage.step(inputs if rank == 0 else None, targets if rank == world - 1 else None)
    before = [p.grad.clone() for p in stage.parameters()]
    norm = stage.clip_grad_norm_(max_norm, norm_type)
    return dict(before=before, after=[p.grad.clone() for p in stage.parameters()], norm=norm.item())


@pytest.mark.parametrize("max_norm, norm_type", [(0.05, 2.0), (0.01, float("inf")), (1e6, 2.0)],
                         ids=["l2", "inf", "no-clip"])
def test_clip_grad_norm_over_the_whole_pipeline(max_norm, norm_type, tmp_path):
    """Every stage's gradients clipped as torch.nn.utils.clip_grad_norm_ clips
    all stages' gradients together in one process, and the same total norm."""
    world = 3
    outs = _ok(spawn(_clip_worker, world, max_norm, norm_type, out_dir=str(tmp_path)))
    grads = [g.clone() for o in outs for g in o["before"]]
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    want_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type).item()
    for o in outs:
        assert o["norm"] == pytest.approx(want_norm, rel=1e-6)
    clipped = [g for o in outs for g in o["after"]]
    for got, p in zip(clipped, params):
        torch.testing.assert_close(got, p.grad, **tolerance(torch.float32))
    if max_norm > want_norm:
        assert all(torch.equal(a, b) for o in outs for a, b in zip(o["after"], o["before"]))
    else:
        assert not any(torch.equal(a, b) for o in outs for a, b in zip(o["after"], o["before"]))


def test_clip_grad_norm_arguments():
    stage = PipelineStage.__new__(PipelineStage)  # (the arguments are checked before any message)
    with pytest.raises(ValueError, match="max_norm=-1.0 must be a finite number >= 0"):
        stage.clip_grad_norm_(-1.0)
    with pytest.raises(ValueError, match="norm_type=0 must be > 0"):
        stage.clip_grad_norm_(1.0, 0)
