"""The model's vocabulary: device ceilings, workloads, per-kernel costs and the roofline that prices them.

Every constant here is named with where its value comes from; "assumed" means no measurement backs it yet and
the first GPU window (``benchmarks/gpu_verify``, which prints predicted beside measured) is what will test it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Those whose loss needs a second pass over each tile once both rows' log-sum-exps are final
# (backends.epilogue.TERMS_MODES).
TERMS_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
KINDS = ("gemm", "epilogue", "elementwise", "memset")
MODES = ("fwd", "bwd", "fwd+bwd")
ACC_BYTES = 4  # fp32: logits workspaces, accumulators, statistics

# Share of a GEMM's C traffic (its output written, plus the accumulator read when β = 1) that is paid after its
# main loop rather than hidden under it. 1.0 (serialized) is the issue's own audit assumption and the pessimistic
# end: the logits GEMMs here write fp32 at 4 B per 2·K FLOPs, 4× the output per FLOP of the 8192³ bf16 product
# that measures the matmul rate. 0.0 would be the optimistic bound; the window's addmm β=0 / β=1 micro-benchmark
# measures where cuBLAS sits between the two.
GEMM_EPILOGUE_EXPOSED = 1.0


@dataclass(frozen=True)
class DeviceCeilings:
    """What one GPU achieves: the dense matmul rate (bf16/fp16 operands, fp32 accumulation) and the copy bandwidth
    (bytes read + bytes written per second by ``torch.Tensor.copy_``), both as measured, not as specified."""

    name: str
    matmul_tflops: float
    copy_gbps: float
    fp32_matmul_tflops: float | None = None

    def matmul_rate(self, precision: str) -> float:
        """FLOP/s of a GEMM whose operands are ``precision``."""
        if precision != "fp32":
            return self.matmul_tflops * 1e12
        if self.fp32_matmul_tflops is None:
            raise ValueError(f"no fp32 matmul rate for {self.name}: give DeviceCeilings(fp32_matmul_tflops=...)")
        return self.fp32_matmul_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        return self.copy_gbps * 1e9


# Ceilings by name. H200: 790 bf16 TFLOP/s and 4.3 TB/s copy are the audit figures (about 80% of the
# 989 TFLOP/s dense spec and 90% of the 4.8 TB/s HBM3e spec). H100 SXM: the same tensor cores, 750 TFLOP/s
# assumed for its lower sustained clocks, 3.0 TB/s copy from the issue (90% of 3.35 TB/s). fp32 (TF32 off, as
# torch's default): 50 TFLOP/s assumed for both, 75% of the 67 TFLOP/s FP32 spec.
DEVICES: dict[str, DeviceCeilings] = {
    "h100": DeviceCeilings("H100", 750.0, 3000.0, 50.0),
    "h200": DeviceCeilings("H200", 790.0, 4300.0, 50.0),
}


@dataclass(frozen=True)
class Workload:
    """One reverse-KL (or forward KL, JSD) loss step: N tokens, student/teacher hidden sizes, vocabulary, dtype."""

    tokens: int
    hidden: int
    teacher_hidden: int
    vocab: int
    dtype: str = "bf16"
    divergence: str = "reverse_kl"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if min(self.tokens, self.hidden, self.teacher_hidden, self.vocab) < 1:
            raise ValueError(f"tokens, hidden sizes and vocab must be positive, got {self}")

    @property
    def elem(self) -> int:
        """Bytes per element of the inputs (hidden states and weights)."""
        return DTYPE_BYTES[self.dtype]

    def floor_flops(self, mode: str = "fwd+bwd") -> float:
        """The matmul work of any exact method: 2·N·V·(Hs + Ht) forward, 4·N·V·Hs backward."""
        n, v = self.tokens, self.vocab
        forward = 2.0 * n * v * (self.hidden + self.teacher_hidden)
        backward = 4.0 * n * v * self.hidden
        return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def floor_ms(workload: Workload, device: DeviceCeilings, mode: str = "fwd+bwd") -> float:
    """The floor: 2·N·V·(Hs + Ht) + 4·N·V·Hs FLOPs at the device's matmul rate for the workload's dtype, in ms."""
    return workload.floor_flops(mode) / device.matmul_rate(workload.dtype) * 1e3


@dataclass(frozen=True)
class KernelCost:
    """``count`` launches of one kernel of a plan, with totals over the launches.

    ``flops`` counts GEMM FLOPs only (2·M·N·K); elementwise and epilogue arithmetic is priced through its bytes.
    ``epilogue_bytes`` (GEMMs) is the part of the traffic that is C: the output written, plus the accumulator read
    when β = 1. ``efficiency`` is the fraction of the ceiling the kernel reaches (a GEMM: of the matmul rate; any
    other kind: of the copy bandwidth). ``phase``: "fwd" or "bwd", where a training step runs it.
    """

    name: str
    count: int
    flops: float
    bytes_read: float
    bytes_written: float
    kind: str
    epilogue_bytes: float = 0.0
    precision: str = "bf16"
    efficiency: float = 1.0
    phase: str = "fwd"

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    def seconds(self, device: DeviceCeilings, epilogue_efficiency: float = 1.0) -> float:
        """The roofline: a GEMM takes its FLOPs at the matmul rate plus its exposed C traffic at the copy bandwidth
        (never less than all its bytes at that bandwidth); every other kind its bytes at the copy bandwidth times its
        efficiency. ``epilogue_efficiency`` scales the efficiency of "epilogue" kernels (1.0: the model's own)."""
        bandwidth = device.bandwidth
        if self.kind == "gemm":
            main_loop = self.flops / (device.matmul_rate(self.precision) * self.efficiency)
            return max(main_loop + GEMM_EPILOGUE_EXPOSED * self.epilogue_bytes / bandwidth, self.bytes / bandwidth)
        efficiency = self.efficiency * (epilogue_efficiency if self.kind == "epilogue" else 1.0)
        return self.bytes / (bandwidth * efficiency)


@dataclass(frozen=True)
class Prediction:
    """A method's predicted step: its kernels, totals, time and the floor it is judged against."""

    method: str
    backend: str | None
    workload: Workload
    device: DeviceCeilings
    kernels: tuple[KernelCost, ...]
    flops: float
    bytes: float
    ms: float
    floor_ms: float
    peak_extra_bytes: float
    mode: str = "fwd+bwd"

    @property
    def ratio_to_floor(self) -> float:
        return self.ms / self.floor_ms

    def as_dict(self) -> dict:
        kernels = [{**asdict(k), "ms": k.seconds(self.device) * 1e3} for k in self.kernels]
        return {
            "method": self.method,
            "backend": self.backend,
            "mode": self.mode,
            "workload": asdict(self.workload),
            "device": asdict(self.device),
            "flops": self.flops,
            "bytes": self.bytes,
            "ms": self.ms,
            "floor_ms": self.floor_ms,
            "ratio_to_floor": self.ratio_to_floor,
            "peak_extra_bytes": self.peak_extra_bytes,
            "kernels": kernels,
        }


def make_prediction(method, backend, workload, device, kernels, peak_extra_bytes, mode="fwd+bwd") -> Prediction:
    """The prediction of the kernels that run in ``mode`` ("fwd", "bwd" or both phases)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    ran = tuple(k for k in kernels if mode == "fwd+bwd" or k.phase == mode)
    return Prediction(
        method=method,
        backend=backend,
        workload=workload,
        device=device,
        kernels=ran,
        flops=sum(k.flops for k in ran),
        bytes=sum(k.bytes for k in ran),
        ms=sum(k.seconds(device) for k in ran) * 1e3,
        floor_ms=floor_ms(workload, device, mode),
        peak_extra_bytes=peak_extra_bytes,
        mode=mode,
    )


class Ledger:
    """Kernel costs added launch by launch and merged by name (the same kernel over every chunk is one line)."""

    def __init__(self) -> None:
        self._costs: dict[str, KernelCost] = {}

    def add(self, name: str, kind: str, *, flops=0.0, read=0.0, written=0.0, epilogue=0.0, **fields) -> None:
        new = KernelCost(name, 1, flops, read, written, kind, epilogue, **fields)
        old = self._costs.get(name)
        if old is not None:
            new = KernelCost(
                name,
                old.count + 1,
                old.flops + flops,
                old.bytes_read + read,
                old.bytes_written + written,
                kind,
                old.epilogue_bytes + epilogue,
                **fields,
            )
        self._costs[name] = new

    def kernels(self) -> tuple[KernelCost, ...]:
        return tuple(self._costs.values())
