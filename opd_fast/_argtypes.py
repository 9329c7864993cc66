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


def _float_in(accept, expectation: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}") from None
        if not accept(value):  # also refuses nan, for which every comparison is False
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text}")
        return value

    return parse


positive_float = _float_in(lambda x: 0 < x < float("inf"), "a positive number")
probability = _float_in(lambda x: 0 < x <= 1, "a number in (0, 1]")
