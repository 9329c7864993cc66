"""The performance model: for a plan, backend, workload, dtype and device ceilings, every kernel's GEMM FLOPs and the
bytes it reads and writes, the peak extra memory, and the predicted time (docs/design.md §5, "Predicted
performance").

Time is a roofline per kernel, summed (kernels run one after another; the side-stream overlap is predicted as
serial): a GEMM takes its FLOPs at the device's matmul rate plus its C traffic (output written, accumulator read at
β = 1) at the copy bandwidth; an epilogue or elementwise pass takes its bytes at the copy bandwidth times an
efficiency (``_ours.EPILOGUE_EFFICIENCY`` for our epilogues, 1.0 for torch's own kernels). Every constant is named
in the module that uses it, with where its value comes from. ``python -m opd_fast.perf_model`` prints the predicted
table; ``opd-fast bench`` prints predicted beside measured on a GPU (``--predict`` on the CPU). Device ceilings are
named (:data:`DEVICES`) or measured (:func:`measure_ceilings`, timed by :func:`elapsed_ms`, which the benchmark times
its cases with too): the benchmark uses the model, and the model never imports the benchmark.
"""

from opd_fast.perf_model._api import (
    METHODS,
    predict,
    predict_bench_row,
    predicted_table,
    preferred_gpu_backend,
)
from opd_fast.perf_model._core import (
    DEVICES,
    DeviceCeilings,
    KernelCost,
    Prediction,
    Workload,
    floor_ms,
)
from opd_fast.perf_model._measured import elapsed_ms, measure_ceilings, measure_copy_gbps, measure_matmul_tflops
from opd_fast.perf_model._peers import NAIVE_LOGITS_COPIES

__all__ = [
    "DEVICES",
    "METHODS",
    "NAIVE_LOGITS_COPIES",
    "DeviceCeilings",
    "KernelCost",
    "Prediction",
    "Workload",
    "elapsed_ms",
    "floor_ms",
    "measure_ceilings",
    "measure_copy_gbps",
    "measure_matmul_tflops",
    "predict",
    "predict_bench_row",
    "predicted_table",
    "preferred_gpu_backend",
]
