"""Make Triton's CPU interpreter treat NaN in ``tl.maximum``/``tl.minimum`` as the compiled kernels do.

With the default ``propagate_nan=tl.PropagateNan.NONE``, Triton lowers float maximum/minimum to
``arith.maxnumf``/``minnumf``, which become PTX ``max.f32``/``min.f32``: a NaN operand is ignored and the other
one returned. Triton 3.6's interpreter runs the same ops as ``np.maximum``/``np.minimum``, which return the NaN.
(Its ``tl.max``/``tl.min`` reductions already ignore NaN, through ``np.nanmax``/``np.nanmin``, as the GPU does.)
A kernel whose NaN handling is right only under the interpreter's semantics would pass every CPU test and
then drop NaN on the GPU, so the tests run the interpreter with the GPU's semantics: ``np.fmax``/``np.fmin``.
``propagate_nan=tl.PropagateNan.ALL`` (``maximumf``/``minimumf``, PTX ``max.NaN.f32``) keeps NaN in both.
"""

from __future__ import annotations

import numpy as np


def match_compiled_nan_semantics() -> None:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
