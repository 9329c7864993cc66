"""One rank of the tensor-parallel head test (tests/integrations/test_heads.py): the lm_head's weight and bias are
DTensor shards (vocabulary rows over the ranks), as under tensor parallelism or FSDP2; LMHead.from_model gathers them
and must reproduce the model's logits and, through the gather's backward, its gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from worker_exit import exit_without_finalizing

from opd_fast import LMHead
from opd_fast.integrations.transformers import final_hidden_states


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import head_models
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, input_ids, attention_mask = head_models.build("PhiForCausalLM")
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        assert isinstance(model.lm_head.weight, DTensor) and isinstance(model.lm_head.bias, DTensor)
        params = [model.lm_head.weight, model.lm_head.bias]

        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
        expected_grads = torch.autograd.grad((expected * probe).sum(), params)

        head = LMHead.from_model(model)
        logits = head.logits(final_hidden_states(model, input_ids, attention_mask))
        grads = torch.autograd.grad((logits * probe).sum(), params)
        result = {
            "plain": not isinstance(head.weight, DTensor) and not isinstance(head.bias, DTensor),
            "logits": logits.detach(),
            "expected": expected.detach(),
            "grads": [g.full_tensor() for g in grads],
            "expected_grads": [g.full_tensor() for g in expected_grads],
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()
