"""pytest-benchmark suite: what ``return_entropy=True`` adds to a reverse-KL forward+backward.

The student's entropy comes from the divergence's own sweep (no GEMM; the torch backend's whole rows take one row
dot more, the Triton and CUDA epilogues one more read of each student tile). Each entropy benchmark records, in
``extra_info``, its median over the plain loss's median on the same inputs. Run:

    pytest benchmarks/bench_entropy.py --benchmark-enable -m "slow or not slow"
"""

import pytest
from _bench_shapes import DEVICE, SHAPES

from opd_fast import linear_reverse_kl
from opd_fast.bench import cases

_plain_median: dict[str, float] = {}


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("entropy", [False, True], ids=["loss", "loss+entropy"])
def test_entropy_next_to_the_loss(benchmark, entropy, shape, backend):
    reason = cases.backend_skip_reason(backend, DEVICE)
    if reason:
        pytest.skip(reason)
    case = cases.Case(backend=backend, mode="fwd+bwd", **shape)
    inputs = list(cases.case_inputs(case, DEVICE).values())

    def step():
        out = linear_reverse_kl(*inputs, backend=backend, return_entropy=entropy)
        (out.loss if entropy else out).backward()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:
        key, median = f"{backend}-{shape}", benchmark.stats.stats.median
        if not entropy:
            _plain_median[key] = median
        elif key in _plain_median:
            benchmark.extra_info["ratio_to_loss_alone"] = median / _plain_median[key]
