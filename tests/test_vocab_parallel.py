"""Vocabulary-parallel cross-entropy (process_group=...) in 2 and 3 CPU processes over gloo.

One spawn per world size runs every case (process start-up, about 3 s per process, dominates
the time; one spawn per case would not fit the suite's budget): each rank takes its slice of
deterministic inputs, calls llmfast.functional / llmfast.nn with process_group, backpropagates a
given upstream gradient and saves its loss and gradients (or the error it raised). The test
functions then run in this process, one per (world, case): the loss of every rank and the
gradients joined over the ranks are compared with llmfast.reference on the unsplit inputs in
float64.

Grid: V = 97 (prime, so no split is even) split unevenly ([60, 37] and [50, 30, 17]); V = 5 with
a rank that holds no class ([0, 5], [3, 2, 0]); every reduction with a non-uniform upstream
gradient for 'none'; class weights, label smoothing, ignore_index (default and inside the
vocabulary), z_loss, softcap, leading dimensions, all targets ignored, logits of 1e4 with -inf
entries, inplace_backward, the nn modules; linear_cross_entropy with small chunks so every
path through the chunk loop runs; and the argument errors, which must be raised on every rank
together (no rank left waiting in a collective).
"""
import datetime
import os
import time
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llmfast
import llmfast.functional as LF
import llmfast.nn as lnn
from helpers import GRAD_REL_TOL, OUT_TOL, rel_error

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable")

WORLDS = [2, 3]
N = 12  # tokens
D = 16  # hidden size of the linear cases
SPLITS = {  # V -> world -> sizes by rank
    97: {2: [60, 37], 3: [50, 30, 17]},
    5: {2: [0, 5], 3: [3, 2, 0]},
}

# (id, options). kind: 'ce' (cross_entropy on logits slices) or 'linear'; shape: 'nd' puts the
# classes in dim 1 of a 3-d input; upstream: the scalar gradient of a reduced loss ('none' always
# gets a per-token one); ignore: 'third' (every third token is ignored), 'mid' (ignore_index is
# a class inside the vocabulary), 'all'.
CASES = [
    ("none", dict(reduction="none")),
    ("mean", dict(reduction="mean")),
    ("sum_upstream", dict(reduction="sum", upstream=0.37)),
    ("smoothing_mean", dict(reduction="mean", label_smoothing=0.1)),
    ("weight_smoothing_none", dict(reduction="none", weight=True, label_smoothing=0.2)),
    ("weight_ignore_mid_mean", dict(reduction="mean", weight=True, ignore="mid", upstream=2.0)),
    ("z_loss_weight_mean", dict(reduction="mean", weight=True, z_loss=1e-2)),
    ("softcap_none", dict(reduction="none", softcap=2.0)),
    ("everything_sum", dict(reduction="sum", weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=3.0,
                            ignore="mid")),
    ("float32_smoothing_mean", dict(reduction="mean", label_smoothing=0.1, weight=True, dtype=torch.float32)),
    ("bfloat16_weight_none", dict(reduction="none", weight=True, label_smoothing=0.1, dtype=torch.bfloat16)),
    ("float16_z_loss_mean", dict(reduction="mean", z_loss=1e-3, dtype=torch.float16)),
    ("noncontiguous_sum", dict(reduction="sum", noncontiguous=True, label_smoothing=0.1)),
    ("leading_dims_mean", dict(reduction="mean", shape="nd", weight=True, label_smoothing=0.05)),
    ("leading_dims_none", dict(reduction="none", shape="nd", z_loss=1e-3)),
    ("all_ignored_mean", dict(reduction="mean", ignore="all", label_smoothing=0.1)),
    ("all_ignored_sum", dict(reduction="sum", ignore="all")),
    ("large_logits_neg_inf", dict(reduction="mean", scale=1e4, neg_inf=True, z_loss=1e-6, dtype=torch.float32)),
    ("empty_slice_none", dict(reduction="none", V=5, weight=True, label_smoothing=0.1)),
    ("inplace_backward_mean", dict(reduction="mean", inplace=True, label_smoothing=0.1)),
    ("module", dict(reduction="mean", module=True, weight=True, label_smoothing=0.1)),
    ("linear_mean_bias", dict(kind="linear", reduction="mean", bias=True, chunk=4)),
    ("linear_none", dict(kind="linear", reduction="none", label_smoothing=0.1, z_loss=1e-3, chunk=5)),
    ("linear_sum_softcap", dict(kind="linear", reduction="sum", softcap=5.0, ignore="mid", bias=True,
                                upstream=0.5, chunk=3)),
    ("linear_float32", dict(kind="linear", reduction="mean", bias=True, label_smoothing=0.1,
                            dtype=torch.float32)),
    ("linear_bfloat16", dict(kind="linear", reduction="mean", bias=True, label_smoothing=0.1, chunk=4,
                             dtype=torch.bfloat16)),
    ("linear_empty_slice", dict(kind="linear", reduction="mean", V=5, bias=True, chunk=7)),
    ("linear_module", dict(kind="linear", reduction="sum", module=True, z_loss=1e-3)),
]
CASE_OPTS = dict(CASES)
# run by global ranks 1 and 2 of the 3-process world in a group of their own (group rank != rank)
SUBGROUP_CASE = ("subgroup_weight_smoothing_mean", dict(reduction="mean", weight=True, label_smoothing=0.1))

