"""Launch-configuration tuning for llmfast's Triton kernels.

A kernel's best tile shape depends on the GPU, the Triton version and the problem, and it is
cheap to measure next to what a large problem costs. A `Tuner` holds, for one kernel, the
fastest configuration measured so far for each problem class (a key the launcher builds from
the head dims, dtype, flags and power-of-two buckets of the lengths). On the first large call
of a class it times each candidate on the call's own arguments, on the current stream, and
keeps the fastest; later calls of the class reuse it. Small calls, and calls where timing is
not possible, take the first candidate (the launcher's heuristic choice) without measuring.

Timing reruns the launch, so a tuned launch must be idempotent: it only writes its outputs and
never reads them (true of the attention kernels, which store every output element they own).

A configuration that does not fit the GPU (Triton's OutOfResources: more shared memory than
the device has) is never fatal: Tuner.launch_fitting falls back to the next candidate that fits
and remembers it, so tables sized for the H100 also run on GPUs with less shared memory.

Switches:
- env LLMFAST_TRITON_AUTOTUNE=0 turns measuring off (every call takes the first candidate);
- `Tuner.forced(config)` (tests) makes every launch of that kernel use one configuration;
- `Tuner.chosen()` lists what was picked, for the benchmark report.

Nothing is measured while a CUDA graph is being captured or in Triton's CPU interpreter.
"""
import contextlib
import os
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import torch

try:  # The exceptions Triton raises for a configuration that does not fit the GPU.
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover - every supported Triton has it
    _OutOfResources = RuntimeError
try:
    from triton.runtime.errors import PTXASError as _PTXASError
except ImportError:  # pragma: no cover - older Triton
    _PTXASError = _OutOfResources
try:
    from triton.compiler.errors import CompilationError as _CompilationError
except ImportError:  # pragma: no cover
    _CompilationError = _OutOfResources

UNFIT_ERRORS = (_OutOfResources, _PTXASError, _CompilationError)

# How long the timed repetitions of one candidate should take (ms), and their bounds.
_TARGET_MS = 10.0
_MAX_REPS = 50


def autotune_enabled() -> bool:
    return os.environ.get("LLMFAST_TRITON_AUTOTUNE", "1") != "0"


def _time_cuda_ms(launch: Callable[[], None]) -> float:
    """Mean milliseconds of one launch on the current stream: one untimed call (compiles),
    one timed call to size the repetitions, then enough repetitions for ~_TARGET_MS."""
    launch()
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    launch()
    end.record(stream)
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = int(min(_MAX_REPS, max(1, _TARGET_MS // once)))
    start.record(stream)
    for _ in range(reps):
        launch()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


class Tuner:
    """The configurations chosen for one kernel, per problem class."""

    def __init__(self, name: str, timer: Callable[[Callable[[], None]], float] = _time_cuda_ms):
        self.name = name
        self.timer = timer
        self._cache: Dict[Hashable, object] = {}
        self._timings: Dict[Hashable, Dict[object, float]] = {}
        self._forced: List[object] = []

    def choose(self, key: Hashable, candidates: Sequence, launch: Callable[[object], None], *,
               device: torch.device, large: bool):
        """The configuration to launch with. candidates[0] is the heuristic default; the others
        are measured against it (launch(config) runs the kernel once) when the call is large
        and measuring is possible. Configurations that do not fit the GPU are skipped."""
        if self._forced:
            return self._forced[-1]
        if key in self._cache:
            return self._cache[key]
        if len(candidates) == 1 or not large or not self._can_measure(device):
            return candidates[0]
        timings = {}
        for config in candidates:
            try:
                timings[config] = self.timer(lambda: launch(config))
            except UNFIT_ERRORS:
                continue
        if not timings:  # nothing fitted: let the default raise its own error at launch
            return candidates[0]
        best = min(timings, key=timings.get)
        self._cache[key] = best
        self._timings[key] = timings
        return best

    def launch_fitting(self, key: Hashable, config, candidates: Sequence, launch: Callable[[object], None]):
        """Launches `config`; if it does not fit this GPU (shared memory over the limit: the
        defaults are sized for the H100's 227 KB, an RTX 4090 or L4 has 99 KB), launches the
        first candidate that does instead and remembers it for the class. Returns the
        configuration that ran. (Triton checks the fit before launching: nothing was written.)"""
        try:
            launch(config)
            return config
        except UNFIT_ERRORS:
            if self._forced:
                raise
            last = None
            for other in candidates:
                if other == config:
                    continue
                try:
                    launch(other)
                except UNFIT_ERRORS as exc:
                    last = exc
                    continue
                self._cache[key] = other
                return other
            if last is None:
                raise
            raise last

    def run(self, key: Hashable, candidates: Sequence, launch: Callable[[object], None], *,
            device: torch.device, large: bool, measure: Optional[Callable[[object], None]] = None):
        """choose() (timing `measure`, default `launch`), then launch_fitting(): the one call a
        launcher makes per kernel. Returns the configuration that ran."""
        config = self.choose(key, candidates, measure or launch, device=device, large=large)
        return self.launch_fitting(key, config, candidates, launch)

    def _can_measure(self, device: torch.device) -> bool:
        if not autotune_enabled() or device.type != "cuda":
            return False
        return not torch.cuda.is_current_stream_capturing()

    @contextlib.contextmanager
    def forced(self, config):
        """Every launch of this kernel inside the block uses `config` (tests use it to run the
        GPU tile shapes in Triton's interpreter)."""
        self._forced.append(config)
        try:
            yield
        finally:
            self._forced.pop()

    def chosen(self) -> Dict[Hashable, object]:
        """{problem class: configuration} picked so far."""
        return dict(self._cache)

    def timings(self, key: Hashable) -> Optional[Dict[object, float]]:
        """{configuration: ms} measured for one problem class, or None."""
        return self._timings.get(key)
