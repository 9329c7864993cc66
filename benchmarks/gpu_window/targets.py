"""The targets (reverse KL forward+backward, bf16): our fastest exact row within 1.25× the matmul floor, ≥ 1.5× naive,
≥ 1.15× the fastest of Liger's two paths, TRL's chunked divergence and torch.compile; judged on the measured medians
and, separately, on the performance model's predictions at the measured ceilings, so that a miss says whether the
code or the model's assumption was off.

Standard library only, except :func:`attach_prediction`, which the stage processes call.
"""

from __future__ import annotations

FLOOR_RATIO = 1.25
SPEEDUP_VS_NAIVE = 1.5
SPEEDUP_VS_RIVAL = 1.15
RIVALS = ("liger", "liger_chunked", "trl", "compile")
OURS = ("torch", "triton", "cuda", "triton-streaming", "cuda-streaming")


def attach_prediction(row: dict, ceilings) -> dict:
    """``row`` with the model's ``predicted_ms``, ``predicted_floor_ms`` and ``predicted_peak_mb`` at ``ceilings``
    (a skipped row too: the model's verdict does not need the row to run); unchanged where the model does not cover
    the row. ``ceilings`` None (the model did not import) leaves it unchanged too."""
    if ceilings is None:
        return row
    from opd_fast import perf_model

    prediction = perf_model.predict_bench_row(row, ceilings)
    if prediction is not None:
        row.update(
            predicted_ms=prediction.ms,
            predicted_floor_ms=prediction.floor_ms,
            predicted_peak_mb=prediction.peak_extra_bytes / 2**20,
        )
    return row


def _timing(row: dict, predicted: bool) -> tuple[float, float | None, float | None] | None:
    """(ms, ratio to the floor, peak MB) of a row as measured or as predicted; None where it has no such time."""
    if predicted:
        if "predicted_ms" not in row:
            return None
        floor = row.get("predicted_floor_ms")
        return row["predicted_ms"], row["predicted_ms"] / floor if floor else None, row.get("predicted_peak_mb")
    if "error" in row or "median_ms" not in row:
        return None
    return row["median_ms"], row.get("ratio_to_floor"), row.get("peak_mem_mb")


def comparable(rows: list[dict], predicted: bool = False) -> dict[tuple[str, int], dict[str, dict]]:
    """Exact reverse-KL rows of the default settings (no filtering, no variant) by (loss, N) and backend, each as
    {"ms", "ratio", "peak_mb"}: the rows the targets compare."""
    table: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        if row.get("filter_eps") or row.get("variant"):
            continue
        timing = _timing(row, predicted)
        if timing is not None:
            ms, ratio, peak = timing
            table.setdefault((row.get("loss", "reverse_kl"), row["tokens"]), {})[row["backend"]] = dict(
                ms=ms, ratio=ratio, peak_mb=peak
            )
    return table


def fastest_rival(named: dict[str, dict]) -> tuple[str, float] | None:
    """(name, ms) of the fastest rival in ``named`` (a value of :func:`comparable`), None without one."""
    rivals = [(name, named[name]["ms"]) for name in RIVALS if name in named]
    return min(rivals, key=lambda item: item[1]) if rivals else None


def row_verdict(row: dict, named: dict[str, dict], predicted: bool = False) -> dict | None:
    """One row of ours against the floor, naive and the fastest rival of its (loss, N) (``named``: a value of
    :func:`comparable`), as measured or as predicted; None when the row has no such time."""
    timing = _timing(row, predicted)
    if timing is None:
        return None
    ms, ratio, _ = timing
    naive, rival = named.get("naive"), fastest_rival(named)
    verdict = {
        "ms": ms,
        "ratio_to_floor": ratio,
        "speedup_vs_naive": naive["ms"] / ms if naive else None,
        "rival": rival[0] if rival else None,
        "speedup_vs_rival": rival[1] / ms if rival else None,
    }
    verdict["met"] = (
        (ratio is None or ratio <= FLOOR_RATIO)
        and (verdict["speedup_vs_naive"] or 0) >= SPEEDUP_VS_NAIVE
        and (verdict["speedup_vs_rival"] or 0) >= SPEEDUP_VS_RIVAL
    )
    return verdict


def check_targets(rows: list[dict], predicted: bool = False) -> list[dict]:
    """Per token count: our fastest exact reverse-KL row of the default settings against the floor and the peers.

    ``rows`` are benchmark rows (``opd-fast bench --json`` format, with the model's ``predicted_*`` fields when
    ``predicted``). Measured: rows without an ``error``; predicted: every row the model covers, run or not.
    Memory is reported against naive's, not judged. Separately (measured only), our fastest row with filtering
    on the peaked inputs should come in below the dense floor.
    """
    exact = {tokens: named for (loss, tokens), named in comparable(rows, predicted).items() if loss == "reverse_kl"}
    filtered: dict[int, list[dict]] = {}
    for row in rows:
        peaked_ours = row["backend"] in OURS and row.get("inputs") == "peaked" and "median_ms" in row
        if row.get("filter_eps") and row.get("loss", "reverse_kl") == "reverse_kl" and peaked_ours:
            filtered.setdefault(row["tokens"], []).append(row)
    verdicts = []
    for tokens, named in sorted(exact.items()):
        ours = [name for name in OURS if name in named]
        if not ours or "naive" not in named:
            verdicts.append({"tokens": tokens, "error": "needs a row of ours and a naive row"})
            continue
        best = min(ours, key=lambda name: named[name]["ms"])
        mine, naive, rival = named[best], named["naive"], fastest_rival(named)
        verdict = {
            "tokens": tokens,
            "backend": best,
            "median_ms": mine["ms"],
            "ratio_to_floor": mine["ratio"],
            "meets_floor": None if mine["ratio"] is None else mine["ratio"] <= FLOOR_RATIO,
            "speedup_vs_naive": naive["ms"] / mine["ms"],
            "memory_fraction_of_naive": None,
            "rival": rival[0] if rival else None,
            "speedup_vs_rival": rival[1] / mine["ms"] if rival else None,
        }
        if mine["peak_mb"] is not None and naive["peak_mb"]:
            verdict["memory_fraction_of_naive"] = mine["peak_mb"] / naive["peak_mb"]
        verdict["meets_rival"] = (verdict["speedup_vs_rival"] or 0) >= SPEEDUP_VS_RIVAL
        verdict["meets_naive"] = verdict["speedup_vs_naive"] >= SPEEDUP_VS_NAIVE
        verdict["met"] = verdict["meets_floor"] is not False and verdict["meets_naive"] and verdict["meets_rival"]
        if tokens in filtered and not predicted:
            fastest = min(filtered[tokens], key=lambda r: r["median_ms"])
            floor_ms = fastest.get("floor_ms")
            verdict["filtered"] = {
                "backend": fastest["backend"],
                "filter_eps": fastest["filter_eps"],
                "median_ms": fastest["median_ms"],
                "skipped_fraction": fastest.get("filter_skipped_fraction"),
                "below_floor": None if floor_ms is None else fastest["median_ms"] < floor_ms,
            }
        verdicts.append(verdict)
    return verdicts
