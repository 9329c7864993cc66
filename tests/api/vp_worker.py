"""One rank of the vocabulary-parallel tests (tests/api/test_distributed.py), run under torch.multiprocessing.

Every rank builds the same full inputs from a seed, keeps its shard of both lm_heads (uneven sizes), runs
every op with process_group=WORLD and saves its results for the parent to compare with one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from worker_exit import exit_without_finalizing

from opd_fast import (
    linear_divergence,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_overlap,
    linear_topk_target_divergence,
    shard_rows,
)

N, HS, HT, V = 13, 8, 12, 47


def full_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64)
    ws = torch.randn(V, HS, generator=g, dtype=torch.float64) * 1.2
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64) * 1.0
    mask = torch.rand(N, generator=g) > 0.3
    ids = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    return [t.to(dtype) if t.is_floating_point() else t for t in (hs, ws, ht, wt, mask, ids, grad)]


def cases():
    """(name, kind, kwargs): the same list drives the workers and the single-process reference."""
    out = []
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        for reduction in ("mean", "none"):
            out.append(
                (
                    f"div-{divergence}-{reduction}",
                    "divergence",
                    dict(divergence=divergence, beta=0.3, reduction=reduction, temperature=1.3)
                    | ({"teacher_temperature": 0.7, "return_entropy": True} if reduction == "none" else {}),
                )
            )
    for divergence in ("skew_forward_kl", "skew_reverse_kl", "tvd"):
        for reduction in ("mean", "none"):
            kw = dict(divergence=divergence, skew=0.3, reduction=reduction, temperature=1.3, teacher_temperature=0.7)
            out.append((f"div-{divergence}-{reduction}", "divergence", kw))
    for divergence in ("reverse_kl", "forward_kl", "jsd"):  # hard labels: the label's logit on one shard only
        for reduction in ("mean", "none"):
            kw = dict(divergence=divergence, beta=0.3, reduction=reduction, hard_label_weight=0.3)
            out.append((f"labels-{divergence}-{reduction}", "labelled", kw))
    out.append(("div-vocab_size", "divergence", dict(reduction="sum", vocab_size=41)))
    for divergence in ("reverse_kl", "jsd"):  # vocab_size=18 leaves some ranks' shards empty
        out.append(
            (
                f"div-empty-shards-{divergence}",
                "divergence",
                dict(divergence=divergence, vocab_size=18, return_entropy=True),
            )
        )
    out.append(("tokens", "tokens", dict(temperature=0.8)))
    out.append(("topk-overlap", "overlap", dict(k=6, teacher_temperature=0.9)))
    for support in ("student", "union", "intersection"):
        for renormalize in (True, False):
            out.append((f"topk-{support}-{renormalize}", "topk", dict(k=5, support=support, renormalize=renormalize)))
    out.append(("target", "target", dict(divergence="forward_kl")))
    return out


def run_case(kind, kwargs, hs, ws, ht, wt, mask, ids, grad, process_group=None, backend="torch"):
    """Returns a dict of tensors: the output(s) and the gradients w.r.t. hs and ws."""
    hs = hs.detach().clone().requires_grad_()
    ws = ws.detach().clone().requires_grad_()
    common = dict(backend=backend, process_group=process_group)
    extra = {}
    if kind == "divergence":
        out = linear_divergence(hs, ws, ht, wt, mask=mask, **common, **kwargs)
        if kwargs.get("return_entropy"):
            out, extra["entropy"] = out
    elif kind == "labelled":
        labels = torch.where(torch.arange(N) % 4 == 0, -100, ids)
        out = linear_divergence(hs, ws, ht, wt, mask=mask, labels=labels, **common, **kwargs)
    elif kind == "tokens":
        out = linear_token_logprobs(hs, ws, ids, **common, **kwargs)
    elif kind == "overlap":
        stats = linear_topk_overlap(hs, ws, ht, wt, mask=mask, **common, **kwargs)
        return {name: value for name, value in stats._asdict().items()}
    elif kind == "topk":
        out = linear_topk_divergence(hs, ws, ht, wt, mask=mask, reduction="none", **common, **kwargs)
    else:
        with torch.no_grad():
            full_wt = wt if process_group is None else torch.cat(_all_shards(wt))
            lpt = torch.log_softmax(ht @ full_wt.T, dim=-1).topk(7, dim=-1)
        out = linear_topk_target_divergence(hs, ws, lpt.indices, lpt.values, mask=mask, reduction="none", **common)
    weights = grad if out.dim() else grad.sum()
    dh, dw = torch.autograd.grad((out * weights.to(out.dtype)).sum(), (hs, ws))
    return {"out": out.detach(), "dh": dh, "dw": dw, **extra}


def _all_shards(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's shard (for the target test's teacher, which needs the full teacher head)."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]]))
    largest = max(int(s) for s in sizes)
    padded = torch.zeros(largest, *local.shape[1:], dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[: int(s)] for p, s in zip(parts, sizes)]


def worker(rank: int, world: int, init_file: str, out_dir: str, sizes: list[int], backend: str, dtype: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hs, ws, ht, wt, mask, ids, grad = full_inputs(getattr(torch, dtype))
        ws_local, wt_local = shard_rows(ws, None, sizes), shard_rows(wt, None, sizes)
        results = {}
        for name, kind, kwargs in cases():
            if backend != "torch" and kind not in ("divergence", "tokens", "overlap"):
                continue
            results[name] = run_case(
                kind, kwargs, hs, ws_local, ht, wt_local, mask, ids, grad, dist.group.WORLD, backend
            )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()
