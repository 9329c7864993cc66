"""opd_fast.integrations.trl: TRL's distillation trainers with the fused loss equal the parents, in TRL's own loop.

Each comparison builds the parent trainer and the fused subclass from the same arguments on tiny local models
(tests/integrations/head_models.py: a Gemma 2 student with a final-logit softcap, a wider Cohere teacher with a logit
scale, and a Phi student whose lm_head has a bias), takes one batch the way TRL's loop makes it (``_prepare_inputs``:
on-policy generation for DistillationTrainer; the ChatML collator, then GKD's own on-policy sampling for
GKDTrainer), and runs each trainer's ``compute_loss`` and backward on that batch in fp32. The loss and every
gradient of the student (backbone and lm_head) must agree within 1e-5 relative: both compute the same exact
divergence, in different orders of summation, so only fp32 rounding separates them.

Then each fused trainer runs ``train()`` for a few steps, on and off policy, and must change the student.
"""

from __future__ import annotations

import copy
import importlib.util
import string
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err

pytest.importorskip("trl", minversion="1.16")

import head_models
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer

from opd_fast.integrations.trl import (
    FusedDistillationTrainer,
    divergence_for_trl_beta,
    trl_divergence_loss,
)
from opd_fast.trainer.demo import build_tokenizer

with warnings.catch_warnings():  # trl.experimental warns on import that its APIs are unstable
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd_fast.integrations.trl import FusedGKDTrainer

