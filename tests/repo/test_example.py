"""The README's drop-in example runs with real transformers models loaded from local directories."""

import importlib.util
from pathlib import Path

import pytest
import torch

from opd_fast import completion_mask, linear_reverse_kl, linear_token_logprobs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "drop_in_training_loop.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("drop_in_training_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_with_local_models(tmp_path):
    example = _load_example()
    student_path, teacher_path = example.tiny_models(str(tmp_path))
    losses = example.main(student_path, teacher_path, steps=2, batch=2, new_tokens=6)
    assert len(losses) == 2 and all(loss > 0 and torch.isfinite(torch.tensor(loss)) for loss in losses)


def test_hidden_states_and_lm_head_reproduce_the_model_logits(tmp_path):
    """The example's premise: base_model(...).last_hidden_state with lm_head.weight gives the model's own logits."""
    from transformers import AutoModelForCausalLM

    example = _load_example()
    student_path, teacher_path = example.tiny_models(str(tmp_path))
    student = AutoModelForCausalLM.from_pretrained(student_path).double()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).double()
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
        s_hidden = student.base_model(ids).last_hidden_state
        t_hidden = teacher.base_model(ids).last_hidden_state
        lps, lpt = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
        expected = (lps.exp() * (lps - lpt)).sum(-1)
        ours = linear_reverse_kl(s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, reduction="none")
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
        next_ids = ids[:, 1:]
        token_lp = linear_token_logprobs(s_hidden[:, :-1], student.lm_head.weight, next_ids)
        torch.testing.assert_close(token_lp, lps[:, :-1].gather(-1, next_ids[..., None])[..., 0])


def test_example_loss_counts_each_completion_to_its_first_eos(tmp_path):
    """The batched loss (left-padded prompts, completions padded after EOS) equals the reverse KL of every row run
    alone and unpadded, over its completion tokens up to and including the first EOS."""
    from transformers import AutoModelForCausalLM

    example = _load_example()
    student_path, teacher_path = example.tiny_models(str(tmp_path))
    student = AutoModelForCausalLM.from_pretrained(student_path).double()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).double()
    with torch.no_grad():
        student.lm_head.weight[example.EOS] *= 8  # a student that often stops early
    torch.manual_seed(0)
    prompts, prompt_mask = example.left_padded_prompts(6, 512, torch.Generator().manual_seed(3))
    with torch.no_grad():
        sequences = student.generate(
            prompts, attention_mask=prompt_mask, do_sample=True, max_new_tokens=12, pad_token_id=example.EOS
        )
    completions = sequences[:, prompts.shape[1] :]
    ends = [
        (row == example.EOS).nonzero()[0].item() + 1 if (row == example.EOS).any() else len(row) for row in completions
    ]
    assert min(ends) < completions.shape[1], "no row stopped early: the test would not see EOS padding"
    assert (prompt_mask == 0).any(), "no prompt is padded"

    per_row = []
    for row, end in enumerate(ends):
        ids = torch.cat([prompts[row][prompt_mask[row].bool()], completions[row, :end]])[None]
        with torch.no_grad():
            log_ps = student(ids).logits.log_softmax(-1)[0, -end - 1 : -1]
            log_pt = teacher(ids).logits.log_softmax(-1)[0, -end - 1 : -1]
        per_row.append((log_ps.exp() * (log_ps - log_pt)).sum(-1))
    expected = torch.cat(per_row).mean()
    loss = example.reverse_kl_loss(student, teacher, sequences, prompt_mask)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert completion_mask(sequences, prompts.shape[1], example.EOS).sum() == sum(ends)


def test_completion_mask_stops_after_the_first_eos():
    eos, pad = 2, 0
    sequences = torch.tensor(
        [
            [pad, 5, 6, 7, 2, 0, 0],  # completion 7, EOS, then padding
            [4, 5, 6, 7, 8, 9, 3],  # no EOS: the whole completion counts
            [4, 5, 6, 2, 2, 2, 2],  # EOS at once; pad == EOS afterwards
        ]
    )
    expected = torch.tensor(
        [
            [False, False, True, True, False, False],
            [False, False, True, True, True, True],
            [False, False, True, False, False, False],
        ]
    )
    assert torch.equal(completion_mask(sequences, 3, eos), expected)
    two_eos_ids = expected.clone()
    two_eos_ids[1, 5] = False  # token 9 ends row 1's completion too
    assert torch.equal(completion_mask(sequences, 3, [eos, 9]), two_eos_ids)
    assert completion_mask(sequences, 3, None)[:, 2:].all()
    with pytest.raises(ValueError, match="prompt_length=7 must leave room"):
        completion_mask(sequences, 7, eos)
