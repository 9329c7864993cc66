"""argparse value types shared by the CLIs (`opd-fast bench/train` and `opd-fast diagnose`)."""

from __future__ import annotations

import argparse


def _int_at_least(minimum: int, expectation: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")
