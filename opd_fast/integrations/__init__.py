"""opd_fast inside other training frameworks.

Each submodule imports its framework when it is itself imported, never before: ``import opd_fast`` and
``import opd_fast.integrations`` stay free of optional dependencies.

* :mod:`opd_fast.integrations.transformers`: transformers causal LMs: their final hidden states and their output
  heads as their forwards apply them (what :meth:`opd_fast.LMHead.from_model` reads: the head-family table, peft
  wrappers, FSDP2 and tensor-parallel heads). transformers is imported only to identify a model's class.
* :mod:`opd_fast.integrations.trl`: TRL's ``DistillationTrainer`` and ``experimental.gkd.GKDTrainer`` with
  their loss computed by :func:`opd_fast.linear_divergence` from final hidden states and lm_heads.
* :mod:`opd_fast.integrations.fsdp`: students sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): the
  sharding, the hidden states through the root's forward, and the head gathered or vocabulary-parallel.
"""
