"""science/run.py: the quick run produces every measurement, the report and a verdict for every claim of
the registry, on settings where the teacher is stronger than the base (the rules themselves:
tests/science/test_science_rules.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "science"))
# the script's subprocesses import this checkout's opd_fast, whatever (or wherever) the installed one is
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

from opd_science import claims, models, report  # noqa: E402
from opd_science.corpus import (  # noqa: E402
    MAX_COMPLETION_TOKENS,
    Problem,
    SkillTask,
    draw_problem,
    final_answer,
    mean_reference_tokens,
    render,
    trace,
)
from opd_science.measure import paired_difference, paired_interaction  # noqa: E402
from opd_science.pipeline import PRESETS  # noqa: E402
from opd_science.runs import RUNS  # noqa: E402

# .ci/run's slow step runs this file's slow tests: python -m pytest -m "slow and ci_slow"
pytestmark = pytest.mark.ci_slow

VISITED_KEYS = (
    "overlap_ratio_all",
    "overlap_mass_student_all",
    "overlap_mass_teacher_all",
    "nonempty_fraction",
    "overlap_mass_student_nonempty",
    "overlap_mass_teacher_nonempty",
    "topk_mass_student",
    "reverse_kl",
    "entropy_student",
    "entropy_teacher",
    "entropy_gap",
)
GEOMETRY_KEYS = (
    "update_sparsity",
    "principal_mask_overlap_ratio",
    "principal_angle_mean_deg",
    "principal_angle_max_deg",
    "nss",
    "stable_rank",
    "frobenius_norm",
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# The tests that read the quick run (about 95 s alone on 2 cores): outside README's quick tier (-m "not slow"), run
# by .ci/run as its own step.
QUICK_RUN = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("science")
    command = [sys.executable, str(REPO / "science" / "run.py"), "--quick", "--no-progress"]
    paths = ["--out", str(root / "out"), "--cache", str(root / "cache"), "--docs", str(root / "docs")]
    done = subprocess.run([*command, *paths], capture_output=True, text=True, timeout=900, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, done.stdout


def _check_geometry(run, geometry: dict, checkpoints: int) -> None:
    overall = geometry["overall"]
    assert len(overall["sim_k"]) == checkpoints and len(geometry["trajectory"]) == checkpoints
    assert geometry["command"].startswith("opd-fast diagnose ")
    if run.group > 1 and overall["frobenius_norm"] == 0:
        # GRPO in a few quick steps from a weak base: every group scored alike, no advantage, no update at all
        assert overall["update_sparsity"] == 1.0 and overall["principal_mask_overlap"] is None
        return
    for key in GEOMETRY_KEYS:
        assert _number(overall[key]), (run.name, key, overall[key])


@QUICK_RUN
def test_quick_run_measures_everything(quick):
    root, _ = quick
    data = report.from_json(json.loads((root / "docs" / "results.json").read_text()))
    preset = PRESETS["quick"]
    spec = preset.finetune
    assert set(data["runs"]) == {run.name for run in RUNS}
    for name, correct in data["reference_correct"].items():
        assert len(correct) == preset.final_eval_size, name
    # the quick settings give a teacher stronger than the base, so the verdicts past "no gap" run
    accuracy = {name: sum(c) / len(c) for name, c in data["reference_correct"].items()}
    assert accuracy["teacher"] > accuracy["base"]
    for run in RUNS:
        seeds = data["runs"][run.name]["seeds"]
        assert [s["seed"] for s in seeds] == list(range(preset.seeds if run.seeded else 1)), run.name
        for seed in seeds:
            assert seed["completion_tokens"] > 0
            if run.regime == "geometry":
                # from the SFT anchor, at the geometry learning rate: the update geometry only
                assert "final_correct" not in seed
                _check_geometry(run, seed["geometry"], spec.checkpoints)
                assert "/anchor-" in seed["geometry"]["command"].split()[2], run.name
                continue
            assert len(seed["final_correct"]) == preset.final_eval_size, run.name
            steps = [point["step"] for point in seed["accuracy_curve"]]
            assert steps == list(range(0, spec.steps + 1, spec.eval_every)), run.name
            every = spec.steps // spec.checkpoints
            assert [v["step"] for v in seed["visited_states"]] == list(range(0, spec.steps + 1, every)), run.name
            for stats in [*seed["visited_states"], seed["final_on_teacher_samples"]]:
                assert stats["tokens"] > 0
                for key in VISITED_KEYS:
                    assert _number(stats[key]), (run.name, key, stats[key])
                assert 0 <= stats["overlap_mass_student_all"] <= stats["overlap_mass_student_nonempty"] <= 1 + 1e-6
                # per token the intersection's mass is at most the student's top-k mass; so are their means
                assert stats["overlap_mass_student_all"] <= stats["topk_mass_student"] + 1e-6 <= 1 + 2e-6
                assert any(v is not None for v in stats["reverse_kl_by_position"])
            _check_geometry(run, seed["geometry"], spec.checkpoints)
            assert run.group > 1 or seed["geometry"]["overall"]["sim_k"][-1] == pytest.approx(1.0)


@QUICK_RUN
def test_quick_run_reports_every_claim(quick):
    root, stdout = quick
    data = json.loads((root / "docs" / "results.json").read_text())
    assert [claim["id"] for claim in data["claims"]] == [claim.id for claim in claims.REGISTRY]
    for claim in data["claims"]:
        assert claim["verdict"] in claims.VERDICTS, claim
        assert claim["ours"] and claim["paper"] and claim["source"] and claim["protocol"] and claim["rule"]
        assert claim["thresholds"] and all(claims.THRESHOLDS[k] == v for k, v in claim["thresholds"].items())
        # a claim that does not reproduce says why
        assert claim["verdict"] == claims.SUCCESS or claim["reason"], claim["id"]
    table = (root / "docs" / "claims.md").read_text()
    assert table.count("\n| ") >= len(data["claims"]) + len(data["runs"]) + len(claims.THRESHOLDS)
    assert report.table(report.from_json(data)) in stdout
    for name in ("accuracy_vs_tokens", "thinking_patterns", "overlap", "drift", "geometry", "subspace_lock"):
        assert (root / "docs" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@QUICK_RUN
def test_report_only_reproduces_the_table(quick):
    root, _ = quick
    command = [sys.executable, str(REPO / "science" / "run.py"), "--report-only", "--out", str(root / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    table = report.table(report.from_json(json.loads((root / "docs" / "results.json").read_text())))
    assert done.stdout.startswith(table) and table in (root / "docs" / "claims.md").read_text()


def test_paired_difference():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(1 / 5)
    # discordant pairs: 2 for a, 1 for b → variance (3/25) − (1/5)²/5
    assert d["standard_error"] == pytest.approx(math.sqrt(3 / 25 - 0.04 / 5))
    assert paired_difference(a, a) == {"difference": 0.0, "standard_error": 0.0, "n": 5}
    # seed-averaged correctness: the same formula on fractions, (mean(d²) − mean(d)²)/n
    d = paired_difference([1.0, 0.5, 0.0], [0.5, 0.5, 0.5])
    assert d["difference"] == pytest.approx(0.0) and d["standard_error"] == pytest.approx(math.sqrt(0.5 / 3 / 3))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference(a, b[:3])
    # (a1 − a0) − (b1 − b0) per problem: [0, 1, −1, 0, 1] → mean 0.2
    contrast = paired_interaction(a, b, b, b)
    assert contrast["difference"] == pytest.approx(0.2)
    assert contrast["standard_error"] == pytest.approx(math.sqrt((2 * 0.2**2 + 2 * 0.8**2 + 1.2**2) / 5 / 5))


def test_styles_share_problems_and_answers():
    import random

    problem = draw_problem(random.Random(0), "A")
    direct, think, hinted = (render(problem, style) for style in ("direct", "think", "hinted"))
    assert direct.prompt.endswith("=") and think.prompt.endswith("?") and hinted.prompt.startswith(problem.answer + "|")
    assert final_answer(think.answer) == final_answer(direct.answer) == problem.answer
    task = SkillTask("think")
    assert [e.prompt[:-1] for e in task.eval_set(9)] == [e.prompt[:-1] for e in SkillTask("direct").eval_set(9)]
    assert task.verify(task.eval_set(1)[0], final_answer(task.eval_set(1)[0].answer))


def test_traces_are_long_chains_in_two_patterns():
    """Completions are worked traces: about 34 tokens on average (issue 32 asks for ≥ 30), each step written from the
    one before, in the direct pattern and the incompatible teacher's think pattern (the same steps worded the other
    way), checked on the answer after the last ``>``."""
    import itertools
    import random

    cases = {
        Problem("R", "cabd", "dbac"): ("d,db,dba,dbac>dbac", "c,ac,bac,dbac>dbac"),
        Problem("S", "cabd", "abcd"): ("a,ab,abc,abcd>abcd", "c,ac,abc,abcd>abcd"),
        Problem("A", "275+348", "326"): ("5+8+0=31,7+4+1=21,2+3+1=60>326", "0+8+5=13,1+4+7=12,1+3+2=06>326"),
        Problem("A", "5+999", "4001"): ("5+9+0=41,0+9+1=01,0+9+1=01>4001", "0+9+5=14,1+9+0=10,1+9+0=10>4001"),
    }
    for problem, (direct, think) in cases.items():
        assert (trace(problem, "direct"), trace(problem, "think")) == (direct, think)
    assert render(Problem("R", "cabd", "dbac"), "hinted").prompt == "dbac|Rcabd="
    assert render(Problem("R", "cabd", "dbac"), "answer").answer == "dbac"
    assert mean_reference_tokens("direct") >= 30 and mean_reference_tokens("think") == mean_reference_tokens("direct")
    rng = random.Random(1)
    lengths = []
    for _ in range(300):
        problem = draw_problem(rng, rng.choice("RSA"))
        for pattern in ("direct", "think"):
            text = trace(problem, pattern)
            assert final_answer(text) == problem.answer and len(text) + 1 <= MAX_COMPLETION_TOKENS
            steps = text.rsplit(">", 1)[0].split(",")
            if problem.skill != "A":
                # a chain: each step is the one before with one letter more (an early error is carried to the end)
                assert steps[-1] == problem.answer and all(len(b) == len(a) + 1 for a, b in itertools.pairwise(steps))
                if pattern == "direct":
                    assert all(b.startswith(a) for a, b in itertools.pairwise(steps))
            else:
                # each column's carry in is the previous column's carry out
                carries = [(s[4], s[7]) if pattern == "direct" else (s[0], s[6]) for s in steps]
                assert carries[0][0] == "0"
                assert all(c_in == c_out for (_, c_out), (c_in, _) in itertools.pairwise(carries))
        lengths.append(len(trace(problem, "direct")) + 1)
    assert max(lengths) <= MAX_COMPLETION_TOKENS and sum(lengths) / len(lengths) >= 30
    # the two patterns disagree on the first token of most steps (the incompatible teacher's wording)
    direct, think = trace(Problem("R", "cabd", "dbac"), "direct"), trace(Problem("R", "cabd", "dbac"), "think")
    assert [s[0] for s in direct.split(">")[0].split(",")] != [s[0] for s in think.split(">")[0].split(",")]
    # OPSD's tasks carry the bare answer for the privileged context; the others the whole trace
    opsd = next(run for run in RUNS if run.name == "opsd").task.eval_set(3)
    assert [e.answer for e in opsd] == [final_answer(e.answer) for e in SkillTask("direct").eval_set(3)]


def test_base_cache_key_names_the_corpus(monkeypatch):
    """A base pretrained on another corpus (round 1's bare answers) is never reused: the key names the corpus."""
    spec = PRESETS["full"].base
    key = models.base_cache_key(spec)
    monkeypatch.setattr(models, "CORPUS_VERSION", "answers-0")
    assert models.base_cache_key(spec) != key


def test_full_preset_configs_are_valid(tmp_path):
    """Every run of the full preset builds a valid trainer configuration (the full run is too long for CI)."""
    from opd_science.runs import run_config

    spec = PRESETS["full"].finetune
    teachers = {name: tmp_path / name for name in ("teacher", "incompatible_teacher", "same_data_teacher")}
    for run in RUNS:
        config = run_config(run, spec, tmp_path / "base", teachers, tmp_path / run.name, seed=2)
        geometry = run.regime == "geometry"
        steps = spec.geometry_steps if geometry else spec.steps
        assert config.train.steps == steps and config.optim.lr == (spec.geometry_lr if geometry else spec.lr)
        assert config.train.save_every * spec.checkpoints == steps, run.name
        assert config.teacher.self_distill == (run.teacher == "self"), run.name
        assert config.seed == 2 and config.rollout.batch_size % run.group == 0, run.name
        assert (config.data.select_pool is not None) == (run.name == "opd_incompatible_aligned"), run.name
