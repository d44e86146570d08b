"""What a benchmarked op is made of, and the registry of ops.

An op is one `OpSpec` in a module of llmfast/bench/ops/ (found by file, so a new op is one new
file there): its shapes, its byte or flop count per mode, how to make random inputs, the torch
eager function (also compiled, as the torch.compile peer), the llmfast function, optional
variants of it (e.g. an option that trades safety for memory) and optional peers such as
Liger-Kernel. `providers_for` turns a spec into the providers of one run.
"""
import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

import llmfast

MODES = ("fwd", "bwd", "fwd+bwd")
METRICS = ("GB/s", "TFLOP/s")  # OpSpec.metric: memory-bound ops count bytes, compute-bound ones flops


class Unavailable(Exception):
    """Raised by a peer's factory when the peer cannot run here (not installed, no CUDA)."""


@dataclasses.dataclass
class Case:
    """Inputs of one shape. `args` are passed to every provider's forward; gradients are taken
    with respect to `args[name]` for name in `grad_names`, with `grad_outputs` (one tensor per
    forward output) as the incoming gradients. Values of `args` that are not tensors are
    options passed as they are (e.g. is_causal); torch.compile specializes on them."""
    args: Dict[str, Any]
    grad_names: Tuple[str, ...]
    grad_outputs: Tuple[torch.Tensor, ...]

    @property
    def device(self):
        return next(v for v in self.args.values() if isinstance(v, torch.Tensor)).device

    @property
    def grad_inputs(self):
        return tuple(self.args[n] for n in self.grad_names)

    def clone(self):
        """A private copy of the inputs (new leaf tensors, same values and requires_grad), for a
        provider that writes over its inputs; grad_outputs are shared (never written)."""
        args = {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                for k, v in self.args.items()}
        return Case(args, self.grad_names, self.grad_outputs)


@dataclasses.dataclass
class OpSpec:
    name: str
    # shapes by device type ("cuda", "cpu") and by --quick
    shapes: Dict[str, Sequence[Tuple[int, ...]]]
    quick_shapes: Dict[str, Sequence[Tuple[int, ...]]]
    make_case: Callable[[Tuple[int, ...], torch.dtype, torch.device], Case]
    # forward functions: args dict -> tuple of output tensors
    eager: Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, ...]]
    llmfast_fn: Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, ...]]
    reference: Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, ...]]
    # bytes moved (memory-bound ops) or flops (compute-bound ops) per mode; None if not counted
    bytes: Optional[Callable[[Tuple[int, ...], int, str], int]] = None
    flops: Optional[Callable[[Tuple[int, ...], str], float]] = None
    formula: str = ""
    # peer name -> factory(device) returning a forward like `eager`, or raising Unavailable (a
    # forward may raise Unavailable too, for a shape the peer cannot run: recorded as skipped)
    peers: Dict[str, Callable[[torch.device], Callable]] = dataclasses.field(default_factory=dict)
    # notes for the report, by provider name (a peer's, 'torch', or a variant's 'llmfast-*-<name>')
    peer_notes: Dict[str, str] = dataclasses.field(default_factory=dict)
    modes: Tuple[str, ...] = MODES
    shape_names: Tuple[str, ...] = ("M", "N")  # what the shape's dims are, for table headers
    order: int = 100  # position in tables and in the default op list
    # the rate of the tables and charts: 'GB/s' (from `bytes`, % of the copy ceiling) or
    # 'TFLOP/s' (from `flops`, % of the bf16 matmul ceiling)
    metric: str = "GB/s"
    # show each cell's peak extra memory (CUDA) in the tables, where it is part of the story
    report_memory: bool = False
    # llmfast backends that have kernels for this op (None: every backend); the others are
    # reported as skipped instead of failing
    backends: Optional[Tuple[str, ...]] = None
    # variant name -> forward like `llmfast_fn`, run under each kernel backend (not 'reference')
    # as provider 'llmfast-<backend>-<variant>', e.g. an in-place option
    variants: Dict[str, Callable[[Dict[str, Any]], Tuple[torch.Tensor, ...]]] = dataclasses.field(default_factory=dict)
    # names of peers and variants that write over their inputs: each gets a private copy of
    # every shape's inputs (Case.clone), so the providers after it see intact data
    clobbers: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"llmfast.bench: op {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")

    def shapes_for(self, device, quick):
        table = self.quick_shapes if quick else self.shapes
        return list(table.get(device.type, table.get("cpu")))


@dataclasses.dataclass
class Provider:
    name: str
    family: str  # "llmfast", "torch", "torch.compile" or "peer"
    # build(spec, case) -> forward(args) -> tuple of outputs; called once per shape
    build: Callable[[OpSpec, Case], Callable]
    note: str = ""
    clobbers_inputs: bool = False  # writes over its inputs: the runner gives it a private copy


_REGISTRY: Dict[str, OpSpec] = {}
_LOADED = False


