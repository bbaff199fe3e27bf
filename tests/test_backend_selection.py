"""Backend selection: ``auto`` follows the measured ranking for the GPU and the
pass, skips backends that are unavailable or cannot run the case, and ends at
the reference; ``bench/rank_backends.py`` turns a GPU benchmark run into that
ranking.

The selection logic is tested with stand-in backend modules (no GPU here);
the ranking script with a hand-written benchmark JSON whose medians are
chosen by the test, not measured.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import types

import pytest
import torch

from resbm_kernels import backends, ops
from resbm_kernels.backends import Case, reference, use_backend
from resbm_kernels.codec import Codec

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARD = "Test GPU 80GB"
CUDA = torch.device("cuda", 0)


def _load_rank_backends():
    spec = importlib.util.spec_from_file_location("resbm_rank_backends", ROOT / "bench" / "rank_backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rank_backends = _load_rank_backends()


def fake_backend(name, *, device_ok=True, cannot=None):
    """A stand-in backend module: supports CUDA devices if ``device_ok``; cannot
    run cases whose k is in ``cannot``."""
    return types.SimpleNamespace(
        name=name,
        supports=lambda device: device_ok and torch.device(device).type == "cuda",
        unsupported=lambda case: f"k={case.k} is not supported" if case.k in (cannot or ()) else None,
    )


@pytest.fixture
def world(monkeypatch):
    """Fake triton/cuda modules, the real reference, a fake card name and a
    ranking table the test fills in; returns (modules, table)."""
    modules = {"reference": reference, "triton": fake_backend("triton"), "cuda": fake_backend("cuda")}
    table = {}

    def load(name):
        module = modules[name]
        return (None, "ImportError: not built") if module is None else (module, "")

    monkeypatch.setattr(backends, "_load", load)
    monkeypatch.setattr(backends, "device_name", lambda device: CARD)
    monkeypatch.setattr(backends, "measured", lambda: table)
    monkeypatch.delenv("RESBM_BACKEND", raising=False)
    return modules, table


def chosen(case=Case("encode_forward", 4096, 32)):
    return getattr(backends.select(CUDA, case), "name", "reference")


def test_auto_follows_the_measured_ranking_per_pass(world):
    modules, table = world
    table[CARD] = {"encode_forward": ["cuda", "triton", "reference"], "decode_forward": ["triton", "cuda"]}
    assert chosen(Case("encode_forward", 4096, 32)) == "cuda"
    assert chosen(Case("decode_forward", 4096, 32)) == "triton"


def test_auto_may_prefer_the_reference_where_it_measured_fastest(world):
    _, table = world
    table[CARD] = {"decode_backward": ["reference", "triton"]}
    assert chosen(Case("decode_backward", 4096, 32)) == "reference"


def test_auto_on_an_unmeasured_card_or_pass_uses_the_default_order(world):
    _, table = world
    table["Some other GPU"] = {"encode_forward": ["cuda"]}
    assert backends.auto_order(CARD, "encode_forward") == backends.DEFAULT_ORDER
    assert chosen() == backends.DEFAULT_ORDER[0]
    table[CARD] = {"decode_forward": ["cuda"]}
    assert backends.auto_order(CARD, "encode_forward") == backends.DEFAULT_ORDER


def test_auto_skips_a_backend_that_cannot_run_the_case(world):
    modules, table = world
    table[CARD] = {"encode_forward": ["cuda", "triton"]}
    modules["cuda"] = fake_backend("cuda", cannot={512})
    assert chosen(Case("encode_forward", 4096, 512)) == "triton"
    modules["triton"] = fake_backend("triton", cannot={512})
    assert chosen(Case("encode_forward", 4096, 512)) == "reference"
    assert chosen(Case("encode_forward", 4096, 256)) == "cuda"


def test_auto_skips_unavailable_backends(world):
    modules, table = world
    table[CARD] = {"encode_forward": ["cuda", "triton"]}
    modules["cuda"] = None
    assert chosen() == "triton"
    modules["triton"] = fake_backend("triton", device_ok=False)
    assert chosen() == "reference"


def test_auto_runs_cpu_tensors_on_the_reference(world):
    _, table = world
    table[CARD] = {"encode_forward": ["triton"]}
    assert backends.select(torch.device("cpu"), Case("encode_forward", 64, 16)) is reference


def test_a_named_backend_is_used_or_raises(world):
    modules, _ = world
    with use_backend("cuda"):
        assert chosen() == "cuda"
    modules["cuda"] = None
    with use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available: ImportError"):
        chosen()


def test_triton_on_cpu_without_the_interpreter_names_the_switch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"'triton' does not support device cpu "
                                                                   r"\(on the CPU it runs with TRITON_INTERPRET=1"):
        ops.encode(torch.randn(8, 64), torch.randn(16, 64), Codec())


def test_ops_pass_the_case_to_select(monkeypatch):
    """The public ops describe the pass to select: name, widths, dtypes, codecs."""
    seen = []
    real = backends.select

    def spy(device, case=None):
        seen.append(case)
        return real(device, case)

    monkeypatch.setattr(ops, "select", spy)
    codec, grad_codec = Codec(bits=8, group_size=16), Codec(bits=4, rounding="stochastic")
    x, w_e, w_d = torch.randn(5, 64), torch.randn(32, 64), torch.randn(64, 32)
    payload = ops.encode(x, w_e, codec)
    ops.decode(payload, w_d, codec, 5, out_dtype=torch.bfloat16)
    ops.decode_backward(torch.randn(5, 64), payload, w_d, codec, grad_codec)
    assert seen == [
        Case("encode_forward", 64, 32, (torch.float32, torch.float32), (codec,)),
        Case("decode_forward", 64, 32, (torch.float32, torch.bfloat16), (codec,)),
        Case("decode_backward", 64, 32, (torch.float32, torch.float32), (codec, grad_codec)),
    ]


# ---- the fast backends' limits ----------------------------------------------------------------


def test_triton_limits():
    from resbm_kernels.backends import triton as tb

    ok = Case("encode_forward", 96, 48, (torch.bfloat16,), (Codec(bits=8, group_size=16),))
    assert tb.unsupported(ok) is None
    assert tb.unsupported(Case("encode_forward", 96, 48, (torch.bfloat16,), (Codec(bits=8),))) is None
    assert "multiples of 16" in tb.unsupported(Case("encode_forward", 96, 24))
    assert tb.unsupported(Case("encode_forward", 512, 256)) is None
    assert "larger than 256" in tb.unsupported(Case("encode_forward", 512, 272))
    assert "float64" in tb.unsupported(Case("encode_forward", 96, 48, (torch.float64,)))
    assert "power of two" in tb.unsupported(Case("encode_forward", 96, 48, (), (Codec(bits=8, group_size=24),)))


def test_cuda_limits():
    from resbm_kernels.backends import cuda as cb

    assert cb.unsupported(Case("decode_forward", 1024, 256, (torch.bfloat16,), (Codec(bits=8, group_size=64),))) is None
    assert "larger than 256" in cb.unsupported(Case("decode_forward", 1024, 512))
    assert "multiples of 16" in cb.unsupported(Case("decode_forward", 72, 16))
    # fp16 dequantized operands are split into fp16 hi + lo: auto leaves those passes to Triton
    assert cb.unsupported(Case("encode_forward", 1024, 64, (torch.float16,))) is None
    for op in ("decode_forward", "decode_backward", "encode_backward"):
        assert "precision" in cb.unsupported(Case(op, 1024, 64, (torch.float16, torch.float16)))
        assert cb.unsupported(Case(op, 1024, 64, (torch.bfloat16, torch.bfloat16))) is None


# ---- the shipped ranking and the script that writes it ------------------------------------------


def test_shipped_ranking_is_valid():
    backends.measured.cache_clear()
    table = backends.measured()
    data = json.loads(backends.MEASURED.read_text())
    assert set(table) == set(data["devices"])
    for card, passes in table.items():
        assert passes == data["devices"][card]["passes"], f"{card}: unknown backend names in measured.json"
        assert set(passes) <= {"encode_forward", "decode_forward", "decode_backward", "encode_backward"}


def test_ranking_file_with_unknown_format_is_rejected(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"format": 2, "devices": {}}))
    with pytest.raises(ValueError, match="unknown format 2"):
        backends.measured.__wrapped__(path)


def _item(op, backend, median_s, n=16384, d=4096, k=32, bits=8, suite="kernels"):
    return {"extra_info": {"suite": suite, "pass": op, "backend": backend, "N": n, "d": d, "k": k, "bits": bits,
                           "median_s": median_s}}


def _results(items, gpu=CARD):
    info = {"torch": "2.x", "triton": "3.x"} | ({"gpu": gpu} if gpu else {})
    return {"machine_info": info, "datetime": "2026-11-25T00:00:00", "benchmarks": items}


def test_rank_orders_backends_by_geometric_mean_time_ratio():
    items = [
        # encode_forward: cuda 2x faster than triton at one shape, 1.25x slower at the other
        # -> geomeans cuda sqrt(1.25) = 1.118, triton sqrt(2) = 1.414: cuda first
        _item("encode_forward", "cuda", 1.0), _item("encode_forward", "triton", 2.0),
        _item("encode_forward", "eager", 10.0),
        _item("encode_forward", "cuda", 1.25, k=128), _item("encode_forward", "triton", 1.0, k=128),
        _item("encode_forward", "eager", 8.0, k=128),
        # a shape only triton ran does not count
        _item("encode_forward", "triton", 0.001, k=64),
        # decode_forward: the reference wins; the torch.compile baseline is not a backend
        _item("decode_forward", "triton", 3.0), _item("decode_forward", "eager", 1.0),
        _item("decode_forward", "compile", 0.5),
        _item("decode_forward", "triton", 1.0, suite="wire"),
    ]
    card, entry = rank_backends.rank(_results(items))
    assert card == CARD
    assert entry["passes"] == {"decode_forward": ["reference", "triton"],
                               "encode_forward": ["cuda", "triton", "reference"]}
    assert entry["shapes"] == {"decode_forward": 1, "encode_forward": 2}
    assert entry["time_vs_fastest_geomean"]["encode_forward"] == {
        "cuda": round(1.25 ** 0.5, 3), "triton": round(2 ** 0.5, 3), "reference": round((10 * 8) ** 0.5, 3)}


def test_rank_rejects_cpu_results_and_disjoint_shapes():
    with pytest.raises(ValueError, match="not measured on a GPU"):
        rank_backends.rank(_results([_item("encode_forward", "eager", 1.0)], gpu=None))
    with pytest.raises(ValueError, match="no kernel benchmark items"):
        rank_backends.rank(_results([]))
    disjoint = [_item("encode_forward", "cuda", 1.0, k=32), _item("encode_forward", "triton", 1.0, k=128)]
    with pytest.raises(ValueError, match="no shape was measured on every backend"):
        rank_backends.rank(_results(disjoint))


def test_rank_script_updates_one_card_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "measured.json"
    out.write_text(json.dumps({"format": 1, "devices": {"Other GPU": {"passes": {"encode_forward": ["cuda"]}}}}))
    results = tmp_path / "card-2026-11-25.json"
    results.write_text(json.dumps(_results([_item("encode_forward", "triton", 1.0),
                                            _item("encode_forward", "eager", 4.0)])))
    assert rank_backends.main([str(results), "--out", str(out)]) == 0
    assert "encode_forward   triton (1.00x) > reference (4.00x)" in capsys.readouterr().out
    table = backends.measured.__wrapped__(out)
    assert table == {"Other GPU": {"encode_forward": ["cuda"]}, CARD: {"encode_forward": ["triton", "reference"]}}
    assert json.loads(out.read_text())["devices"][CARD]["source"] == results.name
    assert rank_backends.main([str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_use_backend_is_seen_by_other_threads():
    """The autograd engine runs CUDA backward passes on its own threads: the
    use_backend choice must reach them (it is process-wide)."""
    import threading

    seen = []
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(backends.requested()))
        t.start()
        t.join()
        with use_backend("triton"):
            assert backends.requested() == "triton"
        assert backends.requested() == "reference"
    assert seen == ["reference"]


def test_environment_switches_take_0_or_1(monkeypatch):
    from resbm_kernels import checks, native

    monkeypatch.setenv("RESBM_TEST_SWITCH", "")
    assert checks.switch("RESBM_TEST_SWITCH") is False and checks.switch("RESBM_TEST_SWITCH", default=True) is True
    monkeypatch.setenv("RESBM_TEST_SWITCH", "0")
    assert checks.switch("RESBM_TEST_SWITCH", default=True) is False
    monkeypatch.setenv("RESBM_TEST_SWITCH", " 1 ")
    assert checks.switch("RESBM_TEST_SWITCH") is True
    monkeypatch.setenv("RESBM_CUDA_EMULATE", "yes")
    with pytest.raises(ValueError, match="RESBM_CUDA_EMULATE must be 0 or 1, not 'yes'"):
        native.emulating()
