"""Every op of llmfast.bench under pytest-benchmark: each provider (llmfast backends and their
variants, torch eager, torch.compile, Liger-Kernel, SDPA backends) x shape x mode. The cases,
providers and byte/flop counts are llmfast.bench's (one definition); providers that cannot run
here are skipped with the reason.

    python -m pytest benchmarks -q -k "rms_norm and fwd+bwd"
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from llmfast.bench.spec import Unavailable, all_provider_names, mode_fn, op_specs, providers_for  # noqa: E402

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# pedantic rounds per benchmark: a GPU call takes ~0.05-60 ms, a CPU one up to tens of ms
_ROUNDS, _WARMUP = (20, 3) if _DEVICE.type == "cuda" else (5, 1)


def _cases():
    for op, spec in op_specs().items():
        for shape in spec.shapes_for(_DEVICE, quick=True):
            for provider in all_provider_names(spec):
                for mode in spec.modes:
                    yield pytest.param(op, shape, provider, mode,
                                       id=f"{op}-{'x'.join(map(str, shape))}-{provider}-{mode}")


@pytest.mark.parametrize("op,shape,provider,mode", list(_cases()))
def test_op(benchmark, bench_device, bench_dtype, op, shape, provider, mode):
    if bench_device.type == "cpu" and provider.startswith("llmfast-triton"):
        pytest.skip("Triton runs in its interpreter on the CPU: correct, not a benchmark")
    if bench_device.type == "cuda" and provider == "llmfast-reference":
        pytest.skip("the reference backend is torch eager's twin on CUDA")
    spec = op_specs()[op]
    providers, skipped = providers_for(spec, bench_device, only=[provider])
    if not providers:
        pytest.skip(f"{provider}: {skipped.get(provider, 'not available here')}")
    torch.manual_seed(0)
    case = spec.make_case(shape, bench_dtype, bench_device)
    if providers[0].clobbers_inputs:
        case = case.clone()
    try:
        forward = providers[0].build(spec, case)
        step_fn = mode_fn(forward, case, mode)
        step_fn()  # compile / autotune outside the timed rounds
    except Unavailable as exc:  # e.g. an SDPA backend that cannot run this shape
        pytest.skip(f"{provider}: {exc}")
    except Exception as exc:
        if provider == "torch.compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}".splitlines()[0])
        raise

    def step():
        out = step_fn()
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)
        return out

    benchmark.group = f"{op} {'x'.join(map(str, shape))} {mode}"
    benchmark.pedantic(step, rounds=_ROUNDS, warmup_rounds=_WARMUP, iterations=1)
    benchmark.extra_info.update(op=op, shape=list(shape), mode=mode, provider=provider, dtype=str(bench_dtype))
    median = benchmark.stats.stats.median if benchmark.stats is not None else None  # None: --benchmark-disable
    if spec.metric == "GB/s":
        nbytes = spec.bytes(shape, torch.empty((), dtype=bench_dtype).element_size(), mode)
        benchmark.extra_info["bytes"] = nbytes
        if median:
            benchmark.extra_info["gbps"] = nbytes / median / 1e9
    else:
        flops = spec.flops(shape, mode)
        benchmark.extra_info["flops"] = flops
        if median:
            benchmark.extra_info["tflops"] = flops / median / 1e12
