"""opd_fast inside other training frameworks.

Each submodule imports its framework when it is itself imported, never before: ``import opd_fast`` and
``import opd_fast.integrations`` stay free of optional dependencies.

* :mod:`opd_fast.integrations.trl`: TRL's ``DistillationTrainer`` and ``experimental.gkd.GKDTrainer`` with
  their loss computed by :func:`opd_fast.linear_divergence` from final hidden states and lm_heads.
"""
