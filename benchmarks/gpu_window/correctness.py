"""Stage 1: every backend × plan against a float64 reference on peaked inputs, the chunked cuda and triton paths
first: value and both gradients of each divergence, several row chunks (side-stream overlap on and off, the fp32
dW accumulator, the one-dW-GEMM mode, an unaligned vocabulary), gradient filtering, token log-probs, top-k. A check
passes within 2× the error of plain PyTorch in the same dtype."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from unittest import mock

from gpu_window.config import FILTER_EPS
from gpu_window.stages import Context, StageFile, error_line

# The chunked plan on cuda and triton first (the code the window exists for), torch's as the base the others are
# also compared with, then the streaming plans.
ORDER = (
    ("cuda", "chunked"),
    ("triton", "chunked"),
    ("torch", "chunked"),
    ("cuda", "streaming"),
    ("triton", "streaming"),
    ("torch", "streaming"),
)
VALUE_AND_GRADS = ("value", "d_hidden", "d_weight")  # what value_and_grads returns, in order
TOPK_STATISTICS = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "student_entropy",
    "teacher_entropy",
)


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when the expected norm is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def value_and_grads(fn: Callable, inputs: list) -> list:
    """[value, ∂Σvalue/∂inputs[0], ∂Σvalue/∂inputs[1]] of ``fn(*inputs)`` (the student's hidden states, weight)."""
    import torch

    value = fn(*inputs)
    return [value.detach(), *torch.autograd.grad(value.sum(), inputs[:2])]


class Checker:
    """Runs checks into the stage file. Within a group the torch backend's chunked result is the base every other
    result is also compared with; results that came before it wait for it."""

    def __init__(self, ctx: Context, record: StageFile):
        self.ctx, self.record = ctx, record
        self.base, self.pending = None, []

    def end_group(self) -> None:
        self.base, self.pending = None, []

    def compare(self, check_id, backend, plan, fn, args, expected, plain, grouped=True) -> list | None:
        """Value and gradients of ``fn(*args)`` against ``expected`` (float64); passes within 2× the error of
        ``plain`` (materialized PyTorch in the inputs' dtype). Returns them (None when it did not run)."""
        import time

        import opd_fast
        from opd_fast import backends

        row_id = f"{check_id}/{backend}-{plan}"
        if row_id in self.record.done:
            return None
        row = {"id": row_id, "check": check_id, "backend": backend, "plan": plan}
        reason = backends.unavailable_reason(backend, self.ctx.device)
        if reason is not None:
            self.record.add({**row, "error": f"skipped: {reason}"})
            return None
        self.record.begin(row_id)
        started = time.perf_counter()
        try:
            got = value_and_grads(fn, args)
        except Exception as exc:
            self.record.add({**row, "error": error_line(exc)})
            self.ctx.say(f"[1 correctness] {row_id}: {error_line(exc)[:160]}")
            return None
        errors = {n: rel_err(a, e) for n, a, e in zip(VALUE_AND_GRADS, got, expected)}
        plain_errors = {n: rel_err(p, e) for n, p, e in zip(VALUE_AND_GRADS, plain, expected)}
        row.update(errors=errors, plain_errors=plain_errors, seconds=round(time.perf_counter() - started, 2))
        row["passed"] = all(errors[n] <= 2 * plain_errors[n] + 1e-6 for n in VALUE_AND_GRADS)
        if "filter" in check_id and getattr(opd_fast, "last_filter_stats", None) is not None:
            row["filter_skipped_fraction"] = opd_fast.last_filter_stats()["skipped_fraction"]
        self.record.add(row)
        if grouped:
            self._against_torch(row, got, backend == "torch" and plan == "chunked")
        worst = max(VALUE_AND_GRADS, key=lambda n: errors[n] / (2 * plain_errors[n] + 1e-6))
        self.ctx.say(
            f"[1 correctness] {row_id}: {'ok' if row['passed'] else 'NOT PASSED'} "
            f"(worst {worst}: {errors[worst]:.2e} vs plain {plain_errors[worst]:.2e})"
        )
        return got

    def _against_torch(self, row: dict, got: list, is_base: bool) -> None:
        if self.base is not None:
            row["vs_torch"] = {n: rel_err(a, b) for n, a, b in zip(VALUE_AND_GRADS, got, self.base)}
        elif is_base:
            self.base = got
            for waiting, result in self.pending:
                waiting["vs_torch"] = {n: rel_err(a, b) for n, a, b in zip(VALUE_AND_GRADS, result, got)}
            self.pending = []
        else:
            self.pending.append((row, got))
        self.record.save()


def stage_correctness(ctx: Context, record: StageFile) -> None:
    import torch

    import opd_fast
    from opd_fast import reference
    from opd_fast.bench import cases
    from opd_fast.bench import inputs as bench_inputs

    shape = ctx.sizes.correctness
    dtype = cases.DTYPES[shape["dtype"]]
    inputs = list(
        bench_inputs.make_inputs(
            "peaked", shape["tokens"], shape["hidden"], shape["teacher_hidden"], shape["vocab"], dtype, ctx.device
        ).values()
    )
    record.data["shape"] = shape
    record.data["inputs"] = bench_inputs.input_statistics(*inputs)
    record.save()
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    token_ids = torch.randint(0, shape["vocab"], (shape["tokens"],), device=ctx.device)
    checker = Checker(ctx, record)

    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        math_options = dict(divergence=divergence, beta=cases.JSD_BETA)
        materialized = functools.partial(reference.materialized_divergence, **math_options)
        expected, plain = value_and_grads(materialized, exact), value_and_grads(materialized, inputs)
        for backend, plan in ORDER:
            options = dict(math_options, backend=backend, **cases.plan_option(plan))
            fn = functools.partial(opd_fast.linear_divergence, **options)
            checker.compare(divergence, backend, plan, fn, inputs, expected, plain)
            if divergence == "reverse_kl" and (backend, plan) == ("torch", "chunked"):  # before the streaming plans
                check_chunks(ctx, record, checker, inputs, exact, expected, plain)
                check_filtering(checker, inputs, expected, plain)
        checker.end_group()
        del expected, plain

    def token_logprobs(hidden, weight, **options):
        return opd_fast.linear_token_logprobs(hidden, weight, token_ids, **options)

    def materialized_token_logprobs(hidden, weight):
        return reference.materialized_token_logprobs(hidden, weight, token_ids)

    expected = value_and_grads(materialized_token_logprobs, exact[:2])
    plain = value_and_grads(materialized_token_logprobs, inputs[:2])
    for backend, plan in ORDER:
        fn = functools.partial(token_logprobs, backend=backend, **cases.plan_option(plan))
        checker.compare("token_logprobs", backend, plan, fn, inputs[:2], expected, plain)
    checker.end_group()
    del expected, plain, exact
    for k in ctx.sizes.topk_ks:
        check_topk(ctx, record, inputs, k)


def check_filtering(checker: Checker, inputs, expected, plain) -> None:
    """Reverse KL with gradient filtering on: the tiles it skips must not move the value or the gradients."""
    import opd_fast

    for backend in ("cuda", "triton"):
        fn = functools.partial(opd_fast.linear_divergence, backend=backend, filter_eps=FILTER_EPS)
        check_id = f"reverse_kl-filter{FILTER_EPS:.3g}"
        checker.compare(check_id, backend, "chunked", fn, inputs, expected, plain, grouped=False)


def check_chunks(ctx: Context, record: StageFile, checker: Checker, inputs, exact, expected, plain) -> None:
    """Reverse KL over several row chunks of the chunked plan (the headline's N=8192 is five; the correctness shape
    one at the default budget): the side stream's overlap of chunk i's epilogue with chunk i−1's gradient GEMMs,
    the two G buffers, the fp32 dW accumulator that the first chunk writes (β = 0) and the others add to. Each
    backend against float64; then the same call with the overlap off (``OPD_FAST_OVERLAP=0``: one stream, in
    order, so both agree to fp32 rounding, bit-identical unless a kernel uses atomics); then the one-dW-GEMM mode
    against float64; then a vocabulary off the 64-element row stride (``Sizes.unaligned_vocab``: the weights' first
    rows, views of ``inputs`` and of their float64 copies ``exact``)."""
    import torch

    import opd_fast
    from opd_fast import chunking, reference
    from opd_fast.backends.sweep import STREAM_OVERLAP_ENV

    n_tokens, vocab = inputs[0].shape[0], inputs[1].shape[0]
    chunks = -(-n_tokens // ctx.sizes.chunk_rows)
    check_id = f"reverse_kl-chunks{chunks}"
    with opd_fast.chunk_budget(ctx.sizes.chunk_rows * vocab):
        plan = chunking.plan_tiles(n_tokens, vocab, device=ctx.device)
        if plan.cols < vocab or plan.rows != ctx.sizes.chunk_rows:
            record.add({"id": check_id, "error": f"the plan is not {chunks} whole-row chunks: {plan}"})
            return
        for backend, _ in ORDER[:3]:
            fn = functools.partial(opd_fast.linear_divergence, backend=backend, plan="chunked")
            got = checker.compare(check_id, backend, "chunked", fn, inputs, expected, plain, grouped=False)
            if got is not None:
                with mock.patch.dict(os.environ, {STREAM_OVERLAP_ENV: "0"}):  # read on every call
                    serial = value_and_grads(fn, inputs)
                same_as_serial(ctx, record, f"{check_id}-overlap-off", backend, got, serial)
                del got, serial
            with chunking.dw_gemm("single"):
                single = f"{check_id}-dw-single"
                checker.compare(single, backend, "chunked", fn, inputs, expected, plain, grouped=False)
    cut = ctx.sizes.unaligned_vocab
    unaligned, exact = ([t[0], t[1][:cut].detach().requires_grad_(), t[2], t[3][:cut]] for t in (inputs, exact))
    materialized = functools.partial(reference.materialized_divergence, divergence="reverse_kl")
    expected, plain = value_and_grads(materialized, exact), value_and_grads(materialized, unaligned)
    with opd_fast.chunk_budget(ctx.sizes.chunk_rows * cut):
        for backend, _ in ORDER[:3]:
            fn = functools.partial(opd_fast.linear_divergence, backend=backend, plan="chunked")
            checker.compare(f"{check_id}-V{cut}", backend, "chunked", fn, unaligned, expected, plain, grouped=False)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def same_as_serial(ctx: Context, record: StageFile, check: str, backend: str, got: list, serial: list) -> None:
    import torch

    differences = {n: rel_err(a, b) for n, a, b in zip(VALUE_AND_GRADS, got, serial)}
    identical = all(torch.equal(a, b) for a, b in zip(got, serial))
    passed = max(differences.values()) <= 1e-6
    row_id = f"{check}/{backend}-chunked"
    row = {"id": row_id, "check": check, "backend": backend, "plan": "chunked", "differences": differences}
    record.add({**row, "identical": identical, "passed": passed})
    ctx.say(
        f"[1 correctness] {row_id}: {'ok' if passed else 'NOT PASSED'} "
        f"({'bit-identical' if identical else f'max rel. difference {max(differences.values()):.2e}'})"
    )


def check_topk(ctx: Context, record: StageFile, inputs: list, k: int) -> None:
    """Top-k ids and statistics of every backend × plan against float64 materialized ones on the same inputs.

    Near-tied logits may swap under different summation orders, so ids must agree at ≥ 99% of the positions
    and each statistic within 2e-3 + 1e-3·|value| (as tests/api/test_gpu.py asks of Triton against torch)."""
    import torch

    import opd_fast
    from opd_fast import backends, reference
    from opd_fast.bench import cases

    with torch.no_grad():
        expected = reference.materialized_topk_overlap(*(t.detach().double() for t in inputs), k=k)
    for backend, plan in ORDER:
        row_id = f"topk_k{k}/{backend}-{plan}"
        if row_id in record.done:
            continue
        row = {"id": row_id, "check": f"topk_k{k}", "backend": backend, "plan": plan}
        reason = backends.unavailable_reason(backend, ctx.device)
        if reason is not None:
            record.add({**row, "error": f"skipped: {reason}"})
            continue
        record.begin(row_id)
        try:
            got = opd_fast.linear_topk_overlap(*inputs, k=k, backend=backend, **cases.plan_option(plan))
        except Exception as exc:
            record.add({**row, "error": error_line(exc)})
            ctx.say(f"[1 correctness] {row_id}: {error_line(exc)[:160]}")
            continue
        agreement = {
            side: float((getattr(got, f"{side}_topk_ids") == getattr(expected, f"{side}_topk_ids")).float().mean())
            for side in ("student", "teacher")
        }
        deviation = {}
        for name in TOPK_STATISTICS:
            ours, ref = getattr(got, name).double(), getattr(expected, name).double()
            deviation[name] = float(((ours - ref).abs() - 1e-3 * ref.abs()).max())
        row.update(id_agreement=agreement, max_deviation=deviation)
        row["passed"] = min(agreement.values()) >= 0.99 and max(deviation.values()) <= 2e-3
        record.add(row)
        ctx.say(
            f"[1 correctness] {row_id}: {'ok' if row['passed'] else 'NOT PASSED'} (ids agree at "
            f"{100 * min(agreement.values()):.1f}%, worst statistic {max(deviation.values()):.1e} beyond 1e-3·|ref|)"
        )