def register(spec):
    if spec.name in _REGISTRY:
        raise ValueError(f"llmfast.bench: op {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def op_specs():
    """name -> OpSpec for every module in llmfast/bench/ops/, in table order."""
    global _LOADED
    if not _LOADED:
        from . import ops as ops_pkg

        for info in pkgutil.iter_modules(ops_pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{ops_pkg.__name__}.{info.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


# --- providers ----------------------------------------------------------------------------------
def llmfast_backends(device, include_slow=False):
    """llmfast backends that run tensors of `device`: cuda/triton on CUDA ('reference' is the
    eager baseline's twin there and is left out); cpu and reference on the CPU (triton under
    TRITON_INTERPRET is an interpreter, left out unless `include_slow`)."""
    names = []
    for name in llmfast.available_backends():
        if device.type == "cuda" and name in ("cuda", "triton"):
            names.append(name)
        elif device.type == "cpu" and (name in ("cpu", "reference") or (name == "triton" and include_slow)):
            names.append(name)
    return names


def _llmfast_provider(backend, variant=None, note="", clobbers=False):
    def build(spec, case):
        fn = spec.variants[variant] if variant else spec.llmfast_fn

        def forward(args):
            with llmfast.use_backend(backend):
                return fn(args)
        return forward
    name = f"llmfast-{backend}" + (f"-{variant}" if variant else "")
    return Provider(name, "llmfast", build, note, clobbers)


def _eager_build(spec, case):
    return spec.eager


def _compile_build(spec, case):
    # A fresh compile per shape (dynamic=False): reset dynamo so earlier shapes' cache entries
    # neither count against the recompile limit nor get picked up.
    torch._dynamo.reset()
    return torch.compile(spec.eager, dynamic=False)


def _peer_provider(name, factory, note, clobbers=False):
    def build(spec, case):
        return factory(case.device)
    return Provider(name, "peer", build, note, clobbers)


def providers_for(spec, device, only=None):
    """(providers, skipped) for `spec` on `device`; skipped maps provider name -> reason.
    `only`, if given, keeps the named providers (and may name 'llmfast-triton' or one of its
    variants on the CPU)."""
    include_slow = bool(only) and any(n == "llmfast-triton" or n.startswith("llmfast-triton-") for n in only)
    providers, skipped = [], {}
    for b in llmfast_backends(device, include_slow):
        if spec.backends is not None and b not in spec.backends:
            skipped[f"llmfast-{b}"] = (f"llmfast has no {b} kernels for {spec.name} "
                                       f"(only {', '.join(spec.backends)})")
            continue
        providers.append(_llmfast_provider(b))
    for variant in spec.variants:
        for b in llmfast_backends(device, include_slow):
            if b != "reference" and (spec.backends is None or b in spec.backends):
                name = f"llmfast-{b}-{variant}"
                note = spec.peer_notes.get(name, spec.peer_notes.get(f"llmfast-*-{variant}", ""))
                providers.append(_llmfast_provider(b, variant, note, variant in spec.clobbers))
    providers.append(Provider("torch", "torch", _eager_build))
    providers.append(Provider("torch.compile", "torch.compile", _compile_build))
    for name, factory in spec.peers.items():
        try:
            factory(device)  # probe: raises Unavailable when the peer cannot run here
        except Unavailable as exc:
            skipped[name] = str(exc)
            continue
        except Exception as exc:  # a broken install must not stop the run
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        providers.append(_peer_provider(name, factory, spec.peer_notes.get(name, ""), name in spec.clobbers))
    if only:
        missing = [n for n in only if n not in {p.name for p in providers} and n not in skipped]
        for n in missing:
            skipped[n] = "not available on this machine/device"
        providers = [p for p in providers if p.name in only]
        skipped = {n: why for n, why in skipped.items() if n in only}
    return providers, skipped


def all_provider_names(spec):
    """Every provider name `spec` can have anywhere (for test parametrization)."""
    backends = [b for b in llmfast.BACKENDS if spec.backends is None or b in spec.backends]
    variants = [f"llmfast-{b}-{v}" for v in spec.variants for b in backends if b != "reference"]
    return [f"llmfast-{b}" for b in backends] + variants + ["torch", "torch.compile"] + list(spec.peers)


def mode_fn(forward, case, mode):
    """A no-argument callable doing one `mode` step with `forward`.
    fwd: forward on inputs that require grad (a training forward: activations are saved);
    bwd: gradients of a forward run once here, outside the timed region (retain_graph=True);
    fwd+bwd: both. Gradients come from torch.autograd.grad, so nothing accumulates in .grad."""
    args, grads_of, grad_outputs = case.args, case.grad_inputs, case.grad_outputs
    if mode == "fwd":
        return lambda: forward(args)
    if mode == "fwd+bwd":
        def step():
            return torch.autograd.grad(forward(args), grads_of, grad_outputs)
        return step
    if mode == "bwd":
        outputs = forward(args)

        def step():
            return torch.autograd.grad(outputs, grads_of, grad_outputs, retain_graph=True)
        return step
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
