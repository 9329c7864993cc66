"""opd_fast: on-policy distillation losses straight from hidden states and lm_head weights.

Every op walks the tokens in chunks (and, when needed, the vocabulary in tiles), so the [tokens ×
vocabulary] logits of the student and the teacher are never materialized. See docs/design.md §3 for the
contract and README.md for examples.
"""

from opd_fast.backends import BackendUnavailableError
from opd_fast.backends.gemms import last_filter_stats
from opd_fast.chunking import chunk_budget, get_chunk_budget, set_chunk_budget
from opd_fast.distributed import shard_rows
from opd_fast.functional import linear_divergence, linear_reverse_kl, linear_token_logprobs
from opd_fast.heads import LMHead
from opd_fast.modules import OPDLoss
from opd_fast.sequences import completion_mask
from opd_fast.topk import (
    OverlapAverages,
    linear_topk_divergence,
    linear_topk_overlap,
    linear_topk_target_divergence,
    overlap_averages,
)
from opd_fast.types import LossWithEntropy, TopKOverlap

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LMHead",
    "LossWithEntropy",
    "OPDLoss",
    "OverlapAverages",
    "TopKOverlap",
    "__version__",
    "chunk_budget",
    "completion_mask",
    "get_chunk_budget",
    "last_filter_stats",
    "linear_divergence",
    "linear_reverse_kl",
    "linear_token_logprobs",
    "linear_topk_divergence",
    "linear_topk_overlap",
    "linear_topk_target_divergence",
    "overlap_averages",
    "set_chunk_budget",
    "shard_rows",
]
