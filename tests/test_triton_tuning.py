"""Launch-configuration tuning of the Triton kernels (llmfast/triton/_tuning.py), and every
tile shape the attention tuner may pick, run for correctness.

The Tuner is checked with a fake timer (no GPU needed): it measures only large calls, keeps the
fastest candidate per problem class, skips candidates that do not fit, and falls back to the
default where it cannot measure. The GPU tile shapes are checked in Triton's interpreter (or on
the GPU) by forcing each one and comparing forward and backward with the float64 reference, so
that no configuration the tuner can choose on an H100 has gone untested.
"""
import os

import pytest
import torch

import llmfast
import llmfast.functional as LF
from conftest import TRITON_DEVICES
from llmfast.reference.attention import attention as reference_attention

triton_ok = "triton" in llmfast.available_backends()
needs_triton = pytest.mark.skipif(not triton_ok, reason="Triton is not usable here")

if triton_ok:
    from llmfast.triton import _tuning
    from llmfast.triton import attention as tattn


if triton_ok:
    class _Unfit(_tuning.UNFIT_ERRORS[0]):
        """A configuration that does not fit (Triton's constructor arguments vary by version)."""

        def __init__(self):
            Exception.__init__(self, "out of resource: shared memory")


class _FakeTimer:
    """Times a launch as a fixed cost per configuration, and records what was launched."""

    def __init__(self, cost, unfit=()):
        self.cost, self.unfit, self.calls = cost, set(unfit), []
        self.current = None

    def __call__(self, run):
        run()
        if self.current in self.unfit:
            raise _Unfit()
        return self.cost[self.current]


def _tuner_with(cost, unfit=()):
    timer = _FakeTimer(cost, unfit)
    tuner = _tuning.Tuner("test", timer=timer)

    def launch(config):
        timer.current = config
        timer.calls.append(config)

    return tuner, timer, launch


@needs_triton
def test_tuner_keeps_the_fastest_per_class(monkeypatch):
    monkeypatch.setattr(_tuning.Tuner, "_can_measure", lambda self, device: True)
    tuner, timer, launch = _tuner_with({"a": 3.0, "b": 1.0, "c": 2.0})
    dev = torch.device("cpu")
    assert tuner.choose("k1", ["a", "b", "c"], launch, device=dev, large=True) == "b"
    assert sorted(timer.calls) == ["a", "b", "c"]
    assert tuner.timings("k1") == {"a": 3.0, "b": 1.0, "c": 2.0}
    timer.calls.clear()
    assert tuner.choose("k1", ["a", "b", "c"], launch, device=dev, large=True) == "b"
    assert timer.calls == [], "a known class must not be measured again"
    timer.cost = {"a": 0.5, "b": 1.0, "c": 2.0}
    assert tuner.choose("k2", ["a", "b", "c"], launch, device=dev, large=True) == "a"
    assert tuner.chosen() == {"k1": "b", "k2": "a"}


@needs_triton
def test_tuner_skips_unfit_configurations(monkeypatch):
    monkeypatch.setattr(_tuning.Tuner, "_can_measure", lambda self, device: True)
    tuner, timer, launch = _tuner_with({"a": 3.0, "b": 1.0, "c": 2.0}, unfit={"b"})
    assert tuner.choose("k", ["a", "b", "c"], launch, device=torch.device("cpu"), large=True) == "c"
    tuner, timer, launch = _tuner_with({"a": 3.0, "b": 1.0}, unfit={"a", "b"})
    assert tuner.choose("k", ["a", "b"], launch, device=torch.device("cpu"), large=True) == "a"
    assert tuner.chosen() == {}, "nothing fitted: nothing may be remembered"


@needs_triton
def test_tuner_takes_the_default_without_measuring(monkeypatch):
    tuner, timer, launch = _tuner_with({"a": 3.0, "b": 1.0})
    cpu = torch.device("cpu")
    # On the CPU (the interpreter) nothing is measured.
    assert tuner.choose("k", ["a", "b"], launch, device=cpu, large=True) == "a"
    monkeypatch.setattr(_tuning.Tuner, "_can_measure", lambda self, device: True)
    assert tuner.choose("k", ["a", "b"], launch, device=cpu, large=False) == "a", "small calls are not measured"
    assert tuner.choose("k", ["b"], launch, device=cpu, large=True) == "b"
    assert timer.calls == []
    with tuner.forced("b"):
        assert tuner.choose("k", ["a", "b"], launch, device=cpu, large=True) == "b"
    assert timer.calls == []


@needs_triton
def test_tuning_switch_and_capture(monkeypatch):
    tuner = _tuning.Tuner("test")
    monkeypatch.setenv("LLMFAST_TRITON_AUTOTUNE", "0")
    assert not tuner._can_measure(torch.device("cuda", 0))
    monkeypatch.setenv("LLMFAST_TRITON_AUTOTUNE", "1")
    assert not tuner._can_measure(torch.device("cpu"))
    if torch.cuda.is_available():
        assert tuner._can_measure(torch.device("cuda", 0))