TOLERANCE = 1e-5
# 4 special tokens + 97 characters = head_models.VOCAB token ids, so the tiny models' vocabularies match exactly.
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \né"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
PROMPTS = ["reverse abc", "count to 3", "hello", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer(CHARACTERS)
    assert len(tokenizer) == head_models.VOCAB
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(name: str, seed: int, hidden: int | None = None):
    """A tiny fp32 causal LM of class ``name`` with head_models' head attributes and spread logits."""
    import transformers

    config = head_models.config(name)
    if hidden is not None:
        config.hidden_size = hidden
    torch.manual_seed(seed)
    model = getattr(transformers, head_models.ARCHITECTURES[name].class_name)(config).float()
    head_models._spread_logits(model)
    return model


# (student class, teacher class, teacher hidden size): a softcapped student with a wider scaled teacher, and a
# student whose lm_head has a bias.
PAIRS = {
    "gemma2-cohere": ("Gemma2ForCausalLM", "CohereForCausalLM", 48),
    "phi-llama": ("PhiForCausalLM", "LlamaForCausalLM", None),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    student, teacher, teacher_hidden = PAIRS[request.param]
    return tiny_model(student, seed=1), tiny_model(teacher, seed=2, hidden=teacher_hidden).eval()


def common_args(tmp_path, mixed_precision: bool) -> dict:
    """Trainer arguments; without mixed precision everything runs in fp32 (transformers 5 defaults to bf16)."""
    return dict(
        output_dir=str(tmp_path),
        bf16=mixed_precision,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )


def distillation_trainers(pair, tokenizer, tmp_path, mixed_precision=False, **config):
    student, teacher = pair
    args = DistillationConfig(**common_args(tmp_path, mixed_precision), max_completion_length=6, **config)
    dataset = Dataset.from_dict({"prompt": PROMPTS})

    def make(cls):
        return cls(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=copy.deepcopy(args),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    return make(DistillationTrainer), make(FusedDistillationTrainer)


def gkd_trainers(pair, tokenizer, tmp_path, mixed_precision=False, **config):
    student, teacher = pair
    args = GKDConfig(**common_args(tmp_path, mixed_precision), max_new_tokens=6, max_length=64, **config)
    dataset = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": p[::-1]}] for p in PROMPTS]}
    )

    def make(cls):
        with warnings.catch_warnings():  # the parent advises DistillationTrainer for fully on-policy configs
            warnings.simplefilter("ignore")
            return cls(
                model=copy.deepcopy(student),
                teacher_model=teacher,
                args=copy.deepcopy(args),
                train_dataset=dataset,
                processing_class=tokenizer,
            )

    return make(GKDTrainer), make(FusedGKDTrainer)


def loss_and_grads(trainer, inputs, num_items_in_batch=None):
    """The trainer's compute_loss on ``inputs`` and the gradient of every trainable student parameter."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same_loss_and_grads(parent, fused, inputs, num_items_in_batch=None):
    expected_loss, expected = loss_and_grads(parent, inputs, num_items_in_batch)
    actual_loss, actual = loss_and_grads(fused, inputs, num_items_in_batch)
    assert expected_loss.abs() > 1e-3, "the batch must carry a non-trivial loss for the comparison to mean anything"
    assert rel_err(actual_loss, expected_loss) <= TOLERANCE, (actual_loss.item(), expected_loss.item())
    assert actual.keys() == expected.keys() and any("lm_head" in name for name in expected)
    errors = {name: rel_err(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergence_for_trl_beta(beta):
    divergence, same_beta = divergence_for_trl_beta(beta)
    assert same_beta == beta
    assert divergence == {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")


def test_beta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        divergence_for_trl_beta(1.5)


# (TRL's β, temperature): reverse KL, forward KL with a sharpening temperature, a JSD with a flattening one.
DISTILLATION_CASES = [(1.0, 1.0), (0.0, 0.7), (0.4, 1.3)]


def test_distillation_trainer_same_loss_and_grads(pair, tokenizer, tmp_path):
    parent, fused = distillation_trainers(pair, tokenizer, tmp_path)
    parent.model.train()
    fused.model.train()
    torch.manual_seed(0)
    inputs = parent._prepare_inputs(next(iter(parent.get_train_dataloader())))
    # As if the first completion had sampled EOS at its third token: TRL pads the rest and masks it out.
    inputs["completion_ids"][0, 3:] = tokenizer.pad_token_id
    inputs["completion_mask"][0, 3:] = 0
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    assert 0 < inputs["completion_mask"].sum() < inputs["completion_mask"].numel()
    for beta, temperature in DISTILLATION_CASES:  # both trainers read self.beta and self.temperature at each loss
        for trainer in (parent, fused):
            trainer.beta, trainer.temperature = beta, temperature
            trainer.model.train()
        # In training, num_items_in_batch is the generated completions' token count carried in the batch.
        assert_same_loss_and_grads(parent, fused, inputs)
        assert_same_entropy_logged(parent, fused, "train")
        # Without it (the evaluation path), both take the mean over the completion tokens.
        parent.model.eval()
        fused.model.eval()
        assert_same_loss_and_grads(parent, fused, inputs)
        assert_same_entropy_logged(parent, fused, "eval")


def assert_same_entropy_logged(parent, fused, mode: str) -> None:
    """The student's mean entropy each trainer logged for its last loss (the parent's from its chunked pass)."""
    expected, actual = parent._metrics[mode]["entropy"][-1], fused._metrics[mode]["entropy"][-1]
    assert expected > 0.1 and abs(actual - expected) <= TOLERANCE * expected, (actual, expected)


@pytest.mark.parametrize("on_policy", [False, True], ids=["dataset", "student-samples"])
def test_gkd_trainer_same_loss_and_grads(pair, tokenizer, tmp_path, on_policy):
    # temperature != 1 is GKD's sampling temperature: its loss runs at temperature 1, and so must ours.
    parent, fused = gkd_trainers(pair, tokenizer, tmp_path, temperature=0.8)
    inputs = parent._prepare_inputs(next(iter(parent.get_train_dataloader())))
    if on_policy:  # what training_step does with probability lmbda
        torch.manual_seed(0)
        ids, attention, labels = GKDTrainer.generate_on_policy_outputs(parent.model, inputs, parent.generation_config)
        inputs = {**inputs, "input_ids": ids, "attention_mask": attention, "labels": labels}
    counted = (inputs["labels"][:, 1:] != -100).sum()
    assert counted > 0
    for beta in (0.0, 0.5, 1.0):
        parent.beta = fused.beta = beta
        assert_same_loss_and_grads(parent, fused, inputs)
        assert_same_loss_and_grads(parent, fused, inputs, num_items_in_batch=counted + 3)


def test_fully_masked_batch_is_zero_with_zero_gradients(pair):
    student, teacher = pair
    hidden = torch.randn(2, 5, student.config.hidden_size, requires_grad=True)
    teacher_hidden = torch.randn(2, 5, teacher.config.hidden_size)
    from opd_fast import LMHead

    loss = trl_divergence_loss(
        hidden,
        LMHead.from_model(student),
        teacher_hidden,
        LMHead.from_model(teacher).detach(),
        mask=torch.zeros(2, 5, dtype=torch.long),
        beta=0.5,
        temperature=1.0,
        num_items_in_batch=None,
    )
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max().item() == 0.0


def changed_parameters(before, model) -> int:
    after = dict(model.named_parameters())
    return sum(not torch.equal(before[name], after[name].detach()) for name in before)


@pytest.mark.parametrize("pair", ["gemma2-cohere"], indirect=True)
def test_fused_distillation_trainer_trains(pair, tokenizer, tmp_path):
    _, fused = distillation_trainers(pair, tokenizer, tmp_path, beta=0.5, max_steps=2)
    before = {name: p.detach().clone() for name, p in fused.model.named_parameters()}
    result = fused.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert changed_parameters(before, fused.model) == len(before)


@pytest.mark.parametrize("pair", ["gemma2-cohere"], indirect=True)
@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["off-policy", "on-policy"])
def test_fused_gkd_trainer_trains_and_evaluates(pair, tokenizer, tmp_path, lmbda):
    # Under transformers' default bf16 mixed precision: the backbones run under accelerate's autocast.
    _, fused = gkd_trainers(pair, tokenizer, tmp_path, mixed_precision=True, lmbda=lmbda, max_steps=2)
    fused.eval_dataset = fused.train_dataset
    before = {name: p.detach().clone() for name, p in fused.model.named_parameters()}
    result = fused.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert changed_parameters(before, fused.model) == len(before)
    metrics = fused.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_example_runs(tmp_path):
    """examples/trl_distillation.py trains with both fused trainers on its tiny local models."""
    path = Path(__file__).resolve().parents[2] / "examples" / "trl_distillation.py"
    spec = importlib.util.spec_from_file_location("trl_distillation_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    student, teacher = example.tiny_models(str(tmp_path))
    losses = example.main(student, teacher, str(tmp_path / "out"), steps=1)
    assert set(losses) == {"FusedDistillationTrainer", "FusedGKDTrainer"}
    assert all(len(run) == 1 and run[0] > 0 for run in losses.values())
