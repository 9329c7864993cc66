"""The benchmark stages: the headline (ours and naive at N=8192, the plan's variants, the per-kernel profile), the
sweep (ours and naive at every other N and loss) and the peers. Every row gets the model's prediction beside its
measured median."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from unittest import mock

from gpu_window import profiling
from gpu_window.config import FILTER_EPS, TORCH_WITHIN_NAIVE
from gpu_window.stages import Context, ContextLost, StageFile, context_lost, error_line
from gpu_window.targets import attach_prediction

PEERS = ("liger", "trl", "liger_chunked", "compile")  # the two that first compile for tens of seconds last
STREAMING = ("cuda-streaming", "triton-streaming")
PROFILED = ("naive", "cuda", "triton")


@dataclass(frozen=True)
class Variant:
    """A setting of the chunked plan that a headline row changes: environment variables read on every call, the
    row fields that tell the model the same, or another vocabulary."""

    name: str
    env: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    unaligned_vocab: bool = False


def variants() -> tuple[Variant, ...]:
    from opd_fast.backends.sweep import STREAM_OVERLAP_ENV
    from opd_fast.chunking import CHUNK_ELEMENTS_ENV, DW_GEMM_ENV

    budget = 2**29
    return (
        Variant("overlap-off", {STREAM_OVERLAP_ENV: "0"}, {"overlap": False}),
        Variant("budget-2^29", {CHUNK_ELEMENTS_ENV: str(budget)}, {"budget": budget}),
        Variant("unaligned-V", unaligned_vocab=True),  # rows off the 64-element stride unless padded
        Variant("dw-single", {DW_GEMM_ENV: "single"}, {"dw_gemm": "single"}),
        Variant("dw-per-chunk", {DW_GEMM_ENV: "per_chunk"}, {"dw_gemm": "per_chunk"}),  # the default is auto
    )


@dataclass(frozen=True)
class Job:
    case: object  # opd_fast.bench.cases.Case
    variant: Variant | None = None

    @property
    def id(self) -> str:
        case = self.case
        label = case.backend + (f"-filter{case.filter_eps:.3g}" if case.filter_eps else "")
        label += f"+{self.variant.name}" if self.variant else ""
        loss = case.loss + (f"_k{case.topk_k}" if case.loss == "topk_overlap" else "")
        return f"{loss}/N{case.tokens}/{label}"


def jobs(shape: dict, loss: str, backends, topk_k: int | None = None, filter_eps: float | None = None) -> list[Job]:
    from opd_fast.bench import cases

    common = dict(shape, mode="fwd" if loss == "topk_overlap" else "fwd+bwd", loss=loss, inputs="peaked")
    if loss == "topk_overlap":
        common["topk_k"] = topk_k
    return [Job(cases.Case(name, **common, filter_eps=filter_eps)) for name in backends]


def headline_jobs(ctx: Context) -> tuple[list[Job], list[Job]]:
    """(naive and ours at the headline, the rest: the plan's variants, filtering, streaming, torch last since it
    runs only within 3× naive). The kernel profile runs between the two."""
    from opd_fast.bench import cases

    shape = ctx.sizes.headline
    first = jobs(shape, "reverse_kl", ("naive", "cuda", "triton"))
    rest = []
    for variant in variants():
        vocab = ctx.sizes.unaligned_vocab if variant.unaligned_vocab else shape["vocab"]
        name = f"V{vocab}" if variant.unaligned_vocab else variant.name
        for backend in ("cuda", "triton"):
            case = cases.Case(backend, **dict(shape, vocab=vocab), mode="fwd+bwd", inputs="peaked")
            rest.append(Job(case, Variant(name, variant.env, variant.fields)))
    rest += jobs(shape, "reverse_kl", ("cuda", "triton"), filter_eps=FILTER_EPS)
    rest += jobs(shape, "reverse_kl", (*STREAMING, "torch"))
    return first, rest


def run_cases(ctx: Context, record: StageFile, todo: list[Job], tag: str) -> None:
    """Benchmark ``todo`` in order, one row each, the model's prediction attached (skipped rows too); torch gets a
    call limit of 3× naive's median."""
    from opd_fast.bench import runner

    rate = ctx.measured()["matmul_tflops_bf16"]
    record.data["matmul_tflops_bf16"] = rate
    ceilings = model_ceilings(ctx, record)
    naive = [r for r in record.data["rows"] if r["backend"] == "naive" and "median_ms" in r]
    naive_ms = {(r["loss"], r["tokens"]): r["median_ms"] for r in naive}
    for job in todo:
        case, row_id = job.case, job.id
        if row_id in record.done:
            continue
        if ctx.left() < 2:
            row = {"id": row_id, **case.row(), "error": "skipped: the stage's time box ran out"}
            record.add(attach_prediction(row, ceilings))
            continue
        limit = ctx.sizes.call_limit_ms
        if case.backend == "torch" and (case.loss, case.tokens) in naive_ms:
            limit = min(limit or float("inf"), TORCH_WITHIN_NAIVE * naive_ms[(case.loss, case.tokens)])
        record.begin(row_id)
        started = time.perf_counter()
        with mock.patch.dict(os.environ, job.variant.env if job.variant else {}):  # read on every call
            row = runner.run_case(
                case,
                ctx.device,
                warmup=ctx.sizes.warmup,
                repeats=ctx.sizes.repeats,
                max_seconds=min(ctx.sizes.row_seconds, max(ctx.left() / 4, 0.1)),
                call_limit_ms=None if case.backend == "naive" else limit,
                matmul_tflops=rate,
                interpreter=ctx.sizes.interpreter,
            )
        row["seconds"] = round(time.perf_counter() - started, 3)  # inputs, warm-up, timing and the memory run
        if job.variant:
            row.update(variant=job.variant.name, **job.variant.fields)
        attach_prediction(row, ceilings)
        if case.backend == "naive" and "median_ms" in row:
            naive_ms[(case.loss, case.tokens)] = row["median_ms"]
        ctx.say(f"[{tag}] {row_id}: {row_text(row)}")
        record.add({"id": row_id, **row})


