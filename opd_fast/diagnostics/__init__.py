"""Geometry of OPD weight updates, measured from checkpoints (Shen et al., arXiv:2606.07082).

:mod:`.checkpoint` reads safetensors checkpoints one tensor at a time, :mod:`.metrics` holds the metrics
of one matrix (their definitions are in its docstring) and :class:`DiagnoseSettings`, and :mod:`.report`
compares whole checkpoints (:func:`diagnose`) and writes the table, JSON and plots of ``opd-fast diagnose``.
The subspace-locked training of the paper's §4 lives with the trainer: :class:`opd_fast.trainer.SubspaceLock`.
"""

from opd_fast.diagnostics.checkpoint import Checkpoint, DiagnosticsError
from opd_fast.diagnostics.metrics import (
    DEFAULT_SETTINGS,
    DiagnoseSettings,
    bf16_unchanged_mask,
    compare_matrices,
    hill_alpha,
    mask_overlap,
    normalized_spectral_shift,
    numerical_rank,
    principal_angles,
    singular_values,
    stable_rank,
    subspace_emergence,
    subspace_similarity,
    svd,
    top_right_vectors,
)
from opd_fast.diagnostics.report import (
    SUMMARY_METRICS,
    diagnose,
    format_table,
    layer_type,
    plot,
    summarize,
    write_json,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "SUMMARY_METRICS",
    "Checkpoint",
    "DiagnoseSettings",
    "DiagnosticsError",
    "bf16_unchanged_mask",
    "compare_matrices",
    "diagnose",
    "format_table",
    "hill_alpha",
    "layer_type",
    "mask_overlap",
    "normalized_spectral_shift",
    "numerical_rank",
    "plot",
    "principal_angles",
    "singular_values",
    "stable_rank",
    "subspace_emergence",
    "subspace_similarity",
    "summarize",
    "svd",
    "top_right_vectors",
    "write_json",
]
