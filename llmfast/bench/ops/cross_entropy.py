"""Cross-entropy on given logits, and fused linear + cross-entropy (the LM head and its loss).

Shapes, byte and flop counts from PERF.md: logits (M, V), targets with ignore_index=-100 on
1/7 of the rows, mean reduction. Peers: torch eager, torch.compile of it (added for every op by
spec.providers_for) and Liger-Kernel's autograd Functions; cross_entropy also runs llmfast with
inplace_backward=True (the gradient written over the logits), where memory is the point.

The incoming gradient of the loss is 1 (a plain loss.backward()): llmfast and Liger both skip
their scaling pass over the gradient then, as in training without loss scaling.

Only fwd and fwd+bwd are measured: these kernels (llmfast's and Liger's) compute the gradient
during the forward of a training step and refuse, or silently rescale, a second backward
through the same graph, which the runner's bwd mode (retain_graph=True) would time.
"""
import torch
import torch.nn.functional as F

import llmfast.functional as LF
import llmfast.reference as R

from .. import peers
from ..spec import Case, OpSpec, Unavailable, register

IGNORE_INDEX = -100
IGNORED_ONE_IN = 7  # ignore_index on 1/7 of the rows (PERF.md)
_MODES = ("fwd", "fwd+bwd")


# --- inputs -------------------------------------------------------------------------------------
def _rand(shape, dtype, device, scale=1.0, requires_grad=True):
    t = torch.randn(shape, dtype=torch.float32, device=device).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _targets(M, V, device):
    """Random classes in [0, V), ignore_index on M // 7 random rows."""
    target = torch.randint(0, V, (M,), device=device)
    target[torch.randperm(M, device=device)[: M // IGNORED_ONE_IN]] = IGNORE_INDEX
    return target


def _loss_grad(dtype, device):
    # d(loss)/d(loss) = 1: what loss.backward() passes in
    return (torch.ones((), dtype=dtype, device=device),)


# --- cross-entropy ------------------------------------------------------------------------------
# One pass over the logits = M*V*elt bytes; targets, per-row statistics and the loss are ignored.
def _ce_bytes(shape, elt, mode):
    M, V = shape
    # fwd: read the logits once = M*V*elt (a training forward of the fused kernels also writes
    # the gradient then; PERF.md counts the one pass); fwd+bwd: read logits, write dlogits =
    # 2*M*V*elt. (bwd is not measured, see the module docstring.)
    return {"fwd": 1, "fwd+bwd": 2}[mode] * M * V * elt


def _ce_case(shape, dtype, device):
    M, V = shape
    args = {"logits": _rand((M, V), dtype, device), "target": _targets(M, V, device)}
    return Case(args, ("logits",), _loss_grad(dtype, device))


def _ce_eager(a):
    # F.cross_entropy straight on the (bf16) logits, as PERF.md's torch eager row
    return (F.cross_entropy(a["logits"], a["target"], ignore_index=IGNORE_INDEX),)


def _ce_llmfast(a):
    return (LF.cross_entropy(a["logits"], a["target"], ignore_index=IGNORE_INDEX),)


def _ce_llmfast_inplace(a):
    return (LF.cross_entropy(a["logits"], a["target"], ignore_index=IGNORE_INDEX, inplace_backward=True),)


def _ce_reference(a):
    return (R.cross_entropy(a["logits"], a["target"], ignore_index=IGNORE_INDEX),)


def _liger_ce(device):
    fn = peers.liger_function("LigerCrossEntropyFunction", "cross_entropy", device)

    def forward(a):
        # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction,
        #  softcap, return_z_loss, return_token_accuracy, return_predicted_tokens), as
        # liger_kernel.transformers.functional.liger_cross_entropy calls it; returns
        # (loss, z_loss, token_accuracy, predicted_tokens)
        loss = fn.apply(a["logits"], a["target"], None, IGNORE_INDEX, 0.0, 0.0, "mean", None, False, False,
                        False)[0]
        return (loss,)
    return forward


_CE_SHAPES_CUDA = [(8192, 32000), (8192, 50304), (8192, 128256), (4096, 256000)]
_CE_SHAPES_CPU = [(1024, 4096), (256, 32000)]

register(OpSpec(
    name="cross_entropy",
    order=40,
    shapes={"cuda": _CE_SHAPES_CUDA, "cpu": _CE_SHAPES_CPU},
    quick_shapes={"cuda": [(8192, 32000), (8192, 128256)], "cpu": [(512, 8192)]},
    make_case=_ce_case,
    eager=_ce_eager,
    llmfast_fn=_ce_llmfast,
    reference=_ce_reference,
    bytes=_ce_bytes,
    formula=("fwd M*V*elt (read the logits once); fwd+bwd 2*M*V*elt (read logits, write dlogits); "
             "ignore_index=-100 on 1/7 of the rows, mean reduction, incoming gradient 1"),
    peers={"liger": _liger_ce},
    peer_notes={
        "llmfast-*-inplace": ("llmfast cross_entropy(inplace_backward=True): the gradient is written over the "
                              "logits (no (M, V) allocation); run on a private copy of the logits, so timed calls "
                              "after the first read the previous call's gradient (finite values, the same work)"),
        "torch": "F.cross_entropy on the logits in their dtype (no upcast)",
        "liger": ("LigerCrossEntropyFunction, mean reduction; writes the gradient over the logits in its "
                  "forward (run on a private copy, as llmfast's inplace variant)"),
    },
    modes=_MODES,
    shape_names=("M", "V"),
    report_memory=True,
    variants={"inplace": _ce_llmfast_inplace},
    clobbers=("inplace", "liger"),
))


# --- fused linear + cross-entropy ---------------------------------------------------------------
# The three matmuls dominate: logits = x @ W.T (2*M*D*V flops), dx = dlogits @ W and
# dW = dlogits.T @ x (2*M*D*V each); the softmax and loss are ignored.
def _lce_flops(shape, mode):
    M, D, V = shape
    # fwd: the logits matmul, 2*M*D*V (the fused providers also run the two gradient matmuls in
    # a training forward, so their fwd time holds the whole step); fwd+bwd: 6*M*D*V (PERF.md)
    return {"fwd": 2, "fwd+bwd": 6}[mode] * M * D * V


def _lce_case(shape, dtype, device):
    M, D, V = shape
    args = {
        "hidden": _rand((M, D), dtype, device),
        # scaled so the logits are about N(0, 1), as a trained LM head gives
        "weight": _rand((V, D), dtype, device, scale=D ** -0.5),
        "target": _targets(M, V, device),
    }
    return Case(args, ("hidden", "weight"), _loss_grad(dtype, device))


def _lce_eager(a):
    # the usual model code: logits in the input dtype, upcast to fp32 for the loss
    logits = F.linear(a["hidden"], a["weight"]).float()
    return (F.cross_entropy(logits, a["target"], ignore_index=IGNORE_INDEX),)


def _lce_llmfast(a):
    return (LF.linear_cross_entropy(a["hidden"], a["weight"], a["target"], ignore_index=IGNORE_INDEX),)


def _lce_reference(a):
    return (R.linear_cross_entropy(a["hidden"], a["weight"], a["target"], ignore_index=IGNORE_INDEX),)


def _liger_lce(device):
    fn = peers.liger_function("LigerFusedLinearCrossEntropyFunction", "fused_linear_cross_entropy", device)

    def forward(a):
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        #  reduction, softcap, return_z_loss, accum_dtype, use_token_scaling,
        #  return_token_accuracy, return_predicted_tokens), as
        # liger_kernel.transformers.functional.liger_fused_linear_cross_entropy calls it
        loss = fn.apply(a["hidden"], a["weight"], a["target"], None, None, IGNORE_INDEX, 0.0, 0.0, "mean", None,
                        False, None, False, False, False)[0]
        return (loss,)
    return forward


def _torch_chunked_lce(device):
    """torch >= 2.14's own fused linear + cross-entropy (its chunked path, options given)."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.14)")
    opts = options()

    def forward(a):
        return (F.linear_cross_entropy(a["hidden"], a["weight"], a["target"], ignore_index=IGNORE_INDEX,
                                       options=opts),)
    return forward


register(OpSpec(
    name="linear_cross_entropy",
    order=50,
    shapes={"cuda": [(8192, 4096, 128256), (16384, 2048, 50304)], "cpu": [(256, 256, 4096), (512, 512, 8192)]},
    quick_shapes={"cuda": [(16384, 2048, 50304)], "cpu": [(256, 256, 4096)]},
    make_case=_lce_case,
    eager=_lce_eager,
    llmfast_fn=_lce_llmfast,
    reference=_lce_reference,
    flops=_lce_flops,
    metric="TFLOP/s",
    formula=("fwd+bwd 6*M*D*V (logits x @ W.T, then dx and dW); fwd 2*M*D*V (the logits matmul); hidden (M, D), "
             "weight (V, D), no bias, ignore_index=-100 on 1/7 of the rows, mean reduction, incoming gradient 1"),
    peers={"liger": _liger_lce, "torch-chunked": _torch_chunked_lce},
    peer_notes={
        "torch": "F.linear in the input dtype, .float(), then F.cross_entropy",
        "liger": "LigerFusedLinearCrossEntropyFunction, mean reduction, accum_dtype=None (Liger's default)",
        "torch-chunked": "torch >= 2.14's F.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path)",
    },
    modes=_MODES,
    shape_names=("M", "D", "V"),
    report_memory=True,
))
