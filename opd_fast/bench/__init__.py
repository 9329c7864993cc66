"""`opd-fast bench` (the command: :mod:`opd_fast.cli.bench`): time and memory of the OPD losses per backend, side by
side in one run.

Each case (:mod:`~opd_fast.bench.cases`) draws its inputs on the benchmark device (:mod:`~opd_fast.bench.inputs`):
the ``random`` preset (logits ~ N(0, 16), unrelated student and teacher) or the ``peaked`` one (a chosen mean
entropy, 1.5 nats by default, and a chosen student mass on the shared top-16, 0.9), and every row reports what the
inputs were: both models' mean entropy, the shared top-16 mass and the top-16 overlap ratio. Then it times the
chosen mode (:mod:`~opd_fast.bench.runner`):

* ``fwd``: the loss alone (under grad mode, as in training; our backends then compute the gradients in
  the forward, so this is the whole cost);
* ``bwd``: ``loss.backward()`` alone, after an untimed forward;
* ``fwd+bwd``: both.

Losses: ``reverse_kl`` (the default), ``forward_kl``, ``jsd`` (β = 0.5) and ``topk_overlap`` (the k = 16
statistics, ``fwd`` only: a diagnostic without gradients).

Backends: ``naive`` (materialized logits and autograd, the baseline), ``compile`` (torch.compile of a
chunked plain-PyTorch loss), ``liger`` (Liger-Kernel's fused linear JSD), ``liger_chunked`` (its chunked
JSD loss) and ``trl`` (TRL's chunked divergence, the loss inside ``trl.DistillationTrainer``) when
installed — see :mod:`~opd_fast.bench.baselines` — and ours, each named with its plan: ``torch``, ``triton``,
``cuda`` (the default plan, chunked) and ``triton-streaming``, ``cuda-streaming`` (``plan="streaming"``).
A backend that cannot run here becomes a row whose ``error`` says ``skipped:`` and why; the printed table
(:mod:`~opd_fast.bench.report`) gives each such reason once, under the rows that ran, and names our backends
``opd_fast/torch`` etc., as the plot does. ``filter_eps`` turns on our backends' gradient filtering (exact by
default); the row then reports the share of logits tiles it skipped (``opd_fast.last_filter_stats()``). A run
estimated to be long or memory-hungry is announced first (:mod:`~opd_fast.bench.estimate`).

Prediction: given device ceilings (:class:`opd_fast.perf_model.DeviceCeilings`: measured on a GPU by
:func:`opd_fast.perf_model.measure_ceilings`, or named), each row the performance model covers also gets
``predicted_ms``, and the table a "pred. ms" column beside the measured median, so that a GPU run says which of
the model's assumptions was wrong. The performance model is a library the benchmark uses; it never imports the
benchmark.
"""