def model_ceilings(ctx: Context, record: StageFile):
    """The model's ceilings, or None (and the reason in the stage file) when the model does not import or work."""
    try:
        return ctx.ceilings()
    except Exception as exc:
        record.data["model_error"] = error_line(exc)
        ctx.say(f"no predictions: {record.data['model_error']}")
        return None


def row_text(row: dict) -> str:
    if "median_ms" not in row:
        return row.get("error", "")[:200]
    text = f"{row['median_ms']:.2f} ms"
    if "predicted_ms" in row:
        text += f" (predicted {row['predicted_ms']:.2f})"
    text += f", peak {row['peak_mem_mb']:.0f} MB"
    if row.get("ratio_to_floor"):
        text += f", {row['ratio_to_floor']:.2f}× floor"
    if row.get("filter_skipped_fraction") is not None:
        text += f", filter skipped {100 * row['filter_skipped_fraction']:.1f}% of tiles"
    return text + f" (H(p_s) {row['entropy_student']:.2f}, shared mass {row['shared_mass']:.3f})"


def profile_kernels(ctx: Context, record: StageFile) -> None:
    """One forward+backward of naive, cuda and triton at the headline shape under torch.profiler, beside the
    model's kernels of the same call; into the stage file's "profile"."""
    from opd_fast.bench import cases, runner

    profiles = record.data.setdefault("profile", {})
    ceilings = model_ceilings(ctx, record)
    for backend in PROFILED:
        if backend in profiles:
            continue
        case = cases.Case(backend, **ctx.sizes.headline, mode="fwd+bwd", inputs="peaked")
        reason = cases.skip_reason(case, ctx.device, interpreter=ctx.sizes.interpreter)
        if reason is not None or ctx.left() < 5:
            profiles[backend] = {"error": f"skipped: {reason or 'too little time left'}"}
            continue
        record.begin(f"profile/{backend}")
        try:
            fn, _ = runner.timed_call(case, cases.case_inputs(case, ctx.device))
            prediction = None if ceilings is None else attach_model(case.row(), ceilings)
            profiles[backend] = profiling.kernel_profile(fn, ctx.device, prediction)
        except Exception as exc:
            profiles[backend] = {"error": error_line(exc)}
        record.data["in_progress"] = None
        record.save()
        for line in profiling.format_profile(f"profile {backend}", profiles[backend]).splitlines():
            ctx.say(f"[2 headline] {line}")
        if context_lost(profiles[backend].get("error", "")):
            raise ContextLost(profiles[backend]["error"])


def attach_model(row: dict, ceilings) -> dict | None:
    from opd_fast import perf_model

    prediction = perf_model.predict_bench_row(row, ceilings)
    return None if prediction is None else prediction.as_dict()


def stage_headline(ctx: Context, record: StageFile) -> None:
    record.data["notes"] = ctx.sizes.notes
    first, rest = headline_jobs(ctx)
    run_cases(ctx, record, first, "2 headline")
    profile_kernels(ctx, record)
    run_cases(ctx, record, rest, "2 headline")
    write_plot(ctx)


