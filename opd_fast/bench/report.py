"""The rows as people and tools read them: the printed table, JSON, CSV and a plot of time and memory."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from opd_fast._plotting import require_matplotlib, save_figure
from opd_fast.bench.cases import SKIPPED, display_name


def speed_text(speedup: float) -> str:
    """A baseline's time over a row's as words: "2.10× faster" at 2.1, "1.35× slower" at 1 / 1.35."""
    if speedup >= 1:
        return f"{speedup:.2f}× faster"
    return f"{1 / speedup:.2f}× slower"


def _comparable(row: dict) -> tuple:
    """The fields two rows must share to be compared (the same work on the same inputs)."""
    keys = ("tokens", "hidden", "teacher_hidden", "vocab", "dtype", "mode", "loss", "inputs")
    return tuple(row.get(key) for key in keys)


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per reason the skipped rows give, naming their backends: "skipped opd_fast/cuda, ...: reason"."""
    backends_of: dict[str, list[str]] = {}
    for r in rows:
        if r.get("error", "").startswith(SKIPPED):
            names = backends_of.setdefault(r["error"].removeprefix(SKIPPED), [])
            if display_name(r["backend"]) not in names:
                names.append(display_name(r["backend"]))
    return [f"skipped {', '.join(names)}: {reason}" for reason, names in backends_of.items()]


def format_table(rows: list[dict]) -> str:
    """The rows that ran or failed, with speed and memory against naive, then each reason for skipping once."""
    shown = [r for r in rows if not r.get("error", "").startswith(SKIPPED)]
    labels = [display_name(r["backend"]) + (f" ε={r['filter_eps']:.3g}" if r.get("filter_eps") else "") for r in shown]
    width = max(map(len, ["backend", *labels]))
    predicted = any("predicted_ms" in r for r in shown)  # the model's column, beside the measured median
    header = f"{'backend':>{width}} {'loss':>12} {'tokens':>7} {'Hs/Ht':>11} {'vocab':>7} {'dtype':>5} {'mode':>7} "
    header += f"{'median ms':>10} " + (f"{'pred. ms':>9} " if predicted else "")
    header += f"{'p20-p80 ms':>17} {'peak MB':>9} {'TFLOP/s':>8} {'H(p_s)':>6} {'shared':>6}  vs naive"
    lines = [header, "-" * len(header)]
    naive = {_comparable(r): r for r in rows if r["backend"] == "naive" and "error" not in r}
    for r, label in zip(shown, labels):
        shape = f"{r['hidden']}/{r['teacher_hidden']}"
        prefix = f"{label:>{width}} {r['loss']:>12} {r['tokens']:>7} {shape:>11} {r['vocab']:>7} {r['dtype']:>5} "
        prefix += f"{r['mode']:>7} "
        if "error" in r:
            lines.append(prefix + r["error"])
            continue
        base = naive.get(_comparable(r))
        ratio = ""
        if base is not None and r["backend"] != "naive":
            memory = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else float("nan")
            ratio = f"{speed_text(base['median_ms'] / r['median_ms'])}, {100 * memory:.1f}% memory"
        if "filter_skipped_fraction" in r:
            ratio += f" (filter skipped {100 * r['filter_skipped_fraction']:.1f}% of tiles)"
        spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}"
        rate = f"{r['effective_tflops']:>8.3f}"
        inputs = f"{r['entropy_student']:>6.2f} {r['shared_mass']:>6.3f}"
        model = (f"{r['predicted_ms']:>9.1f} " if "predicted_ms" in r else f"{'-':>9} ") if predicted else ""
        lines.append(
            prefix + f"{r['median_ms']:>10.1f} {model}{spread:>17} {r['peak_mem_mb']:>9.1f} {rate} {inputs}  {ratio}"
        )
    return "\n".join(lines + skipped_lines(rows))


def write_json(path: str | os.PathLike, env: dict, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


def write_csv(path: str | os.PathLike, env: dict, rows: list[dict]) -> None:
    """One line per result; the environment is repeated in ``env_*`` columns so each line stands alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    env_columns = {f"env_{k}": v for k, v in env.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns + list(env_columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env_columns})


def plot(path: str | os.PathLike, rows: list[dict], title: str) -> None:
    """Time and peak memory vs tokens per backend (and loss, mode, dtype where they vary), log scales, one PNG."""
    plt = require_matplotlib()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in rows if "error" not in r]
    varying = [key for key in ("loss", "mode", "dtype", "filter_eps") if len({r.get(key) for r in ok}) > 1]

    def series_of(r: dict) -> tuple:
        return (r["backend"], *(r.get(k) for k in varying))

    for series in dict.fromkeys(series_of(r) for r in ok):
        mine = sorted((r for r in ok if series_of(r) == series), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in mine]
        label = " ".join(str(part) for part in (display_name(series[0]), *series[1:]) if part is not None)
        ax_time.plot(tokens, [r["median_ms"] for r in mine], marker="o", label=label)
        ax_mem.plot(tokens, [r["peak_mem_mb"] for r in mine], marker="o", label=label)
    for ax, label in ((ax_time, "median time (ms)"), (ax_mem, "peak memory beyond inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path, dpi=120)
