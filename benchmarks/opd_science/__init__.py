"""Reproducing the OPD papers' findings on a small pretrained model on the CPU (``benchmarks/science.py``).

Modules: :mod:`.corpus` (the synthetic skills and styles), :mod:`.models` (pretraining the base LM, deriving the
teachers, the cache), :mod:`.runs` (the fine-tuning runs through ``opd_fast.trainer``), :mod:`.measure`
(accuracy, top-k overlap at visited states, drift, ``opd-fast diagnose``), :mod:`.claims` (each paper claim,
its number, ours and the verdict), :mod:`.report` (JSON, plots, the markdown table), :mod:`.pipeline` (all of it).
"""
