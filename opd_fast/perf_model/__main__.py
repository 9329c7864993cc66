"""``python -m opd_fast.perf_model``: the predicted table, per-kernel breakdowns and JSON (predicted, not measured)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opd_fast.perf_model._api import TABLE_COLUMNS, predict, predicted_table
from opd_fast.perf_model._core import DEVICES, Workload


def kernel_lines(prediction) -> list[str]:
    """One line per kernel: launches, GFLOP, GB read and written, predicted ms."""
    device = prediction.device
    lines = [f"{'kernel':<44} {'launches':>8} {'GFLOP':>9} {'GB read':>8} {'GB written':>10} {'ms':>7}"]
    for k in prediction.kernels:
        lines.append(
            f"{k.name:<44} {k.count:>8} {k.flops / 1e9:>9.0f} {k.bytes_read / 1e9:>8.2f} "
            f"{k.bytes_written / 1e9:>10.2f} {k.seconds(device) * 1e3:>7.2f}"
        )
    lines.append(
        f"{'total':<44} {'':>8} {prediction.flops / 1e9:>9.0f} {prediction.bytes / 1e9:>19.2f} "
        f"{prediction.ms:>7.2f}  ({prediction.ratio_to_floor:.3f}× the floor, peak extra "
        f"{prediction.peak_extra_bytes / 2**30:.2f} GiB)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd_fast.perf_model",
        description="Predicted (model, not measured) reverse-KL forward+backward times of opd_fast and its peers.",
    )
    parser.add_argument("--device", nargs="+", choices=sorted(DEVICES), default=["h100", "h200"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--hidden", type=int, default=4096, help="student hidden size Hs")
    parser.add_argument("--teacher-hidden", type=int, default=5120, help="teacher hidden size Ht")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--budget", type=int, help="our chunk budget in logits elements (default: the CUDA one)")
    parser.add_argument("--kernels", action="store_true", help="also print every method's kernels")
    parser.add_argument("--json", metavar="PATH", help="write every prediction, kernels included, as JSON")
    args = parser.parse_args(argv)
    shape = dict(hidden=args.hidden, teacher_hidden=args.teacher_hidden, vocab=args.vocab)
    print(predicted_table(tuple(args.device), tuple(args.tokens), **shape))
    predictions = []
    for device in args.device:
        for n in args.tokens:
            workload = Workload(n, args.hidden, args.teacher_hidden, args.vocab)
            for header, method, options in TABLE_COLUMNS:
                if method in ("chunked", "streaming") and args.budget is not None:
                    options = {**options, "budget": args.budget}
                prediction = predict(method, workload, device, **options)
                predictions.append({"column": header, **prediction.as_dict()})
                if args.kernels:
                    print(f"\n{header} — {DEVICES[device].name}, N={n}")
                    print("\n".join(kernel_lines(prediction)))
    if args.json:
        Path(args.json).write_text(json.dumps(predictions, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
