"""The README's drop-in example runs with real transformers models loaded from local directories."""

import importlib.util
from pathlib import Path

import torch

from opd_fast import linear_reverse_kl, linear_token_logprobs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "drop_in_training_loop.py"


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
