"""The OPD recipes of the trainer: each switch runs and demonstrably changes what is computed."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import TASK, grads, make_pair, rel_err, tiny_config

from opd_fast import LMHead, linear_divergence
from opd_fast.trainer import ConfigError, Trainer, run
from opd_fast.trainer.config import LOSS_MODES, DataConfig, LossConfig
from opd_fast.trainer.losses import LOSS_FUNCTIONS, compute_loss, sparsify
from opd_fast.trainer.prompts import deduplicate, select_prompts
from opd_fast.trainer.rollout import gather_positions
from opd_fast.trainer.tasks import Example

PRIVILEGED = "data.teacher_template={answer}={prompt}"


def reject_everything(example, completion) -> bool:
    """A format filter for the tests (imported by the trainer as test_recipes:reject_everything)."""
    return False


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---- on-policy self-distillation ---------------------------------------------------------------------------


def test_self_distillation_teacher_is_the_frozen_initial_student(models, tmp_path):
    config = tiny_config(models, tmp_path, "teacher.path=null", "teacher.self_distill=true", PRIVILEGED)
    trainer = Trainer(config, task=TASK, progress=False)
    initial = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train()
    assert any(not torch.equal(initial[n], p) for n, p in trainer.student.named_parameters())
    assert all(torch.equal(initial[n], p) for n, p in trainer.teacher.model.named_parameters())


def test_self_distillation_teacher_sees_the_privileged_prompt(models, tmp_path):
    config = tiny_config(models, tmp_path, "teacher.path=null", "teacher.self_distill=true", PRIVILEGED)
    trainer = Trainer(config, task=TASK, progress=False)
    (batch,) = trainer.make_rollouts(trainer._seed_step(0), "student")
    assert batch.teacher_input_ids.shape[1] > batch.input_ids.shape[1]  # the answer and '=' come first
    for ids, positions in (
        (batch.input_ids, batch.student_positions),
        (batch.teacher_input_ids, batch.teacher_positions),
    ):
        next_tokens = ids.gather(1, positions + 1)
        assert torch.equal(next_tokens[batch.completion_mask], batch.targets[batch.completion_mask])
    first = trainer.tokenizer.decode(batch.teacher_input_ids[0], skip_special_tokens=True)
    assert first.startswith(batch.examples[0].answer + "=" + batch.examples[0].prompt)


def test_self_distillation_without_privilege_starts_at_zero_divergence(models, tmp_path):
    """Same prompt, teacher = the initial student: the first step's reverse KL is exactly 0."""
    config = tiny_config(models, tmp_path, "teacher.path=null", "teacher.self_distill=true", "train.steps=1")
    trainer = Trainer(config, task=TASK, progress=False)
    assert abs(trainer.train_step(0, diagnostics=True)["loss"]) < 1e-9
    privileged = Trainer(
        tiny_config(models, tmp_path, "teacher.path=null", "teacher.self_distill=true", PRIVILEGED),
        task=TASK,
        progress=False,
    )
    assert privileged.train_step(0, diagnostics=False)["loss"] > 1e-7  # the context changes the teacher


