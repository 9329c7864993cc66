"""FSDP2 students (opd_fast.integrations.fsdp): 2 gloo ranks on the CPU, tiny Llama students with tied and
untied embeddings, both head modes, reverse KL and JSD; the losses, every full gradient and the loss after an
AdamW step equal one process's averaging the ranks' losses."""

from __future__ import annotations

import fsdp_worker
import pytest
import torch
import torch.multiprocessing as mp
from conftest import rel_err

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(fsdp_worker.worker, args=(fsdp_worker.WORLD, str(out / "init"), str(out)), nprocs=fsdp_worker.WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(fsdp_worker.WORLD)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head,divergence", fsdp_worker.cases())
def test_fsdp_student_matches_one_process(ranks, tied, head, divergence):
    expected = fsdp_worker.reference(tied, divergence)
    name = f"{'tied' if tied else 'untied'}-{head}-{divergence}"
    for rank, results in enumerate(ranks):
        got = results[name]
        assert rel_err(got["loss"], expected["losses"][rank]) < 1e-6, (name, rank)
        assert got["grads"].keys() == expected["grads"].keys()
        for param, grad in expected["grads"].items():
            assert rel_err(got["grads"][param], grad) < 1e-5, (name, rank, param, rel_err(got["grads"][param], grad))
        assert rel_err(got["after_step"], expected["after_step"][rank]) < 1e-5, (name, rank)


def test_bad_arguments_are_refused():
    from opd_fast.integrations.fsdp import final_hidden_states, fsdp_linear_divergence, fully_shard_causal_lm

    student, _ = fsdp_worker.build_models(tied=False)
    hidden = torch.zeros(2, fsdp_worker.HIDDEN)
    with pytest.raises(ValueError, match="head must be one of"):
        fsdp_linear_divergence(hidden, student, hidden, hidden, head="sharded")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fsdp_linear_divergence(hidden, student, hidden, hidden, reduction="none")
    with pytest.raises(ValueError, match="process_group is not an option"):
        fsdp_linear_divergence(hidden, student, hidden, hidden, process_group=None)
    with pytest.raises(ValueError, match="takes a model sharded by fully_shard_causal_lm"):
        final_hidden_states(student, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="init_process_group"):
        fully_shard_causal_lm(student)
