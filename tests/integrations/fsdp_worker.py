"""One rank of the FSDP2 tests (tests/integrations/test_fsdp.py), run under torch.multiprocessing.

Every rank builds the same tiny Llama student (tied or untied embeddings) and teacher from a seed, shards the
student with fully_shard_causal_lm, and takes its own rows of one global batch. Per case (head mode ×
divergence): the fused loss, the backward, every parameter's full gradient (DTensor grads gathered), an
AdamW step and the loss after it. The parent compares all of it with one process that averages the ranks'
losses (data parallelism's objective).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from worker_exit import exit_without_finalizing

from opd_fast import LMHead, linear_divergence

# Both lm_heads have padded rows beyond the shared vocabulary (the losses use vocab_size=VOCAB).
VOCAB, STUDENT_ROWS, TEACHER_ROWS, HIDDEN, TEACHER_HIDDEN, WORLD = 101, 104, 107, 32, 24, 2


def build_models(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(rows: int, hidden: int, seed: int, tie: bool):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=rows,
            hidden_size=hidden,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config).float()
        with torch.no_grad():  # logits of a few units, so the distributions are far from uniform
            model.get_output_embeddings().weight.normal_(0.0, 0.6)
        return model

    student = llama(STUDENT_ROWS, HIDDEN, 0, tied)
    return student, llama(TEACHER_ROWS, TEACHER_HIDDEN, 1, False).eval().requires_grad_(False)


def batch():
    """The global batch: 4 rows of 9 tokens (rank r takes rows 2r, 2r + 1); the last row right-padded, and the
    ranks count different numbers of tokens."""
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (4, 9), generator=g)
    attention_mask = torch.ones(4, 9, dtype=torch.long)
    attention_mask[3, 6:] = 0
    mask = attention_mask.bool() & (torch.arange(9) >= 3)
    return input_ids, attention_mask, mask


def rows(rank: int):
    return slice(2 * rank, 2 * rank + 2)


def cases():
    return [(head, divergence) for head in ("gathered", "vocab_parallel") for divergence in ("reverse_kl", "jsd")]


LOSS = dict(beta=0.3, temperature=1.3, backend="torch", vocab_size=VOCAB)


def teacher_hidden(teacher, input_ids, attention_mask):
    return teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def reference(tied: bool, divergence: str) -> dict:
    """One process: the average of the ranks' losses, its gradients, an AdamW step and the losses after it."""
    student, teacher = build_models(tied)
    input_ids, attention_mask, mask = batch()
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.02)

    def losses():
        out = []
        for rank in range(WORLD):
            r = rows(rank)
            hidden = student.get_decoder()(input_ids=input_ids[r], attention_mask=attention_mask[r]).last_hidden_state
            t_hidden = teacher_hidden(teacher, input_ids[r], attention_mask[r])
            head, t_head = LMHead.from_model(student), LMHead.from_model(teacher)
            out.append(linear_divergence(hidden, head, t_hidden, t_head, mask=mask[r], divergence=divergence, **LOSS))
        return out

    first = losses()
    (sum(first) / WORLD).backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters()}
    optimizer.step()
    with torch.no_grad():
        second = losses()
    return {"losses": torch.stack(first).detach(), "grads": grads, "after_step": torch.stack(second)}


def run_case(tied: bool, head: str, divergence: str, rank: int) -> dict:
    from opd_fast.integrations.fsdp import final_hidden_states, fsdp_linear_divergence, fully_shard_causal_lm

    student, teacher = build_models(tied)
    fully_shard_causal_lm(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.02)
    input_ids, attention_mask, mask = (t[rows(rank)] for t in batch())

    def loss():
        hidden = final_hidden_states(student, input_ids, attention_mask)
        t_hidden = teacher_hidden(teacher, input_ids, attention_mask)
        t_head = LMHead.from_model(teacher)
        return fsdp_linear_divergence(
            hidden, student, t_hidden, t_head, head=head, mask=mask, divergence=divergence, **LOSS
        )

    if not tied and head == "gathered":
        try:  # the untied head is a shard outside the loss: the replicated gather of from_model is refused
            LMHead.from_model(student)
        except ValueError as exc:
            refused = "gathered_head" in str(exc)
        else:
            refused = False
        assert refused, "LMHead.from_model accepted an FSDP2 shard"
    first = loss()
    first.backward()
    grads = {}
    for name, p in student.named_parameters():
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        second = loss()
    return {"loss": first.detach(), "grads": grads, "after_step": second}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for tied in (False, True):
            for head, divergence in cases():
                results[f"{'tied' if tied else 'untied'}-{head}-{divergence}"] = run_case(tied, head, divergence, rank)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()
