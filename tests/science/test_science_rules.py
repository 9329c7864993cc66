"""The verdict rules of science/run.py: every rule of the registry passes on one input and fails on another;
the statistics under them (seeds and problems), the principal-weight normalisation and the GRPO advantages."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from opd_fast.trainer.tasks import ReverseTask

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "science"))

from opd_science import claims
from opd_science.corpus import SkillTask
from opd_science.grpo import GroupBaselineTrainer, GroupedTask, group_advantages


def diff(difference: float, standard_error: float) -> dict:
    return {"difference": difference, "standard_error": standard_error}


ACCURACY = ({"difference": diff(0.05, 0.01)}, {"difference": diff(0.01, 0.01)})
KEEPS = ({"opd": [2.0, 2.1, 2.2], "control": [2.1, 2.1, 2.1]}, {"opd": [2.0, 2.1, 2.2], "control": [2.0, 2.6, 3.0]})

# claim id → (an input on which its rule gives "reproduced", one on which it does not)
EXAMPLES = {
    "opd_beats_sft": ACCURACY,
    "opd_own_distribution": (
        {"opd": [0.10, 0.01], "sft": [0.20, 0.01]},
        {"opd": [0.10, 0.01], "sft": [0.105, 0.01]},
    ),
    "sft_drift": (
        {"sft": {"own": [0.30, 0.01], "teacher": [0.20, 0.01]}, "opd": {"own": [0.20, 0.01], "teacher": [0.19, 0.01]}},
        {"sft": {"own": [0.21, 0.01], "teacher": [0.20, 0.01]}, "opd": {"own": [0.20, 0.01], "teacher": [0.19, 0.01]}},
    ),
    "overlap_mass": (
        {"opd_success": 1, "failing_success": -1, "topk_mass_step0": 0.90, "opd_mass": 0.98, "failing_mass": 0.90},
        {"opd_success": 1, "failing_success": -1, "topk_mass_step0": 0.90, "opd_mass": 0.93, "failing_mass": 0.90},
    ),
    "overlap_rises": (
        {"opd": [0.60, 0.80], "failing": [0.40, 0.50]},
        {"opd": [0.60, 0.61], "failing": [0.40, 0.50]},
    ),
    "incompatible_fails": (
        {
            "difference": diff(-0.2, 0.02),
            "teachers": diff(0.0, 0.01),
            "initial_ratio": {"opd": 0.7, "incompatible": 0.4},
        },
        {
            "difference": diff(-0.01, 0.02),
            "teachers": diff(0.0, 0.01),
            "initial_ratio": {"opd": 0.7, "incompatible": 0.4},
        },
    ),
    "cold_start_recovers": ACCURACY,
    "aligned_prompts_recover": ACCURACY,
    "new_capability": (
        {"recovery": {"new": 0.6, "same_data": 0.1}, "new_gap": diff(0.2, 0.01), "same_data_gap": diff(0.1, 0.01)},
        {"recovery": {"new": 0.6, "same_data": 0.5}, "new_gap": diff(0.2, 0.01), "same_data_gap": diff(0.1, 0.01)},
    ),
    "sparsity": (
        {"values": {"sft": 0.08, "opd": 0.50, "rlvr": 0.77}},
        {"values": {"sft": 0.50, "opd": 0.52, "rlvr": 0.77}},
    ),
    "principal_weights": (
        {"excess": {"sft": 0.30, "opd": -0.20, "rlvr": -0.40}},
        {"excess": {"sft": 0.00, "opd": 0.05, "rlvr": -0.40}},
    ),
    "principal_angles": (
        {"values": {"sft": 10.0, "opd": 1.0, "rlvr": 0.4}},
        {"values": {"sft": 1.0, "opd": 1.3, "rlvr": 1.0}},
    ),
    "spectral_shift": (
        {"values": {"sft": 1e-3, "opd": 1e-4, "rlvr": 1e-5}},
        {"values": {"sft": 1e-4, "opd": 1e-4, "rlvr": 1e-5}},
    ),
    "stable_rank": (
        {"trajectories": {"sft": [3.0, 5.0], "opd": [2.0, 2.0], "rlvr": [2.0, 1.5]}},
        {"trajectories": {"sft": [5.0, 5.0], "opd": [2.0, 2.0], "rlvr": [2.0, 1.5]}},
    ),
    "subspace_locking": (
        {"first": {"sft": 0.3, "opd": 0.9, "rlvr": 0.8}},
        {"first": {"sft": 0.3, "opd": 0.4, "rlvr": 0.8}},
    ),
    "lock_keeps_opd": (
        {"opd": diff(0.0, 0.01), "sft": diff(-0.1, 0.01), "sft_minus_opd": diff(-0.1, 0.02)},
        {"opd": diff(0.0, 0.01), "sft": diff(-0.01, 0.01), "sft_minus_opd": diff(-0.01, 0.02)},
    ),
    "sparse_tokens_keep_rank": KEEPS,
    "offpolicy_keeps_rank": KEEPS,
    "rlvr_mix_changes_rank": KEEPS[::-1],
    "opsd_beats_offpolicy": ACCURACY,
    "opsd_token_efficiency": (
        {"opsd_gain": 1, "target": 0.8, "opsd_tokens": 1000, "rlvr_tokens": None, "rlvr_budget": 5000},
        {"opsd_gain": 1, "target": 0.8, "opsd_tokens": 1000, "rlvr_tokens": 2000, "rlvr_budget": 5000},
    ),
    "opsd_beats_rlvr": (
        {"vs_rlvr": diff(0.05, 0.01), "vs_base": diff(0.10, 0.01)},
        {"vs_rlvr": diff(0.01, 0.01), "vs_base": diff(0.10, 0.01)},
    ),
}
CLAIMS = {claim.id: claim for claim in claims.REGISTRY}


def test_registry_is_complete():
    assert len(CLAIMS) == len(claims.REGISTRY), "claim ids are unique"
    assert set(CLAIMS) == set(EXAMPLES), "every rule is shown passing and failing below"
    for claim in claims.REGISTRY:
        assert claim.claim and claim.source and claim.paper and claim.protocol and claim.rule, claim.id
        assert claim.thresholds and set(claim.thresholds) <= set(claims.THRESHOLDS), claim.id
        # a threshold named by a claim appears in its rule text, so the table states what it decides
        for name in claim.thresholds:
            assert name in claim.rule, (claim.id, name)


@pytest.mark.parametrize("claim_id", sorted(EXAMPLES))
def test_rule_passes_and_fails(claim_id):
    passing, failing = EXAMPLES[claim_id]
    assert CLAIMS[claim_id].decide(passing) == (claims.SUCCESS, None)
    verdict, reason = CLAIMS[claim_id].decide(failing)
    assert verdict in claims.VERDICTS and verdict != claims.SUCCESS and reason, (claim_id, verdict)


def test_overlap_mass_is_uninformative_where_the_setup_decides_it():
    passing = EXAMPLES["overlap_mass"][0]
    decide = CLAIMS["overlap_mass"].decide
    # the student's top-k holds nearly all its mass: the 97% overlap mass is near-automatic
    assert decide({**passing, "topk_mass_step0": 0.99})[0] == claims.UNINFORMATIVE
    # the failing run reaches 97% as well: the level does not separate success from failure
    assert decide({**passing, "failing_mass": 0.98})[0] == claims.UNINFORMATIVE
    assert decide({**passing, "opd_success": 0})[0] == claims.FAIL
    assert decide({**passing, "opd_mass": 0.9, "failing_mass": 0.98})[0] == claims.REVERSED


def test_reversed_and_uninformative_paths():
    assert CLAIMS["opd_beats_sft"].decide({"difference": diff(-0.05, 0.01)})[0] == claims.REVERSED
    assert CLAIMS["sparsity"].decide({"values": {"sft": 0.8, "opd": 0.5, "rlvr": 0.1}})[0] == claims.REVERSED
    new = EXAMPLES["new_capability"][0]
    assert CLAIMS["new_capability"].decide({**new, "same_data_gap": diff(0.01, 0.01)})[0] == claims.UNINFORMATIVE
    incompatible = EXAMPLES["incompatible_fails"][0]
    assert (
        CLAIMS["incompatible_fails"].decide({**incompatible, "teachers": diff(-0.1, 0.01)})[0] == claims.UNINFORMATIVE
    )
    efficiency = EXAMPLES["opsd_token_efficiency"][0]
    assert CLAIMS["opsd_token_efficiency"].decide({**efficiency, "rlvr_tokens": 500})[0] == claims.REVERSED


def test_orderings_and_margins():
    assert claims._ordering({"a": 1, "b": 2, "c": 3}, ("a", "b", "c")) == (claims.SUCCESS, None)
    assert claims._ordering({"a": 3, "b": 2, "c": 1}, ("a", "b", "c"))[0] == claims.REVERSED
    verdict, reason = claims._ordering({"a": 1, "b": 3, "c": 2}, ("a", "b", "c"))
    assert verdict == claims.FAIL and reason == "B < C is reversed"
    verdict, reason = claims._ordering({"a": 1.0, "b": 1.05, "c": 2.0}, ("a", "b", "c"))
    assert verdict == claims.FAIL and reason == "A < B is within 10%"
    assert claims._relative(1.0, 0.95) == 0 and claims._relative(1.0, 0.8) == 1 and claims._relative(0.8, 1.0) == -1
    # the seeds' standard error widens the margin: 1.0 vs 0.8 is 20% apart but within 2 × 0.15
    assert claims._relative(1.0, 0.8, se=0.15) == 0


def test_principal_excess_spans_minus_one_to_one_at_any_density():
    alpha = 0.5
    for density in (0.1, 0.5, 0.9):
        high, low = min(1.0, alpha / density), max(0.0, (alpha + density - 1) / density)
        assert claims.principal_excess(high, density, alpha) == pytest.approx(1.0)
        assert claims.principal_excess(low, density, alpha) == pytest.approx(-1.0)
        assert claims.principal_excess(alpha, density, alpha) == 0.0
    # round 1's setting: 90% of entries changed confines o/α to about [0.9, 1.1], yet the excess reaches ±1
    assert claims.principal_excess(0.55, 0.9, alpha) == pytest.approx((0.55 - 0.5) / (0.5 / 0.9 - 0.5))
    assert claims.principal_excess(0.5, 1.0, alpha) == 0.0


def test_trajectory_deviation():
    assert claims.trajectory_deviation([2.0, 4.0], [2.0, 4.0]) == 0.0
    assert claims.trajectory_deviation([2.0, 4.0], [2.0, 3.0]) == pytest.approx(0.25)


def _data(runs: dict[str, list[list[bool]]], reference: dict[str, list[bool]]) -> dict:
    return {
        "runs": {name: {"seeds": [{"final_correct": c} for c in seeds]} for name, seeds in runs.items()},
        "reference_correct": reference,
        "settings": {},
    }


def test_compare_adds_problem_and_seed_errors():
    a = [[True, True, False, False], [True, False, False, False], [True, True, True, False]]  # 0.5, 0.25, 0.75
    b = [[True, False, False, False]] * 3  # 0.25 every seed
    d = claims._Data(_data({"a": a, "b": b}, {"base": [False] * 4}))
    c = d.compare("a", "b")
    per_problem = [1 - 1, 2 / 3 - 0, 1 / 3 - 0, 0 - 0]  # seed-averaged a minus b, per problem
    mean = sum(per_problem) / 4
    problem_se = math.sqrt((sum(x * x for x in per_problem) / 4 - mean**2) / 4)
    seed_se = math.sqrt(0.0625 / 3)  # a's accuracies 0.5, 0.25, 0.75: sample variance 1/16; b's 0
    assert c["difference"] == pytest.approx(0.25) and c["problem_se"] == pytest.approx(problem_se)
    assert c["seed_se"] == pytest.approx(seed_se)
    assert c["standard_error"] == pytest.approx(math.hypot(problem_se, seed_se))
    # one seed borrows the pooled seed variance of the multi-seed runs (here a's and b's: (1/16 + 0)/2)
    d = claims._Data(_data({"a": a, "b": b, "single": [a[0]]}, {"base": [False] * 4}))
    assert d.compare("single", "base")["seed_se"] == pytest.approx(math.sqrt(0.0625 / 2))


def test_group_advantages_and_grouped_task():
    assert group_advantages([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], 4) == [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    advantages = group_advantages([1.0, 0.0, 0.0, 0.0], 4)
    assert sum(advantages) == pytest.approx(0.0) and advantages[0] == pytest.approx(3 / math.sqrt(3))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 0.0], 4)
    task = GroupedTask(SkillTask("direct"), 4)
    sampled = task.sample(random.Random(0), 8)
    assert [e.prompt for e in sampled[:4]] == [sampled[0].prompt] * 4 and sampled[4].prompt == sampled[7].prompt
    assert len({id(e) for e in sampled}) == 8
    assert task.eval_set(6) == SkillTask("direct").eval_set(6)
    with pytest.raises(ValueError, match="multiple of the group size"):
        task.sample(random.Random(0), 6)


def test_group_baseline_trainer_trains_on_group_advantages(models, tmp_path):
    """One GRPO step on tiny models: the loss is −Σ_i A_i·T_i / Σ_i T_i with A_i the group-normalised reward of
    completion i and T_i its length (ρ = 1 on fresh rollouts), so the advantages reached the loss in order."""
    # a verifier that splits each group (completion length parity): the rewards vary, the advantages are not all 0
    task = GroupedTask(ReverseTask(verifier=lambda example, completion: len(completion) % 2 == 0), 3)
    config = tiny_config(models, tmp_path, "loss.mode=sampled_token", "loss.reward_mix=0.0", "train.steps=1")
    trainer = GroupBaselineTrainer(config, task=task, progress=False)
    metrics = trainer.train_step(0, diagnostics=False)
    batch = trainer._rollouts[0]
    assert [e.prompt for e in batch.examples[:3]] == [batch.examples[0].prompt] * 3
    advantages = group_advantages([float(c) for c in batch.correct], 3)
    assert any(advantages), "the verifier must split some group for this test to mean anything"
    lengths = batch.completion_mask.sum(dim=1).tolist()
    expected = -sum(a * t for a, t in zip(advantages, lengths)) / sum(lengths)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)
