"""pytest-benchmark suite: the cost of the top-k overlap statistics next to the reverse-KL forward.

Both run without gradients on the same inputs; each top-k benchmark records, in ``extra_info``, its
median over the reverse-KL forward's median (the GPU target is < 1.3). Run:

    pytest benchmarks/bench_topk.py --benchmark-enable -m "slow or not slow"
"""

import pytest
from _bench_shapes import DEVICE, SHAPES

from opd_fast import linear_reverse_kl, linear_topk_overlap
from opd_fast.bench import cases

_reverse_kl_median: dict[str, float] = {}


def _backends():
    return [b for b in ("torch", "triton") if not cases.backend_skip_reason(b, DEVICE)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ["reverse_kl_forward", "topk_overlap_k16"])
def test_topk_overlap_vs_reverse_kl_forward(benchmark, op, shape, backend):
    if backend not in _backends():
        pytest.skip(cases.backend_skip_reason(backend, DEVICE))
    case = cases.Case(backend=backend, mode="fwd", **shape)
    inputs = list(cases.case_inputs(case, DEVICE).values())
    for t in inputs:
        t.requires_grad_(False)
    if op == "reverse_kl_forward":
        fn = lambda: linear_reverse_kl(*inputs, backend=backend)  # noqa: E731
    else:
        fn = lambda: linear_topk_overlap(*inputs, k=16, backend=backend)  # noqa: E731
    key = f"{backend}-{shape}"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        if op == "reverse_kl_forward":
            _reverse_kl_median[key] = median
        elif key in _reverse_kl_median:
            benchmark.extra_info["ratio_to_reverse_kl_forward"] = median / _reverse_kl_median[key]