def _all_candidates(pick):
    """Every tile shape a candidate table holds for any head dim and dtype on the GPU."""
    seen = []
    for d in (64, 128, 256):
        for elt in (2, 4):
            for cfg in pick(d, elt, True):
                if cfg not in seen:
                    seen.append(cfg)
    return seen


@needs_triton
def test_candidate_tables():
    """Defaults first and unchanged by the table order; shapes the kernels accept (powers of
    two >= 16, tl.dot needs 16)."""
    for pick in (tattn._fwd_candidates, tattn._dkdv_candidates, tattn._dq_candidates):
        for d in (16, 64, 128, 256):
            for elt in (2, 4):
                table = pick(d, elt, True)
                assert len(table) == len(set(table)), f"{pick.__name__}({d}, {elt}) repeats a candidate"
                for cfg in table:
                    for block in (cfg.block_m, cfg.block_n):
                        assert block >= 16 and block & (block - 1) == 0, cfg
                    assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4, cfg
        assert len(pick(64, 2, False)) == 1, "the interpreter runs one fixed tile"
    # Dropout and GQA (spill_prone) reorder the backward tables (a spill-free default), same shapes.
    for pick in (tattn._dkdv_candidates, tattn._dq_candidates):
        for d in (16, 64, 128, 256):
            for elt in (2, 4):
                assert set(pick(d, elt, True, spill_prone=True)) == set(pick(d, elt, True)), (pick.__name__, d, elt)


def _pairs():
    """(forward, dK/dV, dQ) configurations so that each table's every entry runs once."""
    fwd, dkdv, dq = (_all_candidates(p) for p in (tattn._fwd_candidates, tattn._dkdv_candidates,
                                                    tattn._dq_candidates))
    n = max(len(fwd), len(dkdv), len(dq))
    return [(fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)]) for i in range(n)]


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("index", range(8))
def test_every_gpu_tile_shape_is_correct(device, index, poison):
    """Forces each GPU candidate tile shape (forward, dK/dV, dQ) on a causal problem whose
    lengths are no multiple of any tile, with a key-padding mask, and compares output and
    gradients with the float64 reference."""
    pairs = _pairs()
    if index >= len(pairs):
        pytest.skip("fewer configurations than test slots")
    # Spread the configurations over the test slots (each slot runs every 8th triple).
    triples = pairs[index::8]
    torch.manual_seed(index)
    B, H, Sq, Sk, D = 1, 2, 150, 173, 32
    dtype = torch.float16
    q, k, v = (torch.randn(B, H, s, D, device=device, dtype=dtype) for s in (Sq, Sk, Sk))
    keep = torch.rand(B, 1, 1, Sk, device=device) > 0.2
    gout = torch.randn(B, H, Sq, D, device=device, dtype=dtype)
    ql, kl, vl = (t.double().requires_grad_() for t in (q, k, v))
    gold, _ = reference_attention(ql, kl, vl, keep, 0.0, True)
    gold_grads = torch.autograd.grad(gold, (ql, kl, vl), gout.double())
    for fwd_cfg, dkdv_cfg, dq_cfg in triples:
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        with llmfast.use_backend("triton"), tattn.FWD_TUNER.forced(fwd_cfg), \
                tattn.DKDV_TUNER.forced(dkdv_cfg), tattn.DQ_TUNER.forced(dq_cfg):
            out = LF.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep, is_causal=True)
            grads = torch.autograd.grad(out, (qt, kt, vt), gout)
        what = f"fwd {fwd_cfg}, dkdv {dkdv_cfg}, dq {dq_cfg}"
        torch.testing.assert_close(out.double(), gold, atol=2e-3, rtol=2e-3, msg=lambda m: f"{what}: {m}")
        for name, a, g in zip("qkv", grads, gold_grads):
            torch.testing.assert_close(a.double(), g, atol=1e-2, rtol=1e-2,
                                       msg=lambda m: f"{what}: grad {name}: {m}")