def test_self_distillation_with_lora_disables_the_adapters_for_the_teacher(models, tmp_path):
    pytest.importorskip("peft")
    config = tiny_config(
        models,
        tmp_path,
        "teacher.path=null",
        "teacher.self_distill=true",
        PRIVILEGED,
        "lora.enabled=true",
        "lora.target_modules=[q_proj, v_proj]",
        "optim.lr=0.05",
    )
    trainer = Trainer(config, task=TASK, progress=False)
    trainer.train()
    lora_b = [p for n, p in trainer.student.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the adapters trained (they start at zero)
    (batch,) = trainer.make_rollouts(trainer._seed_step(9), "student")
    with torch.no_grad(), trainer.student.disable_adapter():
        decoder = trainer.student.get_base_model().get_decoder()
        plain = decoder(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask)
    torch.testing.assert_close(
        trainer.teacher.hidden_states(batch), gather_positions(plain.last_hidden_state, batch.teacher_positions)
    )
    with torch.no_grad():
        adapted = decoder(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask)
    assert not torch.allclose(adapted.last_hidden_state, plain.last_hidden_state)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w p + (1 − w) q)."""
    weight = torch.tensor(weight, dtype=log_p.dtype)
    return torch.logaddexp(log_p + torch.log(weight), log_q + torch.log1p(-weight))


@pytest.mark.parametrize(
    ("divergence", "beta"),
    [
        ("reverse_kl", 0.5),
        ("forward_kl", 0.5),
        ("jsd", 0.4),
        ("skew_forward_kl", 0.5),
        ("skew_reverse_kl", 0.5),
        ("tvd", 0.5),
    ],
)
@pytest.mark.parametrize("hard_label_weight", [0.0, 0.25])
def test_entry_clip_matches_autograd_on_clipped_terms(divergence, beta, hard_label_weight):
    """Per-entry clipping against autograd on the clipped terms, alone and mixed with hard labels."""
    hs, ws, ht, wt = make_pair(lead=(9,), vocab=41)
    clip, skew = 0.02, 0.3
    labels = torch.randint(0, 41, (9,))
    hard = dict(labels=labels, hard_label_weight=hard_label_weight) if hard_label_weight else {}
    kw = dict(divergence=divergence, beta=beta, skew=skew, entry_clip=clip, reduction="none")
    ours = linear_divergence(hs, ws, ht, wt, **kw, **hard)
    lps = torch.log_softmax(hs @ ws.T, dim=-1)
    lpt = torch.log_softmax((ht @ wt.T).detach(), dim=-1)
    if divergence == "reverse_kl":
        terms = lps.exp() * (lps - lpt)
    elif divergence == "forward_kl":
        terms = lpt.exp() * (lpt - lps)
    elif divergence == "tvd":
        terms = 0.5 * (lps.exp() - lpt.exp()).abs()
    elif divergence == "skew_forward_kl":
        terms = lpt.exp() * (lpt - _log_mix(lpt, lps, skew))
    elif divergence == "skew_reverse_kl":
        terms = lps.exp() * (lps - _log_mix(lps, lpt, skew))
    else:
        log_m = _log_mix(lpt, lps, beta)
        terms = beta * lpt.exp() * (lpt - log_m) + (1 - beta) * lps.exp() * (lps - log_m)
    ref = terms.clamp(max=clip).sum(-1)
    if hard_label_weight:
        cross_entropy = -lps.gather(-1, labels[:, None]).squeeze(-1)
        ref = hard_label_weight * cross_entropy + (1 - hard_label_weight) * ref
    assert (terms > clip).any()  # the clip is active
    assert rel_err(ours, ref) < 1e-12
    weights = torch.randn(9, dtype=torch.float64)
    for a, b in zip(grads(ours, (hs, ws), weights), grads(ref, (hs, ws), weights)):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("hard_label_weight", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_divergence_loss_sparse_and_dense_paths_agree(mode, hard_label_weight):
    """The one divergence call returns the mean (dense) or per-token values (sparse): keeping every token, the
    two give the same loss and gradients."""
    hs, ws, ht, wt = make_pair(lead=(2, 5), vocab=37)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    batch = SimpleNamespace(completion_mask=mask, targets=torch.randint(0, 37, (2, 5)))
    dense_cfg = LossConfig(mode=mode, beta=0.3, skew=0.2, hard_label_weight=hard_label_weight)
    sparse_cfg = dataclasses.replace(dense_cfg, token_keep=0.99)  # ⌈0.99·8⌉ = 8: every token kept
    results = [compute_loss(cfg, batch, hs, ws, ht, wt.detach(), 37) for cfg in (dense_cfg, sparse_cfg)]
    (dense, dense_metrics), (sparse, sparse_metrics) = results
    assert "tokens/kept_fraction" not in dense_metrics and sparse_metrics["tokens/kept_fraction"] == 1.0
    assert rel_err(sparse, dense) < 1e-12
    for a, b in zip(grads(sparse, (hs, ws)), grads(dense, (hs, ws))):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("mode", ["reverse_kl", "jsd", "topk", "sampled_token"])
def test_teacher_temperature_reaches_every_teacher_logit(mode):
    """loss.teacher_temperature τ_t divides the teacher's logits only: the same loss as the teacher's head scaled by
    τ/τ_t at one shared temperature τ (the divergences, the top-k support and the sampled-token reward)."""
    hs, ws, ht, wt = make_pair(lead=(2, 5), vocab=37)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    batch = SimpleNamespace(completion_mask=mask, targets=torch.randint(0, 37, (2, 5)))
    tau, tau_t = 1.5, 0.6
    own = LossConfig(mode=mode, beta=0.3, top_k=5, temperature=tau, teacher_temperature=tau_t)
    shared = dataclasses.replace(own, teacher_temperature=None)
    ours = compute_loss(own, batch, hs, LMHead(ws), ht, LMHead(wt.detach()), 37)[0]
    scaled = compute_loss(shared, batch, hs, LMHead(ws), ht, LMHead(wt.detach() * (tau / tau_t)), 37)[0]
    unscaled = compute_loss(shared, batch, hs, LMHead(ws), ht, LMHead(wt.detach()), 37)[0]
    assert rel_err(ours, scaled) < 1e-10 and rel_err(ours, unscaled) > 1e-3
    for a, b in zip(grads(ours, (hs, ws)), grads(scaled, (hs, ws))):
        assert rel_err(a, b) < 1e-8


def test_hard_label_weight_mixes_the_completion_tokens_cross_entropy():
    """loss.hard_label_weight w: the divergence modes' loss is w · CE on the completion tokens (the batch's targets,
    as loss.mode=sft takes them) + (1 − w) · the divergence, with the gradients of that mix."""
    hs, ws, ht, wt = make_pair(lead=(2, 5), vocab=37)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    batch = SimpleNamespace(completion_mask=mask, targets=torch.randint(0, 37, (2, 5)))
    heads = (hs, LMHead(ws), ht, LMHead(wt.detach()), 37)
    mixed = compute_loss(LossConfig(mode="jsd", beta=0.3, hard_label_weight=0.4), batch, *heads)[0]
    divergence = compute_loss(LossConfig(mode="jsd", beta=0.3), batch, *heads)[0]
    cross_entropy = compute_loss(LossConfig(mode="sft"), batch, *heads)[0]
    expected = 0.4 * cross_entropy + 0.6 * divergence
    assert rel_err(mixed, expected) < 1e-12
    for a, b in zip(grads(mixed, (hs, ws)), grads(expected, (hs, ws))):
        assert rel_err(a, b) < 1e-10


def test_every_loss_mode_has_a_loss_function():
    assert set(LOSS_FUNCTIONS) == set(LOSS_MODES)


def test_entry_clip_is_torch_only():
    hs, ws, ht, wt = make_pair(lead=(3,))
    with pytest.raises(ValueError, match="entry_clip is computed by the torch backend only"):
        linear_divergence(hs, ws, ht, wt, entry_clip=0.1, backend="triton")


# ---- cold start, mixing, format filter ---------------------------------------------------------------------


def test_cold_start_then_opd(models, tmp_path):
    run(tiny_config(models, tmp_path, "train.cold_start_steps=2"))
    records = [r for r in _records(tmp_path) if "loss" in r]
    assert [r.get("cold_start", 0.0) for r in records] == [1.0, 1.0, 0.0, 0.0]


def test_on_policy_fraction_mixes_teacher_batches(models, tmp_path, monkeypatch):
    sources = []
    original = Trainer.make_rollouts

    def spy(self, rng, source):
        sources.append(source)
        return original(self, rng, source)

    monkeypatch.setattr(Trainer, "make_rollouts", spy)
    run(
        tiny_config(
            models, tmp_path / "half", "rollout.on_policy_fraction=0.5", "train.steps=12", "train.save_every=12"
        )
    )
    assert set(sources) == {"student", "teacher"}
    sources.clear()
    run(tiny_config(models, tmp_path / "none", "rollout.on_policy_fraction=0.0"))
    assert sources == ["teacher"] * 4


def test_format_filter_drops_teacher_samples(models, tmp_path):
    with pytest.raises(RuntimeError, match="format_filter rejected every teacher sample"):
        run(
            tiny_config(
                models, tmp_path, "train.cold_start_steps=1", "data.format_filter=test_recipes:reject_everything"
            )
        )
    assert TASK.format_ok(Example("ab=", "ba"), "ba") and not TASK.format_ok(Example("ab=", "ba"), "b=a")


# ---- prompt selection and deduplication ---------------------------------------------------------------------


def test_teacher_aligned_prompt_selection_keeps_the_highest_overlap(models, tmp_path):
    config = tiny_config(models, tmp_path, "data.select_pool=24", "data.select_keep=0.25", "data.select_probe_tokens=4")
    trainer = Trainer(config, task=TASK, progress=False)
    assert len(trainer.task.pool) == 6
    stats = trainer.selection
    assert stats["selection/kept"] == 6 and stats["selection/mass_kept"] >= stats["selection/mass_all"]
    trainer.train()
    assert _records(tmp_path)[0]["selection/kept"] == 6


def test_near_duplicate_prompts_are_removed():
    pool = [Example("abcdefgh=", "x"), Example("abcdefgi=", "x"), Example("hgfedcba=", "x"), Example("abcdefgh=", "x")]
    assert [e.prompt for e in deduplicate(pool, 0.5)] == ["abcdefgh=", "hgfedcba="]  # 5 of 9 trigrams shared
    assert len(deduplicate(pool, 1.0)) == 3  # only exact duplicates


def test_select_prompts_keeps_the_prompts_with_the_highest_mean_overlap_mass():
    """The selection logic alone, with a probe whose per-token mass is known: each prompt's score is the mean
    over its completion tokens, and the best select_keep fraction survives, in pool order."""

    def probe(examples):
        mask = torch.tensor([[True, True, False]] * len(examples))
        mass = torch.tensor([[len(e.prompt) / 10, len(e.prompt) / 10, 5.0] for e in examples])  # 5.0: padding
        return mass, mask

    config = DataConfig(select_pool=12, select_keep=0.25)
    selected, stats = select_prompts(TASK, config, pool_size=12, seed=0, probe=probe)
    pool = TASK.sample(random.Random("0/selection"), 12)
    longest = sorted(len(e.prompt) for e in pool)[-3:]
    assert sorted(len(e.prompt) for e in selected.pool) == longest
    assert stats["selection/kept"] == 3 and stats["selection/pool"] == stats["selection/after_dedup"] == 12
    assert stats["selection/mass_kept"] == pytest.approx(sum(longest) / 30)
    assert stats["selection/mass_all"] == pytest.approx(sum(len(e.prompt) for e in pool) / 120)


# ---- token sparsification and reward mixing ----------------------------------------------------------------


def test_sparsify_keeps_the_top_fraction_or_a_random_one():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.7, 0.2, 9.0, 9.0]])
    assert torch.equal(sparsify(mask, scores, 0.6, "top_divergence"), torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]).bool())
    random_kept = sparsify(mask, scores, 0.6, "random")
    assert int(random_kept.sum()) == 3 and not (random_kept & ~mask).any()


def test_token_sparsification_in_training(models, tmp_path):
    run(tiny_config(models, tmp_path / "full"))
    run(tiny_config(models, tmp_path / "sparse", "loss.token_keep=0.5", "loss.token_select=random"))
    sparse = [r for r in _records(tmp_path / "sparse") if "loss" in r]
    assert all(0.4 <= r["tokens/kept_fraction"] <= 0.6 for r in sparse)
    full = [r["loss"] for r in _records(tmp_path / "full") if "loss" in r]
    assert [r["loss"] for r in sparse] != full


def test_reward_mixing_advantage(models, tmp_path):
    config = tiny_config(models, tmp_path, "loss.mode=sampled_token", "loss.reward_mix=0.0")
    trainer = Trainer(config, task=TASK, progress=False)
    (batch,) = trainer.make_rollouts(trainer._seed_step(0), "student")
    hs = gather_positions(trainer.forward(batch.input_ids, batch.attention_mask), batch.student_positions)
    ht = trainer.teacher.hidden_states(batch)
    rewards = torch.ones(batch.input_ids.shape[0])
    loss, metrics = compute_loss(
        config.loss,
        batch,
        hs,
        LMHead.from_model(trainer.student),
        ht,
        trainer.teacher.head(),
        trainer.vocab_size,
        None,
        rewards,
    )
    assert loss.item() == pytest.approx(-1.0)  # α = 0: advantage = reward = 1, ratio = 1 on fresh rollouts
    assert metrics["reward/mean"] == 1.0
    run(tiny_config(models, tmp_path / "mixed", "loss.mode=sampled_token", "loss.reward_mix=0.5"))
    assert all("reward/mean" in r for r in _records(tmp_path / "mixed") if "loss" in r)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["teacher.self_distill=true"], "leave teacher.path unset"),
        (["loss.mode=sampled_token", "rollout.on_policy_fraction=0.5"], "on_policy_fraction < 1 mixes in teacher"),
        (["loss.reward_mix=0.5"], "reward_mix mixes advantages: it needs loss.mode=sampled_token"),
        (["loss.mode=topk", "loss.entry_clip=0.1"], "entry_clip clips full-vocabulary divergence terms"),
        (["loss.mode=topk", "loss.hard_label_weight=0.3"], "hard_label_weight mixes the cross-entropy into"),
        (["loss.hard_label_weight=1"], r"loss.hard_label_weight must be in \[0.0, 1.0\)"),
        (["loss.mode=skew_reverse_kl", "loss.skew=1.0"], r"loss.skew must be in \[0.0, 1.0\)"),
        (["data.teacher_template={answer}"], "must contain {prompt}"),
        (["loss.token_keep=0"], r"loss.token_keep must be in \(0.0, 1.0\]"),
        (["train.cold_start_steps=9"], r"train.cold_start_steps must be in \[0, 4\]"),
    ],
)
def test_recipe_configs_are_validated(models, tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(models, tmp_path, *overrides)
