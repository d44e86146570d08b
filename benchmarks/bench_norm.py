"""LayerNorm, RMSNorm and add + LayerNorm under pytest-benchmark: every provider of
llmfast.bench (llmfast backends, torch eager, torch.compile, Liger-Kernel) x shape x mode.
Providers that cannot run here are skipped with the reason."""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from llmfast.bench.spec import mode_fn, op_specs, providers_for  # noqa: E402

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OPS = ("layer_norm", "rms_norm", "add_layer_norm")
_PROVIDERS = ("llmfast-cuda", "llmfast-triton", "llmfast-cpu", "llmfast-reference", "torch", "torch.compile", "liger")
_MODES = ("fwd", "bwd", "fwd+bwd")
# pedantic rounds per benchmark: a GPU call is ~0.1-5 ms, a CPU one up to tens of ms
_ROUNDS, _WARMUP = (50, 5) if _DEVICE.type == "cuda" else (5, 1)


def _cases():
    specs = op_specs()
    for op in _OPS:
        for shape in specs[op].shapes_for(_DEVICE, quick=True):
            yield pytest.param(op, shape, id=f"{op}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("op,shape", list(_cases()))
def test_norm(benchmark, bench_device, bench_dtype, op, shape, provider, mode):
    if bench_device.type == "cpu" and provider == "llmfast-triton":
        pytest.skip("Triton runs in its interpreter on the CPU: correct, not a benchmark")
    if bench_device.type == "cuda" and provider == "llmfast-reference":
        pytest.skip("the reference backend is torch eager's twin on CUDA")
    spec = op_specs()[op]
    providers, skipped = providers_for(spec, bench_device, only=[provider])
    if not providers:
        pytest.skip(f"{provider}: {skipped.get(provider, 'not available here')}")
    torch.manual_seed(0)
    case = spec.make_case(shape, bench_dtype, bench_device)
    try:
        forward = providers[0].build(spec, case)
        step_fn = mode_fn(forward, case, mode)
        step_fn()  # compile / autotune outside the timed rounds
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
    nbytes = spec.bytes(shape, torch.empty((), dtype=bench_dtype).element_size(), mode)
    benchmark.extra_info.update(op=op, shape=list(shape), mode=mode, provider=provider,
                                dtype=str(bench_dtype), bytes=nbytes)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