# (id, expected words in the message on every rank)
ERRORS = [
    ("error_target_out_of_range", ["target", "out of bounds", "[0, 97)"]),
    ("error_negative_target", ["target", "out of bounds"]),
    ("error_weight_local_shape", ["weight", "(97,)"]),
    ("error_token_counts_differ", ["same tokens"]),
    ("error_weight_dtype_on_one_rank", ["weight"]),
    ("error_requires_grad_differs", ["input", "requires_grad"]),
    ("error_inplace_saved_logits", ["modified by an inplace operation"]),
]


def _inputs(case_id, opts):
    """Full (unsplit) inputs of a case, the same in every process."""
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    V = opts.get("V", 97)
    dtype = opts.get("dtype", torch.float64)
    ignore_index = -100
    if opts.get("ignore") == "mid":
        ignore_index = V // 2
    t_shape = (N // 3, 3) if opts.get("shape") == "nd" else (N,)
    t = torch.randint(0, V, t_shape, generator=gen)
    if opts.get("ignore") == "all":
        t.fill_(ignore_index)
    else:
        t.view(-1)[1::3] = ignore_index
    kw = dict(reduction=opts["reduction"], ignore_index=ignore_index)
    for key in ("label_smoothing", "z_loss", "softcap"):
        if key in opts:
            kw[key] = opts[key]
    inputs = dict(t=t, kw=kw, V=V, dtype=dtype)
    if opts.get("kind", "ce") == "ce":
        x = torch.randn((N, V), generator=gen, dtype=torch.float64) * opts.get("scale", 3.0)
        if opts.get("neg_inf"):
            x[:, ::7] = float("-inf")
            t[(t >= 0) & (t % 7 == 0)] += 1  # never at the target
            x[0, :] = float("-inf")
            x[0, t[0]] = 3.0  # a single finite logit: loss exactly 0
        if opts.get("shape") == "nd":  # (N // 3, V, 3): classes in dim 1
            x = x.reshape(N // 3, 3, V).movedim(-1, 1).contiguous()
        inputs["x"] = x.to(dtype)
        if opts.get("weight"):
            inputs["weight"] = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    else:
        inputs["h"] = torch.randn((N, D), generator=gen, dtype=torch.float64).to(dtype)
        inputs["w"] = (torch.randn((V, D), generator=gen, dtype=torch.float64) * 0.5).to(dtype)
        if opts.get("bias"):
            inputs["b"] = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    if opts["reduction"] == "none":
        g = torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
        g.view(-1)[::4] = 1.0
        inputs["upstream"] = g
    else:
        inputs["upstream"] = torch.tensor(opts.get("upstream", 1.0), dtype=torch.float64)
    return inputs


def _slice(world, rank, V):
    sizes = SPLITS[V][world]
    offset = sum(sizes[:rank])
    return offset, sizes[rank]


# --- what each rank runs ----------------------------------------------------------------------
def _run_case(case_id, opts, world, rank, group):
    inp = _inputs(case_id, opts)
    offset, n_local = _slice(world, rank, inp["V"])
    t, kw, dtype = inp["t"], inp["kw"], inp["dtype"]
    out = {}
    if opts.get("kind", "ce") == "ce":
        if opts.get("noncontiguous"):  # a view of the full logits; backward fills this rank's columns
            full = inp["x"].clone().requires_grad_()
            x_local = full.narrow(1, offset, n_local)
        else:
            x_local = inp["x"].narrow(1, offset, n_local).contiguous().requires_grad_()
        weight = inp.get("weight")
        if opts.get("module"):
            loss_fn = lnn.CrossEntropyLoss(weight=weight, ignore_index=kw["ignore_index"], reduction=kw["reduction"],
                                           label_smoothing=kw.get("label_smoothing", 0.0), process_group=group)
            loss = loss_fn(x_local, t)
        elif opts.get("inplace"):
            logits = x_local * 1.0
            loss = LF.cross_entropy(logits, t, weight, **kw, process_group=group, inplace_backward=True)
            out["intact_after_forward"] = torch.equal(logits.detach(), x_local.detach())
        else:
            loss = LF.cross_entropy(x_local, t, weight, **kw, process_group=group)
        loss.backward(inp["upstream"].to(loss.dtype))
        out["grads"] = {"x": full.grad.narrow(1, offset, n_local) if opts.get("noncontiguous") else x_local.grad}
    else:
        h = inp["h"].clone().requires_grad_()
        w = inp["w"][offset:offset + n_local].clone().requires_grad_()
        b = inp["b"][offset:offset + n_local].clone().requires_grad_() if "b" in inp else None
        if opts.get("module"):
            loss_fn = lnn.LinearCrossEntropyLoss(**kw, chunk_size=opts.get("chunk"), process_group=group)
            loss = loss_fn(h, w, t, b)
        else:
            loss = LF.linear_cross_entropy(h, w, t, b, **kw, chunk_size=opts.get("chunk"), process_group=group)
        loss.backward(inp["upstream"].to(loss.dtype))
        out["grads"] = {"h": h.grad, "w": w.grad, "b": b.grad if b is not None else None}
    out["loss"] = loss.detach()
    return out


def _run_error(case_id, world, rank, group):
    """Makes one argument error; returns the message raised on this rank."""
    V = 97
    offset, n_local = _slice(world, rank, V)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((N, V), generator=gen)[:, offset:offset + n_local]
    t = torch.randint(0, V, (N,), generator=gen)
    weight = torch.rand(V, generator=gen) + 0.5
    try:
        if case_id == "error_target_out_of_range":
            t[3] = V  # a valid local index on rank 0, but past the global vocabulary
            LF.cross_entropy(x, t, process_group=group)
        elif case_id == "error_negative_target":
            t[5] = -1
            LF.cross_entropy(x, t, process_group=group)
        elif case_id == "error_weight_local_shape":
            LF.cross_entropy(x, t, weight[offset:offset + n_local], process_group=group)
        elif case_id == "error_token_counts_differ":
            rows = N - 1 if rank == 0 else N
            LF.cross_entropy(x[:rows], t[:rows], process_group=group)
        elif case_id == "error_weight_dtype_on_one_rank":
            w = weight.to(torch.int64) if rank == world - 1 else weight
            LF.cross_entropy(x, t, w, process_group=group)
        elif case_id == "error_requires_grad_differs":
            h = torch.randn(N, D, generator=gen).requires_grad_(rank == 0)
            w = torch.randn(n_local, D, generator=gen)
            LF.linear_cross_entropy(h, w, t, process_group=group)
        elif case_id == "error_inplace_saved_logits":
            leaf = x.clone().requires_grad_()
            logits = torch.tanh(leaf)  # tanh saves its output for backward
            LF.cross_entropy(logits, t, process_group=group, inplace_backward=True).backward()
        else:
            raise AssertionError(case_id)
    except Exception as e:  # noqa: BLE001 -- the message is the result
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank, world, init_file, out_dir):
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback (127.0.0.1) whatever the hostname resolves to
    torch.set_num_threads(1)
    # poison, as conftest's fixture: torch.empty returns NaN, so an unwritten gradient element fails
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    group = dist.group.WORLD
    results = {}
    try:
        for case_id, opts in CASES:
            try:
                results[case_id] = _run_case(case_id, opts, world, rank, group)
            except Exception:  # noqa: BLE001 -- reported by the test of this case
                results[case_id] = {"crash": traceback.format_exc()}
        for case_id, _ in ERRORS:
            results[case_id] = {"error": _run_error(case_id, world, rank, group)}
        if world == 3:
            sub = dist.new_group([1, 2])  # every rank takes part in creating it
            if rank in (1, 2):
                try:
                    results[SUBGROUP_CASE[0]] = _run_case(*SUBGROUP_CASE, 2, dist.get_rank(sub), sub)
                except Exception:  # noqa: BLE001
                    results[SUBGROUP_CASE[0]] = {"crash": traceback.format_exc()}
        dist.barrier()  # the group still works after every error
        results["_group_alive"] = True
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _spawn(world, tmp_dir, timeout_s=120):
    init_file = os.path.join(tmp_dir, "init")
    ctx = mp.spawn(_worker, args=(world, init_file, str(tmp_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world} ranks did not finish within {timeout_s} s (a collective hung?)")
    return [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _spawn(world, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]

    return get


# --- checks in this process -------------------------------------------------------------------
def _reference(case_id, opts):
    """float64 reference loss and gradients of the unsplit inputs."""
    inp = _inputs(case_id, opts)
    kw = inp["kw"]
    if opts.get("kind", "ce") == "ce":
        x = inp["x"].double().requires_grad_()
        weight = inp["weight"].double() if "weight" in inp else None
        loss = llmfast.reference.cross_entropy(x, inp["t"], weight, **kw)
        loss.backward(inp["upstream"])
        return inp, loss.detach(), {"x": x.grad}
    h = inp["h"].double().requires_grad_()
    w = inp["w"].double().requires_grad_()
    b = inp["b"].double().requires_grad_() if "b" in inp else None
    loss = llmfast.reference.linear_cross_entropy(h, w, inp["t"], b, **kw)
    loss.backward(inp["upstream"])
    return inp, loss.detach(), {"h": h.grad, "w": w.grad, "b": b.grad if b is not None else None}


def _check_grad(actual, expected, dtype, what, limit=None):
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    if not expected.any():
        assert not actual.any(), f"{what}: expected an all-zero gradient"
        return
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    # float64 statistics: the split changes only the order of the sums. float32: as
    # test_cross_entropy (10x the shared bound: the gradient is a difference of O(1) terms).
    tol = limit or (1e-11 if dtype == torch.float64 else
                    10 * GRAD_REL_TOL[dtype] if dtype == torch.float32 else GRAD_REL_TOL[dtype])
    err = rel_error(actual, expected, floor=1e-4)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
@pytest.mark.parametrize("world", WORLDS)
def test_matches_unsplit_reference(world, case_id, world_results):
    _compare(case_id, CASE_OPTS[case_id], [r[case_id] for r in world_results(world)])


def test_subgroup_of_the_world(world_results):
    """process_group = a new_group of global ranks 1 and 2 (ranks 0 and 1 inside it)."""
    _compare(SUBGROUP_CASE[0], SUBGROUP_CASE[1], [r[SUBGROUP_CASE[0]] for r in world_results(3)[1:]])


def _compare(case_id, opts, results):
    """Every rank's loss and the joined gradients against the unsplit float64 reference."""
    for rank, res in enumerate(results):
        assert "crash" not in res, f"rank {rank} raised:\n{res['crash']}"
    inp, ref_loss, ref_grads = _reference(case_id, opts)
    dtype = inp["dtype"]
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else OUT_TOL[dtype]
    grad_limit = None
    if opts.get("kind") == "linear" and dtype in (torch.float16, torch.bfloat16):
        # as test_cross_entropy: the logits of the matmul are rounded to the 16-bit dtype
        tol, grad_limit = dict(atol=5e-2, rtol=2e-2), 3e-2
    for rank, res in enumerate(results):
        assert res["loss"].dtype == dtype and res["loss"].shape == ref_loss.shape
        torch.testing.assert_close(res["loss"].double(), ref_loss, **tol, equal_nan=True,
                                   msg=lambda m: f"rank {rank} loss: {m}")
    if opts.get("kind", "ce") == "ce":
        joined = torch.cat([res["grads"]["x"] for res in results], dim=1)
        _check_grad(joined, ref_grads["x"], dtype, "grad of the logits (slices joined)")
    else:
        for rank, res in enumerate(results):  # all_reduced: the full gradient on every rank
            _check_grad(res["grads"]["h"], ref_grads["h"], dtype, f"rank {rank} grad_input", grad_limit)
        _check_grad(torch.cat([res["grads"]["w"] for res in results]), ref_grads["w"], dtype,
                    "grad_weight (slices joined)", grad_limit)
        if ref_grads["b"] is not None:
            _check_grad(torch.cat([res["grads"]["b"] for res in results]), ref_grads["b"], dtype,
                        "grad_bias (slices joined)", grad_limit)
    if opts.get("inplace"):
        assert all(res["intact_after_forward"] for res in results), \
            "inplace_backward must leave the logits intact until backward"


@pytest.mark.parametrize("case_id,words", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("world", WORLDS)
def test_errors_raised_on_every_rank(world, case_id, words, world_results):
    results = world_results(world)
    assert all(r.get("_group_alive") for r in results), "the process group broke after the error cases"
    messages = [r[case_id]["error"] for r in results]
    for rank, msg in enumerate(messages):
        assert msg is not None, f"rank {rank} raised nothing"
    if case_id == "error_weight_dtype_on_one_rank":
        # the rank with the bad weight names it; the others say which rank stopped them
        assert "weight must be a floating-point tensor" in messages[-1], messages[-1]
        for msg in messages[:-1]:
            assert f"rank(s) [{world - 1}]" in msg, msg
        return
    for rank, msg in enumerate(messages):
        for word in words:
            assert word in msg, f"rank {rank}: {word!r} not in {msg!r}"


def test_bad_process_group_names_the_argument():
    """Checked before any collective, so no process group is needed."""
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.randint(0, 10, (4,))
    for bad in ("world", 0, object()):
        with pytest.raises(TypeError, match="process_group must be None or a torch.distributed.ProcessGroup"):
            LF.cross_entropy(x, t, process_group=bad)
        with pytest.raises(TypeError, match="process_group"):
            LF.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), t, process_group=bad)
    with pytest.raises(TypeError, match="process_group"):
        lnn.CrossEntropyLoss(process_group="world")(x, t)
    with pytest.raises(TypeError, match="process_group"):
        lnn.LinearCrossEntropyLoss(process_group="world")(torch.randn(4, 8), torch.randn(10, 8), t)


def test_modules_keep_torch_state():
    """process_group is a keyword-only attribute, not state: the state_dict is torch's."""
    w = torch.rand(7)
    ours, theirs = lnn.CrossEntropyLoss(w, label_smoothing=0.1), torch.nn.CrossEntropyLoss(w, label_smoothing=0.1)
    assert ours.process_group is None and ours.state_dict().keys() == theirs.state_dict().keys()
    with pytest.raises(TypeError):
        lnn.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, None)  # process_group is keyword-only