@needs_triton
def test_tuning_report_lists_choices_and_timings(monkeypatch):
    """The benchmark stores tuning_report() beside the attention timings."""
    monkeypatch.setattr(_tuning.Tuner, "_can_measure", lambda self, device: True)
    tuner = _tuning.Tuner("attention_fwd", timer=lambda run: (run(), float(timer_cost[0]))[1])
    monkeypatch.setattr(tattn, "FWD_TUNER", tuner)
    monkeypatch.setattr(tattn, "DKDV_TUNER", _tuning.Tuner("attention_bwd_dkdv"))
    monkeypatch.setattr(tattn, "DQ_TUNER", _tuning.Tuner("attention_bwd_dq"))
    fast, slow = tattn._Config(128, 64, 4, 3), tattn._Config(64, 64, 4, 3)
    timer_cost = [0.0]

    def launch(cfg):
        timer_cost[0] = 1.0 if cfg == fast else 2.0

    key = tattn._tune_key(2, 8, 8, 1000, 4000, 64, 64, torch.bfloat16, 0, False, False, False, False, True, None)
    assert tuner.choose(key, [slow, fast], launch, device=torch.device("cpu"), large=True) == fast
    (entry,) = tattn.tuning_report()
    assert entry["kernel"] == "attention_fwd" and entry["chosen"] == fast._asdict()
    assert entry["problem"]["Sq_bucket"] == 1024 and entry["problem"]["Sk_bucket"] == 4096
    assert entry["problem"]["dtype"] == "bfloat16" and entry["problem"]["D"] == 64
    assert [c["ms"] for c in entry["candidates_ms"]] == [1.0, 2.0]


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("feature", ["gqa", "softcap_window", "dropout", "mask_grad"])
def test_fused_dq_plan_matches_two_kernel_plan(device, feature):
    """The fused-dQ backward (atomic fp32 dQ inside the dK/dV kernel) gives the gradients of the
    two-kernel plan, with GQA, softcap and a window, dropout, and an additive mask's gradient."""
    torch.manual_seed(3)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, (2 if feature == "gqa" else 4), 70, 90, 32
    q = torch.randn(B, Hq, Sq, D, device=device, dtype=torch.float16)
    k, v = (torch.randn(B, Hkv, Sk, D, device=device, dtype=torch.float16) for _ in range(2))
    kw = dict(enable_gqa=Hkv != Hq, is_causal=feature != "mask_grad")
    if feature == "softcap_window":
        kw.update(softcap=5.0, window_size=(20, 0))
    if feature == "dropout":
        kw.update(dropout_p=0.3)
    mask = None
    if feature == "mask_grad":
        mask = torch.randn(B, 1, Sq, Sk, device=device, dtype=torch.float16).requires_grad_()
    gout = torch.randn(B, Hq, Sq, D, device=device, dtype=torch.float16)
    fused = tattn._Config(32, 32, 4, 2, True) if device == "cpu" else tattn._Config(64, 64, 4, 2, True)
    plain = fused._replace(fused_dq=False)
    results = []
    for cfg in (plain, fused):
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        inputs = (qt, kt, vt) + ((mask,) if mask is not None else ())
        torch.manual_seed(7)  # the same dropout pattern for both plans
        with llmfast.use_backend("triton"), tattn.DKDV_TUNER.forced(cfg):
            out = LF.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kw)
            results.append((out,) + torch.autograd.grad(out, inputs, gout))
    for name, a, b in zip(["out", "dq", "dk", "dv", "dmask"], *results):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b.float(), a.float(), atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(results[1][1], torch.zeros_like(results[1][1])), "dQ must have been written"


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="times kernels on a GPU")
def test_tuning_on_the_gpu(monkeypatch):
    """A large problem is tuned for real (CUDA-event timings of every candidate that fits), the
    choice is reported, and the tuned kernels still match the reference."""
    monkeypatch.setenv("LLMFAST_TRITON_AUTOTUNE", "1")
    for name in ("FWD_TUNER", "DKDV_TUNER", "DQ_TUNER"):
        monkeypatch.setattr(tattn, name, _tuning.Tuner(getattr(tattn, name).name))
    torch.manual_seed(0)
    B, H, S, D = 1, 4, 2048, 64  # B * H * S * S = 2^24: just large enough to be tuned
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with llmfast.use_backend("triton"):
        out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    report = tattn.tuning_report()
    assert {e["kernel"] for e in report} == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
    for entry in report:
        assert len(entry["candidates_ms"]) >= 2 and all(c["ms"] > 0 for c in entry["candidates_ms"])
    gold = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    gold_grads = torch.autograd.grad(gold, (q, k, v), torch.ones_like(gold))
    torch.testing.assert_close(out.float(), gold, atol=2e-2, rtol=2e-2)
    for a, g in zip(grads, gold_grads):
        torch.testing.assert_close(a.float(), g.float(), atol=5e-2, rtol=5e-2)


@needs_triton
def test_launch_falls_back_to_a_configuration_that_fits():
    """A configuration over the GPU's shared memory (Triton raises OutOfResources before
    launching) gives way to the next candidate that fits, which is then kept for the class."""
    tuner = _tuning.Tuner("test")
    ran = []

    def launch(cfg):
        if cfg in ("big", "bigger"):
            raise _Unfit()
        ran.append(cfg)

    assert tuner.launch_fitting("k", "big", ["big", "bigger", "small", "tiny"], launch) == "small"
    assert ran == ["small"] and tuner.chosen() == {"k": "small"}
    assert tuner.launch_fitting("k", "tiny", ["big", "tiny"], launch) == "tiny"
    with pytest.raises(_tuning.UNFIT_ERRORS):
        tuner.launch_fitting("k2", "big", ["big", "bigger"], launch)
    with tuner.forced("big"), pytest.raises(_tuning.UNFIT_ERRORS):
        tuner.launch_fitting("k3", "big", ["big", "small"], launch)  # a forced tile is not replaced