def stage_sweep(ctx: Context, record: StageFile) -> None:
    """Ours and naive at every N and loss first; then the streaming plans and torch at each."""
    record.data["notes"] = ctx.sizes.notes
    shapes = [(dict(ctx.sizes.headline, tokens=n), "reverse_kl") for n in ctx.sizes.sweep_tokens]
    shapes += [(dict(ctx.sizes.headline, tokens=ctx.sizes.loss_tokens), loss) for loss in ("forward_kl", "jsd")]
    topk = dict(ctx.sizes.headline, tokens=ctx.sizes.loss_tokens)
    todo = [job for shape, loss in shapes for job in jobs(shape, loss, ("naive", "cuda", "triton"))]
    todo += jobs(topk, "topk_overlap", ("naive", "cuda", "triton", *STREAMING, "torch"), ctx.sizes.topk_ks[0])
    todo += [job for shape, loss in shapes for job in jobs(shape, loss, (*STREAMING, "torch"))]
    run_cases(ctx, record, todo, "3 sweep")
    write_plot(ctx)


def stage_peers(ctx: Context, record: StageFile) -> None:
    """Liger, TRL and torch.compile: the headline N first (its rival target), then the sweep's N, then the other
    losses."""
    record.data["notes"] = ctx.sizes.notes
    counts = (ctx.sizes.headline["tokens"], *ctx.sizes.sweep_tokens)
    todo = [job for n in counts for job in jobs(dict(ctx.sizes.headline, tokens=n), "reverse_kl", PEERS)]
    loss_shape = dict(ctx.sizes.headline, tokens=ctx.sizes.loss_tokens)
    todo += [job for loss in ("forward_kl", "jsd") for job in jobs(loss_shape, loss, PEERS)]
    run_cases(ctx, record, todo, "4 peers")
    write_plot(ctx)


def write_plot(ctx: Context) -> None:
    """``<stem>.png``: the headline's medians as bars against the floor and the predictions; time vs N."""
    from opd_fast._plotting import require_matplotlib

    try:
        plt = require_matplotlib()
    except RuntimeError as exc:
        ctx.say(f"no plot: {exc}")
        return
    tokens = ctx.sizes.headline["tokens"]
    rows = [r for n in (2, 3, 4) for r in ctx.stage_data(n).get("rows", []) if "median_ms" in r]
    rows = [r for r in rows if r["loss"] == "reverse_kl"]
    headline = [r for r in rows if r["tokens"] == tokens]
    fig, (ax_bars, ax_lines) = plt.subplots(1, 2, figsize=(13, 5.5))
    labels = [r["id"].split("/", 2)[2] for r in headline]
    ax_bars.barh(labels, [r["median_ms"] for r in headline], color="tab:blue", label="measured")
    predicted = [(i, r["predicted_ms"]) for i, r in enumerate(headline) if "predicted_ms" in r]
    if predicted:
        ax_bars.plot(*zip(*((ms, i) for i, ms in predicted)), "|", color="tab:orange", markersize=14, mew=3)
        ax_bars.plot([], [], "|", color="tab:orange", mew=3, label="predicted (model, measured ceilings)")
    floors = [r["floor_ms"] for r in headline if r.get("floor_ms")]
    if floors:
        ax_bars.axvline(floors[0], color="black", linestyle="--", label=f"floor {floors[0]:.1f} ms")
    ax_bars.set_xlabel("median ms, reverse KL forward+backward")
    ax_bars.tick_params(axis="y", labelsize="small")
    ax_bars.invert_yaxis()
    ax_bars.legend(fontsize="small")
    if headline:
        h = headline[0]
        ax_bars.set_title(f"N={h['tokens']}, Hs/Ht={h['hidden']}/{h['teacher_hidden']}, V={h['vocab']}, {h['dtype']}")
    by_backend: dict[str, list] = {}
    for r in rows:
        if not r.get("filter_eps") and not r.get("variant"):
            by_backend.setdefault(r["backend"], []).append(r)
    for backend, mine in by_backend.items():
        mine = sorted({r["tokens"]: r for r in mine}.values(), key=lambda r: r["tokens"])
        ax_lines.plot([r["tokens"] for r in mine], [r["median_ms"] for r in mine], marker="o", label=backend)
    ax_lines.set_xscale("log", base=2)
    ax_lines.set_yscale("log")
    ax_lines.set_xlabel("tokens N")
    ax_lines.set_ylabel("median ms")
    ax_lines.grid(True, which="both", alpha=0.3)
    ax_lines.legend(fontsize="small")
    gpu = ctx.stage_data(0).get("env", {}).get("gpu") or "CPU rehearsal"
    fig.suptitle(f"opd_fast GPU verification, {gpu}")
    fig.tight_layout()
    fig.savefig(ctx.out / f"{ctx.stem}.png", dpi=110)
    plt.close(fig)
