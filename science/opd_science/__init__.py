"""Reproducing the OPD papers' findings on a small pretrained model on the CPU (``science/run.py``).

Modules: :mod:`.corpus` (the synthetic skills and styles), :mod:`.models` (pretraining the base LM, deriving the
teachers, the cache), :mod:`.runs` (the accuracy and geometry runs through ``opd_fast.trainer``), :mod:`.grpo`
(GRPO-style group-normalised advantages), :mod:`.measure` (accuracy, top-k overlap at visited states, drift,
``opd-fast diagnose``, standard errors), :mod:`.claims` (the verdict registry: each claim, the paper's words, our
protocol, rule and thresholds, and the verdict), :mod:`.report` (JSON, plots, the markdown table),
:mod:`.pipeline` (all of it).
"""
