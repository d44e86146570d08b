"""Scaled dot-product attention under pytest-benchmark: every provider of llmfast.bench
(llmfast's triton / reference backends, torch eager SDPA, torch.compile, SDPA restricted to the
flash and cuDNN backends) x shape x mode. Providers that cannot run here are skipped with the
reason; shapes are (B, H, S, D, causal)."""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from llmfast.bench.spec import Unavailable, all_provider_names, mode_fn, op_specs, providers_for  # noqa: E402

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OP = "attention"
# pedantic rounds per benchmark: a GPU call is ~0.3-25 ms, a CPU one a few ms
_ROUNDS, _WARMUP = (20, 3) if _DEVICE.type == "cuda" else (5, 1)


def _cases():
    spec = op_specs()[_OP]
    for shape in spec.shapes_for(_DEVICE, quick=True):
        for provider in all_provider_names(spec):
            for mode in spec.modes:
                yield pytest.param(shape, provider, mode, id=f"{'x'.join(map(str, shape))}-{provider}-{mode}")


@pytest.mark.parametrize("shape,provider,mode", list(_cases()))
def test_attention(benchmark, bench_device, bench_dtype, shape, provider, mode):
    if bench_device.type == "cpu" and provider == "llmfast-triton":
        pytest.skip("Triton runs in its interpreter on the CPU: correct, not a benchmark")
    if bench_device.type == "cuda" and provider == "llmfast-reference":
        pytest.skip("the reference backend materializes the scores: not a benchmark on CUDA")
    spec = op_specs()[_OP]
    providers, skipped = providers_for(spec, bench_device, only=[provider])
    if not providers:
        pytest.skip(f"{provider}: {skipped.get(provider, 'not available here')}")
    torch.manual_seed(0)
    case = spec.make_case(shape, bench_dtype, bench_device)
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

    benchmark.group = f"{_OP} {'x'.join(map(str, shape))} {mode}"
    benchmark.pedantic(step, rounds=_ROUNDS, warmup_rounds=_WARMUP, iterations=1)
    flops = spec.flops(shape, mode)
    benchmark.extra_info.update(op=_OP, shape=list(shape), mode=mode, provider=provider, dtype=str(bench_dtype),
                                flops=flops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
