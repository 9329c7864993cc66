"""The fused entry points as ``torch.library`` custom ops, so that eager and ``torch.compile`` runs share one path.

One module per op family holds its custom ops, their fake implementations, their registered gradients and the
typed function the public API calls (on a :class:`opd_fast._dispatch.CheckedPair` or a
:class:`opd_fast._dispatch.Route` with an :class:`opd_fast.types.Side`); :mod:`opd_fast.library._common` has what
they share. Each op takes tensors and plain values (a backend name, the plan, the head as numbers, the divergence
spec as numbers) and runs the ops object of :func:`opd_fast.backends.get_backend` (vocabulary-parallel over a shard:
:func:`opd_fast.distributed.parallel`) on real tensors; ``torch.compile`` sees one opaque node per op, whose output
shapes and dtypes come from the op's fake implementation (``register_fake``), and its gradient formula from
``register_autograd``:

===================================  ====================================================================
:mod:`~opd_fast.library.divergence`  ``opd_fast::divergence``: per-token divergence, reduced; for "mean"/"sum"
                                     the student gradients are made in the same sweep and returned as extra
                                     outputs, which the backward only scales by the incoming scalar (no
                                     recompute, docs/design.md §5); for "none" the per-token statistics, for
                                     ``opd_fast::divergence_backward``, the gradients of Σ_n g_n D_n from them
                                     (one more sweep); ``opd_fast::entropy_backward``, the gradients of the
                                     student's entropy; :func:`~opd_fast.library.divergence.linear_divergence`
:mod:`~opd_fast.library.logits`      ``opd_fast::token_logprobs`` (log p(y), (lse, lse_lo)) and
                                     ``opd_fast::logsumexp`` (lse) per token, and their backward
                                     ``opd_fast::logits_backward``, the gradients of Σ_n g_n lse_n or
                                     Σ_n g_n log p(y_n); ``linear_token_logprobs``, ``linear_logsumexp``
:mod:`~opd_fast.library.topk`        ``opd_fast::topk``: (ids, log-probs, lse, entropy) of the top k per
                                     token, not differentiable; ``linear_topk``
:mod:`~opd_fast.library.gathered`    ``opd_fast::gathered_logits``: h_n · W[ids[n, m]] / τ at a few ids per
                                     token (top-k losses), and its backward
                                     ``opd_fast::gathered_logits_backward``; ``linear_gathered_logits``
===================================  ====================================================================

Inputs are already validated and flattened to 2-D ``[N, H]`` hidden states; gradients flow to the student's hidden
states, weight and bias (the teacher never gets any). Rows a ``mask`` leaves out are selected away inside the ops
(their size depends on the mask's values, which a compiled graph must not), and per-token outputs are put back at
their rows. A head is passed as ``[scale, softcap]`` (softcap 0 = none); a vocabulary shard by the key under which
:func:`opd_fast.distributed.shard_key` registered it ("" = whole weights), since a process group cannot cross the op
boundary.

Gradient dtypes: the forward's gradient outputs are in the accumulation dtype (fp32, fp64 for fp64 inputs), but
dW is in the dtype the sweep wrote it in (the weight's when written once); the backward scales each and casts it to
its input's dtype in one elementwise pass. No weight gradient is ever zero-filled: a ``vocab`` that cuts the
student's head short is applied inside the ops, whose backward zero-fills the cut rows alone.
"""
