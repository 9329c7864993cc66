"""The verdict registry: each claim of the papers with the paper's words, our protocol, the measurement, the rule
and its thresholds (named constants below), and the verdict the rule gives on the results.

A :class:`Claim` splits the verdict in two: ``measure`` reads the numbers the rule needs from the results, and
``decide`` maps those numbers to a verdict. ``decide`` sees nothing else, so every rule can be shown (in
tests/science/test_science_rules.py) on one input where it passes and one where it fails.

Verdicts: **reproduced** (the claimed direction holds beyond the noise margin), **reversed** (the opposite holds
beyond it), **not reproduced** (neither; the reason says what was seen), **uninformative here** (this setup cannot
test the claim: a premise of the comparison does not hold; the reason says which).

Noise margins:

* accuracies: the main runs are trained over several seeds and compared on the same held-out problems. The
  standard error of a difference of two methods' mean accuracies adds in quadrature the problem-sampling error
  (per problem, on the seed-averaged correctness: :func:`measure.paired_difference`) and the training noise (the
  seed variance of each method's mean accuracy; a run with one seed borrows the pooled seed variance of the
  multi-seed runs). A difference counts when it exceeds :data:`Z` standard errors;
* per-token statistics (KL, overlap) averaged over seeds: a difference counts when it exceeds both
  :data:`RELATIVE_MARGIN` of the larger value and :data:`Z` standard errors over seeds; overlap ratios move by
  more than :data:`RATIO_MARGIN` absolute;
* the weight geometry comes from one run per method: two values are ordered only when they differ by more than
  :data:`RELATIVE_MARGIN` relative.

History of the rules (every change after seeing a result, and why):

* round 1, after the first full run: the geometry rules were given the 10% relative margin and the subspace-lock
  rule the difference-of-differences test, because orderings were decided by differences of a few percent (stable
  rank 5.47 vs 5.73) and the lock cost OPD and SFT about the same. Both changes made verdicts stricter.
* round 2 (issue 32, a review of round 1's design; fixed before the round-2 full run, the quick runs having only
  checked that the code runs): the rules were rewritten where the review found that the setup, not the method,
  decided them. The overlap rows use k = 2 of the 32-token vocabulary (round 1: k = 4, whose top-4 held nearly
  all the mass), are judged against the failing run at the same step, and the mass row is marked uninformative
  when the student's top-k still holds ≥ :data:`TOPK_SATURATION` of its mass. The principal-weight rule measures
  the overlap's excess over random as a fraction of the largest excess the update's density allows (round 1's
  ratio was confined to about [0.89, 1.11] at 10% sparsity and could not pass a 10% rule). Sim_K and the lock
  use K = 2, below the updates' stable rank. The geometry rows follow the paper's protocol (SFT base →
  checkpoint; OPD and RLVR from it at lr 1e-6); RLVR is GRPO-style; seeds enter the accuracy margins. New rows:
  the OPD-success paper's second condition, the normalised spectral shift and the geometry paper's three
  controls.
* round 2, worked traces (issue 32's last item, before any full run on them): completions became step-by-step
  traces of about 34 tokens (round 1's averaged 6), with a newly pretrained base and teachers. No rule or threshold
  changed; the drift row's protocol text now describes the traces, and the overlap row's vocabulary is 33 tokens
  (the traces' comma).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .measure import mean_and_standard_error, paired_difference, paired_interaction

# ------------------------------------------------------------------------------------------------ thresholds
Z = 2.0  # standard errors a difference must exceed
RELATIVE_MARGIN = 0.10  # two per-token statistics or geometry values are ordered when they differ by more than this
RATIO_MARGIN = 0.02  # overlap ratios (|I|/k) move when they change by more than this, absolute
OVERLAP_MASS_CLAIM = 0.97  # the papers' 97–99% overlap mass
TOPK_SATURATION = 0.97  # a student top-k holding this much of its mass makes the 97% overlap mass near-automatic
PRINCIPAL_MARGIN = 0.10  # normalised principal-mask excesses (in [−1, 1]) are ordered beyond this
SIM_K_HIGH = 0.5  # "already high": Sim_K at the first checkpoint at least this
RANK_TOLERANCE = 0.15  # a stable-rank trajectory is "kept" when every checkpoint is within this of OPD's, relative
RECOVERY_MARGIN = 0.20  # gap-recovery rates are ordered when they differ by more than this, absolute
TOKEN_RATIO = 4.0  # OPSD's claimed token efficiency, the low end of v1's 4–8×
THRESHOLDS = dict(
    Z=Z,
    RELATIVE_MARGIN=RELATIVE_MARGIN,
    RATIO_MARGIN=RATIO_MARGIN,
    OVERLAP_MASS_CLAIM=OVERLAP_MASS_CLAIM,
    TOPK_SATURATION=TOPK_SATURATION,
    PRINCIPAL_MARGIN=PRINCIPAL_MARGIN,
    SIM_K_HIGH=SIM_K_HIGH,
    RANK_TOLERANCE=RANK_TOLERANCE,
    RECOVERY_MARGIN=RECOVERY_MARGIN,
    TOKEN_RATIO=TOKEN_RATIO,
)

SUCCESS = "reproduced"
FAIL = "not reproduced"
REVERSED = "reversed"
UNINFORMATIVE = "uninformative here"
VERDICTS = (SUCCESS, FAIL, REVERSED, UNINFORMATIVE)
WITHIN_NOISE = f"the accuracy difference is within {Z:g} standard errors"

GEOMETRY_PAPER = "Shen et al., On the Geometry of OPD (arXiv:2606.07082)"
RETHINKING = "Li et al., Rethinking OPD (arXiv:2604.13016)"
OPSD_PAPER = "Zhao et al., OPSD (arXiv:2601.18734)"
MAIN = ("sft", "opd", "rlvr", "opsd", "offpolicy_sd")


# ---------------------------------------------------------------------------------------------- reading data
class _Data:
    """Read access to the results of :func:`pipeline.run`: per run, a list of seeds."""

    def __init__(self, data: dict):
        self.runs = data["runs"]
        self.reference = data["reference_correct"]
        self.settings = data["settings"]
        variances = [
            mean_and_standard_error(self.seed_accuracies(name))[1] ** 2 * len(self.seeds(name))
            for name in self.runs
            if len(self.seeds(name)) > 1 and "final_correct" in self.seeds(name)[0]
        ]
        # the pooled per-seed variance of a run's accuracy (training noise), for runs trained on one seed
        self.pooled_seed_variance = sum(variances) / len(variances) if variances else 0.0

    def seeds(self, name: str) -> list[dict]:
        return self.runs[name]["seeds"]

    def seed_accuracies(self, name: str) -> list[float]:
        if name in self.reference:
            return [sum(self.reference[name]) / len(self.reference[name])]
        return [sum(s["final_correct"]) / len(s["final_correct"]) for s in self.seeds(name)]

    def per_problem(self, name: str) -> list[float]:
        """Correctness per held-out problem, averaged over seeds."""
        if name in self.reference:
            return [float(c) for c in self.reference[name]]
        rows = [s["final_correct"] for s in self.seeds(name)]
        return [sum(column) / len(rows) for column in zip(*rows)]

    def acc(self, name: str) -> float:
        return sum(self.seed_accuracies(name)) / len(self.seed_accuracies(name))

    def seed_variance_of_mean(self, name: str) -> float:
        """Training noise in ``name``'s mean accuracy: 0 for the base and the teachers (not trained here)."""
        if name in self.reference:
            return 0.0
        _, se = mean_and_standard_error(self.seed_accuracies(name))
        return self.pooled_seed_variance if se is None else se**2

    def compare(self, a: str, b: str) -> dict:
        """mean acc(a) − mean acc(b) with its standard error over problems and seeds."""
        problems = paired_difference(self.per_problem(a), self.per_problem(b))
        seed_se = math.sqrt(self.seed_variance_of_mean(a) + self.seed_variance_of_mean(b))
        return {
            "difference": problems["difference"],
            "standard_error": math.hypot(problems["standard_error"], seed_se),
            "problem_se": problems["standard_error"],
            "seed_se": seed_se,
            "seeds": [len(self.seed_accuracies(a)), len(self.seed_accuracies(b))],
        }

    def contrast(self, a1: str, a0: str, b1: str, b0: str) -> dict:
        """(acc a1 − acc a0) − (acc b1 − acc b0) with its standard error over problems and seeds."""
        names = (a1, a0, b1, b0)
        problems = paired_interaction(*(self.per_problem(n) for n in names))
        seed_se = math.sqrt(sum(self.seed_variance_of_mean(n) for n in names))
        return {"difference": problems["difference"], "standard_error": math.hypot(problems["standard_error"], seed_se)}

    def stat(self, name: str, read: Callable[[dict], float]) -> list:
        """[mean, standard error over seeds (None for one seed)] of ``read(seed result)``."""
        return list(mean_and_standard_error([read(s) for s in self.seeds(name)]))

    def geometry(self, name: str) -> dict:
        return self.seeds(name)[0]["geometry"]["overall"]

    def trajectory(self, name: str, key: str) -> list[float]:
        return [t[key] for t in self.seeds(name)[0]["geometry"]["trajectory"]]

    def gap_recovery(self, run: str, before: str, teacher: str) -> float | None:
        """(acc_after − acc_before) / (acc_teacher − acc_before), the paper's gap recovery rate."""
        gap = self.acc(teacher) - self.acc(before)
        return None if gap <= 0 else (self.acc(run) - self.acc(before)) / gap

    def mean_curve(self, name: str) -> list[dict]:
        """The accuracy curve averaged over seeds (steps and token counts too)."""
        curves = [s["accuracy_curve"] for s in self.seeds(name)]
        return [
            {key: sum(p[key] for p in points) / len(points) for key in ("step", "tokens", "accuracy")}
            for points in zip(*curves)
        ]


# ------------------------------------------------------------------------------------------------- helpers
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pm(value: list, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """'mean ± se' from [mean, se] (se None: the mean alone)."""
    mean, se = value
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * se:.{digits}f}" if se is not None else "") + unit


def _acc_pm(d: _Data, name: str) -> str:
    mean, se = mean_and_standard_error(d.seed_accuracies(name))
    return _pct(mean) + (f" ± {100 * se:.1f}" if se is not None else "")


def _diff(c: dict) -> str:
    return f"{100 * c['difference']:+.1f} ± {100 * c['standard_error']:.1f} pts"


def _sign(c: dict) -> int:
    """+1 / −1 when a difference {difference, standard_error} exceeds Z standard errors, else 0."""
    margin = Z * c["standard_error"]
    return 1 if c["difference"] > margin else -1 if c["difference"] < -margin else 0


def _relative(a: float, b: float, se: float = 0.0) -> int:
    """+1 if a > b by more than RELATIVE_MARGIN of the larger and Z·se, −1 if smaller, 0 otherwise."""
    margin = max(RELATIVE_MARGIN * max(abs(a), abs(b)), Z * se)
    if abs(a - b) <= margin:
        return 0
    return 1 if a > b else -1


def _se(*values: list) -> float:
    """The standard error of a difference of seed means [mean, se] (missing se: 0)."""
    return math.sqrt(sum((v[1] or 0.0) ** 2 for v in values))


def _verdict(sign: int, tie: str, opposite: str) -> tuple[str, str | None]:
    """(verdict, reason) for a comparison whose claimed direction is sign = +1."""
    return (SUCCESS, None) if sign == 1 else (REVERSED, opposite) if sign == -1 else (FAIL, tie)


def _ordering(values: dict[str, float], order: tuple[str, str, str]) -> tuple[str, str | None]:
    """Verdict for values[order[0]] < values[order[1]] < values[order[2]], each step beyond RELATIVE_MARGIN."""
    low, mid, high = (values[name] for name in order)
    order = tuple(name.upper() for name in order)
    first, second = _relative(mid, low), _relative(high, mid)
    if first == 1 and second == 1:
        return SUCCESS, None
    if first == -1 and second == -1:
        return REVERSED, f"the measured order is the opposite: {order[2]} < {order[1]} < {order[0]}"
    broken = [
        f"{a} < {b} " + ("is reversed" if sign == -1 else f"is within {RELATIVE_MARGIN:.0%}")
        for sign, a, b in ((first, *order[:2]), (second, *order[1:]))
        if sign != 1
    ]
    return FAIL, "; ".join(broken)


def principal_excess(overlap: float, density: float, alpha: float) -> float:
    """The principal-mask overlap's excess over random, as a fraction of the largest excess the density allows.

    With a fraction ``density`` of entries changed (M_upd) and the principal mask holding ``alpha`` of all entries,
    Overlap = |M_princ ∩ M_upd| / |M_upd| lies in [max(0, (α + d − 1)/d), min(1, α/d)], and random placement gives
    α. Returns (o − α)/(o_max − α) above α and (o − α)/(α − o_min) below it: +1 when every changed entry is
    principal (as far as possible), −1 when none is, 0 at random, at any density. (Round 1's o/α is confined to
    [1 − (1−α)(1−d)/(αd)…] ≈ [0.89, 1.11] at d = 0.9, so a 10% rule on it could not pass.)
    """
    if density <= 0:
        return 0.0
    high, low = min(1.0, alpha / density), max(0.0, (alpha + density - 1) / density)
    if overlap >= alpha:
        return 0.0 if high <= alpha else (overlap - alpha) / (high - alpha)
    return 0.0 if alpha <= low else (overlap - alpha) / (alpha - low)


def trajectory_deviation(reference: list[float], other: list[float]) -> float:
    """max_t |a_t − b_t| / max(a_t, b_t) over the checkpoints: how far a stable-rank trajectory departs."""
    return max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(reference, other))


def _tokens_to_reach(curve: list[dict], target: float) -> float | None:
    return next((point["tokens"] for point in curve if point["accuracy"] >= target and point["step"] > 0), None)


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Claim:
    """One row: what the paper says, how we test it, and the rule. ``measure(d)`` returns the numbers (with an
    "ours" text for the table); ``decide(numbers)`` returns (verdict, reason)."""

    id: str
    group: str
    claim: str
    source: str
    paper: str
    protocol: str
    rule: str
    thresholds: tuple[str, ...]
    measure: Callable[[_Data], dict]
    decide: Callable[[dict], tuple[str, str | None]]


def _accuracy_rule(tie: str, opposite: str) -> Callable[[dict], tuple[str, str | None]]:
    return lambda m: _verdict(_sign(m["difference"]), tie, opposite)


ACCURACY_RULE = "reproduced if the difference exceeds Z standard errors (problems and seeds); reversed if below −Z"


# OPD vs SFT ------------------------------------------------------------------------------------------------
def _measure_opd_vs_sft(d: _Data) -> dict:
    c = d.compare("opd", "sft")
    return {
        "difference": c,
        "ours": f"OPD {_acc_pm(d, 'opd')} vs SFT {_acc_pm(d, 'sft')} ({_diff(c)}); base {_pct(d.acc('base'))}",
    }


def _measure_own_kl(d: _Data) -> dict:
    kl = {name: d.stat(name, lambda s: s["visited_states"][-1]["reverse_kl"]) for name in ("opd", "sft")}
    return {
        "opd": kl["opd"],
        "sft": kl["sft"],
        "ours": f"reverse KL per token on own rollouts: OPD {_pm(kl['opd'])} vs SFT {_pm(kl['sft'])} nats",
    }


def _decide_own_kl(m: dict) -> tuple[str, str | None]:
    sign = _relative(m["sft"][0], m["opd"][0], _se(m["sft"], m["opd"]))
    return _verdict(
        sign,
        f"the two KLs are within {RELATIVE_MARGIN:.0%} (or {Z:g} standard errors) of each other",
        "the SFT student is closer to the teacher",
    )


def _measure_drift(d: _Data) -> dict:
    out = {}
    for name in ("sft", "opd"):
        own = d.stat(name, lambda s: s["visited_states"][-1]["reverse_kl"])
        teacher = d.stat(name, lambda s: s["final_on_teacher_samples"]["reverse_kl"])
        out[name] = {"own": own, "teacher": teacher}
    finetune = d.settings["finetune"]
    tokens = d.stat("sft", lambda s: s["completion_tokens"] / (finetune["steps"] * finetune["batch"]))
    gap = {name: out[name]["own"][0] - out[name]["teacher"][0] for name in out}
    out["ours"] = (
        f"KL on own rollouts − on teacher samples: SFT {gap['sft']:+.3f}, OPD {gap['opd']:+.3f} nats "
        f"(SFT {_pm(out['sft']['own'])} vs {_pm(out['sft']['teacher'])}); completions of "
        f"{tokens[0]:.1f} tokens on average"
    )
    return out


def _decide_drift(m: dict) -> tuple[str, str | None]:
    sft, opd = m["sft"], m["opd"]
    drifts = _relative(sft["own"][0], sft["teacher"][0], _se(sft["own"], sft["teacher"]))
    smaller = (opd["own"][0] - opd["teacher"][0]) < (sft["own"][0] - sft["teacher"][0])
    if drifts == 1 and smaller:
        return SUCCESS, None
    if drifts == -1:
        return REVERSED, "the SFT student is closer to the teacher on its own rollouts than on teacher samples"
    if drifts == 0:
        return FAIL, (
            f"the SFT student's KL on its own rollouts is within {RELATIVE_MARGIN:.0%} (or {Z:g} standard errors) "
            "of its KL on teacher samples"
        )
    return FAIL, "OPD's own-vs-teacher-sample gap is not smaller than SFT's"


# top-k overlap ---------------------------------------------------------------------------------------------
def _measure_overlap_mass(d: _Data) -> dict:
    k, vocab = d.settings["finetune"]["overlap_k"], d.settings["vocab_size"]
    mass = lambda name, i: d.stat(name, lambda s: s["visited_states"][i]["overlap_mass_student_nonempty"])  # noqa: E731
    m = {
        "opd_success": _sign(d.compare("opd", "base")),
        "failing_success": _sign(d.compare("opd_incompatible", "base")),
        "topk_mass_step0": d.stat("opd", lambda s: s["visited_states"][0]["topk_mass_student"])[0],
        "opd_mass": mass("opd", -1)[0],
        "failing_mass": mass("opd_incompatible", -1)[0],
    }
    m["ours"] = (
        f"k = {k} of {vocab} tokens, at the end of training (step {d.seeds('opd')[0]['visited_states'][-1]['step']}):"
        f" OPD {_pm(mass('opd', -1), 100, 1, '%')} vs the failing (incompatible-teacher) run "
        f"{_pct(m['failing_mass'])} (student mass over tokens with a non-empty intersection); OPD at step 0 "
        f"{_pct(mass('opd', 0)[0])}; the student's top-{k} holds {_pct(m['topk_mass_step0'])} of its mass at step 0"
    )
    return m


def _decide_overlap_mass(m: dict) -> tuple[str, str | None]:
    if m["opd_success"] != 1:
        return FAIL, "the OPD run did not improve significantly over the base, so it is not a successful run"
    if m["topk_mass_step0"] >= TOPK_SATURATION:
        return UNINFORMATIVE, (
            f"the student's top-k already holds {_pct(m['topk_mass_step0'])} of its mass at step 0: any intersecting "
            "top-k sets share about that much"
        )
    if m["failing_success"] == 1:
        return UNINFORMATIVE, "the incompatible-teacher run improved over the base too: no failing run to judge against"
    opd_high, failing_high = m["opd_mass"] >= OVERLAP_MASS_CLAIM, m["failing_mass"] >= OVERLAP_MASS_CLAIM
    if opd_high and not failing_high:
        return SUCCESS, None
    if opd_high:
        return UNINFORMATIVE, (
            f"the failing run reaches {_pct(m['failing_mass'])} at the same step: the 97% level does not separate a "
            "successful run from a failing one here"
        )
    if failing_high:
        return REVERSED, "the failing run has the ≥ 97% overlap mass and the successful one has not"
    return FAIL, f"OPD's overlap mass at the end is {_pct(m['opd_mass'])}, below 97%"


def _measure_overlap_rises(d: _Data) -> dict:
    ratio = lambda name, i: d.stat(name, lambda s: s["visited_states"][i]["overlap_ratio_all"])[0]  # noqa: E731
    m = {
        "opd": [ratio("opd", 0), ratio("opd", -1)],
        "failing": [ratio("opd_incompatible", 0), ratio("opd_incompatible", -1)],
    }
    m["ours"] = (
        f"overlap ratio, step 0 → end: OPD {_pct(m['opd'][0])} → {_pct(m['opd'][1])}; failing run "
        f"{_pct(m['failing'][0])} → {_pct(m['failing'][1])}"
    )
    return m


def _decide_overlap_rises(m: dict) -> tuple[str, str | None]:
    rise = m["opd"][1] - m["opd"][0]
    if rise < -RATIO_MARGIN:
        return REVERSED, "OPD's overlap ratio fell"
    if rise <= RATIO_MARGIN:
        return FAIL, f"OPD's overlap ratio moved by less than {RATIO_MARGIN}"
    if m["opd"][1] - m["failing"][1] <= RATIO_MARGIN:
        return FAIL, "the failing run ends with as high an overlap ratio (within 0.02): the rise does not mark success"
    return SUCCESS, None


# thinking patterns -----------------------------------------------------------------------------------------
def _measure_incompatible(d: _Data) -> dict:
    start = {
        "opd": d.stat("opd", lambda s: s["visited_states"][0]["overlap_ratio_all"])[0],
        "incompatible": d.stat("opd_incompatible", lambda s: s["visited_states"][0]["overlap_ratio_all"])[0],
    }
    c, teachers = d.compare("opd_incompatible", "opd"), d.compare("incompatible_teacher", "teacher")
    recovery = {
        "compatible": d.gap_recovery("opd", "base", "teacher"),
        "incompatible": d.gap_recovery("opd_incompatible", "base", "incompatible_teacher"),
    }
    return {
        "difference": c,
        "teachers": teachers,
        "initial_ratio": start,
        "ours": f"teachers {_pct(d.acc('teacher'))} vs {_pct(d.acc('incompatible_teacher'))}; initial overlap ratio "
        f"{_pct(start['opd'])} vs {_pct(start['incompatible'])}; final {_acc_pm(d, 'opd')} vs "
        f"{_pct(d.acc('opd_incompatible'))} ({_diff(c)}); gap recovery {_pct(recovery['compatible'])} vs "
        f"{_pct(recovery['incompatible'])}",
    }


def _decide_incompatible(m: dict) -> tuple[str, str | None]:
    if _sign(m["teachers"]) == -1:
        return UNINFORMATIVE, "the incompatible teacher is significantly less accurate: the teachers are not similar"
    sign = _sign(m["difference"])
    lower_start = m["initial_ratio"]["incompatible"] < m["initial_ratio"]["opd"] - RATIO_MARGIN
    if sign == -1 and lower_start:
        return SUCCESS, None
    if sign == 1:
        return REVERSED, "OPD from the incompatible teacher ends more accurate than from the compatible one"
    return FAIL, WITHIN_NOISE if sign == 0 else "the incompatible teacher does not start with a lower overlap"


def _measure_remedy(run: str) -> Callable[[_Data], dict]:
    def measure(d: _Data) -> dict:
        c = d.compare(run, "opd_incompatible")
        early, without = d.seeds(run)[0]["visited_states"][1], d.seeds("opd_incompatible")[0]["visited_states"][1]
        return {
            "difference": c,
            "ours": f"{_pct(d.acc(run))} vs {_pct(d.acc('opd_incompatible'))} without ({_diff(c)}); overlap ratio at "
            f"the first checkpoint (step {early['step']}) {_pct(early['overlap_ratio_all'])} vs "
            f"{_pct(without['overlap_ratio_all'])}",
        }

    return measure


def _measure_new_capability(d: _Data) -> dict:
    recovery = {
        "new": d.gap_recovery("opd", "base", "teacher"),
        "same_data": d.gap_recovery("opd_same_data", "base", "same_data_teacher"),
    }
    return {
        "recovery": recovery,
        "new_gap": d.compare("teacher", "base"),
        "same_data_gap": d.compare("same_data_teacher", "base"),
        "ours": f"teacher trained on the task {_pct(d.acc('teacher'))}, teacher pretrained longer on the base's own "
        f"corpus {_pct(d.acc('same_data_teacher'))}, base {_pct(d.acc('base'))}; OPD from them "
        f"{_acc_pm(d, 'opd')} and {_pct(d.acc('opd_same_data'))}; gap recovery {_pct(recovery['new'])} vs "
        f"{_pct(recovery['same_data'])}",
    }


def _decide_new_capability(m: dict) -> tuple[str, str | None]:
    if _sign(m["new_gap"]) != 1 or _sign(m["same_data_gap"]) != 1:
        return UNINFORMATIVE, "a teacher is not significantly more accurate than the base: no gap to recover"
    new, same = m["recovery"]["new"], m["recovery"]["same_data"]
    if new - same > RECOVERY_MARGIN:
        return SUCCESS, None
    if same - new > RECOVERY_MARGIN:
        return REVERSED, "OPD recovers more of the same-data teacher's gap"
    return FAIL, f"the gap-recovery rates differ by less than {RECOVERY_MARGIN:.2f}"


# update geometry (the paper's protocol) --------------------------------------------------------------------
def _geometry_values(d: _Data, key: str) -> dict[str, float]:
    """``key`` for SFT (base → SFT checkpoint) and OPD, RLVR (SFT checkpoint → their end, at lr 1e-6)."""
    return {"sft": d.geometry("sft")[key], "opd": d.geometry("opd_geo")[key], "rlvr": d.geometry("rlvr_geo")[key]}


def _measure_ordering(key: str, label: str, fmt: Callable[[float], str]) -> Callable[[_Data], dict]:
    def measure(d: _Data) -> dict:
        values = _geometry_values(d, key)
        return {"values": values, "ours": f"{label}: " + ", ".join(f"{n.upper()} {fmt(v)}" for n, v in values.items())}

    return measure


def _decide_ordering(order: tuple[str, str, str]) -> Callable[[dict], tuple[str, str | None]]:
    return lambda m: _ordering(m["values"], order)


def _measure_principal(d: _Data) -> dict:
    alpha = d.seeds("sft")[0]["geometry"]["settings"].get("alpha", 0.5)
    overlap, sparsity = _geometry_values(d, "principal_mask_overlap"), _geometry_values(d, "update_sparsity")
    # no overlap where no entry changed visibly (an empty M_upd)
    excess = {n: None if o is None else principal_excess(o, 1 - sparsity[n], alpha) for n, o in overlap.items()}
    return {
        "excess": excess,
        "ours": "principal-mask overlap (random α = "
        f"{alpha:g}) and its excess over random / the largest the density allows: "
        + ", ".join(
            f"{n.upper()} n/a (no visible change)" if o is None else f"{n.upper()} {o:.3f} ({excess[n]:+.3f})"
            for n, o in overlap.items()
        ),
    }


def _decide_principal(m: dict) -> tuple[str, str | None]:
    e = m["excess"]
    if e["sft"] is None or e["opd"] is None:
        return FAIL, "an update without any bf16-visible change has no principal-mask overlap"
    if e["sft"] - e["opd"] > PRINCIPAL_MARGIN and e["opd"] < 0:
        return SUCCESS, None
    if e["opd"] - e["sft"] > PRINCIPAL_MARGIN:
        return REVERSED, "OPD's updates hit principal weights more often than SFT's"
    if e["sft"] - e["opd"] > PRINCIPAL_MARGIN:
        return FAIL, "OPD's updates hit principal weights less often than SFT's, but not below the random baseline"
    return FAIL, f"OPD's and SFT's normalised excesses are within {PRINCIPAL_MARGIN}"


def _measure_stable_rank(d: _Data) -> dict:
    trajectories = {"sft": d.trajectory("sft", "stable_rank"), "opd": d.trajectory("opd_geo", "stable_rank")}
    trajectories["rlvr"] = d.trajectory("rlvr_geo", "stable_rank")
    return {
        "trajectories": trajectories,
        "ours": "stable rank of ΔW over the checkpoints: "
        + "; ".join(f"{n.upper()} " + " → ".join(f"{v:.2f}" for v in vals) for n, vals in trajectories.items()),
    }


def _decide_stable_rank(m: dict) -> tuple[str, str | None]:
    t = m["trajectories"]
    sft_grows = _relative(t["sft"][-1], t["sft"][0]) == 1
    lower = _relative(t["sft"][-1], t["opd"][-1])
    if lower == 1 and sft_grows:
        return SUCCESS, None
    if lower == -1:
        return REVERSED, f"OPD's update ends with a higher stable rank than SFT's (by more than {RELATIVE_MARGIN:.0%})"
    return FAIL, (
        f"OPD's and SFT's final stable ranks are within {RELATIVE_MARGIN:.0%}" if lower == 0 else "SFT's does not grow"
    )


def _measure_locking(d: _Data) -> dict:
    sims = {"sft": d.geometry("sft")["sim_k"], "opd": d.geometry("opd_geo")["sim_k"]}
    sims["rlvr"] = d.geometry("rlvr_geo")["sim_k"]
    k, n = d.settings["sim_k"], d.settings["base"]["hidden"]
    first = {name: values[0] for name, values in sims.items()}
    return {
        "first": first,
        "ours": f"Sim_{k}(first checkpoint, end): "
        + ", ".join(f"{name.upper()} {'n/a' if v is None else f'{v:.2f}'}" for name, v in first.items())
        + f"; random ≈ K/n = {k}/{n} = {k / n:.3f}",
    }


def _decide_locking(m: dict) -> tuple[str, str | None]:
    opd, sft = m["first"]["opd"], m["first"]["sft"]
    if opd is None or sft is None:
        return FAIL, "Sim_K is undefined (an update without K directions)"
    sign = _relative(opd, sft)
    if sign == 1 and opd >= SIM_K_HIGH:
        return SUCCESS, None
    if sign == -1:
        return REVERSED, f"SFT's update locks in earlier than OPD's (by more than {RELATIVE_MARGIN:.0%})"
    if opd >= SIM_K_HIGH:
        return FAIL, f"OPD's update locks in early, but SFT's as early (within {RELATIVE_MARGIN:.0%}): not OPD's own"
    return FAIL, f"OPD's Sim_K at the first checkpoint is below {SIM_K_HIGH}"


def _measure_lock(d: _Data) -> dict:
    opd, sft = d.compare("opd_lock", "opd"), d.compare("sft_lock", "sft")
    contrast = d.contrast("sft_lock", "sft", "opd_lock", "opd")
    return {
        "opd": opd,
        "sft": sft,
        "sft_minus_opd": contrast,
        "ours": f"locked − free: OPD {_diff(opd)} ({_pct(d.acc('opd_lock'))}), SFT {_diff(sft)} "
        f"({_pct(d.acc('sft_lock'))}); SFT's cost − OPD's {_diff(contrast)}",
    }


def _decide_lock(m: dict) -> tuple[str, str | None]:
    opd_sign, contrast = _sign(m["opd"]), _sign(m["sft_minus_opd"])
    if opd_sign >= 0 and contrast == -1:
        return SUCCESS, None
    if contrast == 1:
        return REVERSED, "the lock costs OPD significantly more than SFT"
    if opd_sign == -1 and contrast == -1:
        return FAIL, "the lock costs OPD significantly"
    return FAIL, f"the lock's cost to SFT and to OPD differ by less than {Z:g} standard errors"


def _measure_control(run: str) -> Callable[[_Data], dict]:
    def measure(d: _Data) -> dict:
        opd, control = d.trajectory("opd_geo", "stable_rank"), d.trajectory(run, "stable_rank")
        norm = d.geometry(run)["frobenius_norm"] / max(d.geometry("opd_geo")["frobenius_norm"], 1e-30)
        return {
            "opd": opd,
            "control": control,
            "ours": "stable rank over the checkpoints: OPD "
            + " → ".join(f"{v:.2f}" for v in opd)
            + "; control "
            + " → ".join(f"{v:.2f}" for v in control)
            + f" (largest departure {trajectory_deviation(opd, control):.0%}; ‖ΔW‖_F {norm:.2f}× OPD's)",
        }

    return measure


def _decide_keeps(m: dict) -> tuple[str, str | None]:
    deviation = trajectory_deviation(m["opd"], m["control"])
    if deviation <= RANK_TOLERANCE:
        return SUCCESS, None
    return FAIL, f"the stable-rank trajectory departs from OPD's by {deviation:.0%} (> {RANK_TOLERANCE:.0%})"


def _decide_changes(m: dict) -> tuple[str, str | None]:
    deviation = trajectory_deviation(m["opd"], m["control"])
    if deviation > RANK_TOLERANCE:
        return SUCCESS, None
    return FAIL, f"the stable-rank trajectory stays within {RANK_TOLERANCE:.0%} of OPD's ({deviation:.0%})"


# self-distillation -----------------------------------------------------------------------------------------
def _measure_opsd_offpolicy(d: _Data) -> dict:
    c = d.compare("opsd", "offpolicy_sd")
    return {
        "difference": c,
        "ours": f"OPSD {_acc_pm(d, 'opsd')} vs off-policy {_acc_pm(d, 'offpolicy_sd')} ({_diff(c)}); privileged "
        f"teacher {_pct(d.acc('base_with_answer_in_context'))}, base {_pct(d.acc('base'))}",
    }


def _measure_token_efficiency(d: _Data) -> dict:
    opsd, rlvr = d.mean_curve("opsd"), d.mean_curve("rlvr")
    target = d.acc("base") + 0.5 * (d.acc("opsd") - d.acc("base"))
    m = {
        "opsd_gain": _sign(d.compare("opsd", "base")),
        "target": target,
        "opsd_tokens": _tokens_to_reach(opsd, target),
        "rlvr_tokens": _tokens_to_reach(rlvr, target),
        "rlvr_budget": rlvr[-1]["tokens"],
    }
    rlvr_text = f"not reached in {m['rlvr_budget']:,.0f}" if m["rlvr_tokens"] is None else f"{m['rlvr_tokens']:,.0f}"
    m["ours"] = (
        f"seed-mean curves, tokens to half of OPSD's gain ({_pct(target)}): OPSD "
        + ("not reached" if m["opsd_tokens"] is None else f"{m['opsd_tokens']:,.0f}")
        + f", GRPO {rlvr_text}"
    )
    return m


def _decide_token_efficiency(m: dict) -> tuple[str, str | None]:
    if m["opsd_gain"] != 1 or not m["opsd_tokens"]:
        return FAIL, "OPSD did not improve significantly over the base"
    bound = m["rlvr_tokens"] is None
    ratio = (m["rlvr_budget"] if bound else m["rlvr_tokens"]) / m["opsd_tokens"]
    if ratio >= TOKEN_RATIO:
        return SUCCESS, None
    if ratio > 1:
        bound_text = "at least " if bound else ""
        return FAIL, f"OPSD is more token-efficient, by {bound_text}{ratio:.1f}×, not {TOKEN_RATIO:g}×"
    return REVERSED, "GRPO reached the target with fewer tokens"


def _measure_opsd_rlvr(d: _Data) -> dict:
    c, base = d.compare("opsd", "rlvr"), d.compare("opsd", "base")
    return {
        "vs_rlvr": c,
        "vs_base": base,
        "ours": f"base {_pct(d.acc('base'))}, GRPO {_acc_pm(d, 'rlvr')}, OPSD {_acc_pm(d, 'opsd')} "
        f"(OPSD − GRPO {_diff(c)}; OPSD − base {_diff(base)})",
    }


def _decide_opsd_rlvr(m: dict) -> tuple[str, str | None]:
    vs_rlvr, vs_base = _sign(m["vs_rlvr"]), _sign(m["vs_base"])
    if vs_rlvr == 1 and vs_base == 1:
        return SUCCESS, None
    if vs_rlvr == -1:
        return REVERSED, "GRPO ends significantly more accurate than OPSD"
    return FAIL, WITHIN_NOISE if vs_rlvr == 0 else "OPSD does not end significantly above the base"


GEOMETRY_PROTOCOL = (
    "the paper's protocol: SFT's ΔW from the base to its checkpoint (SFT run, seed 0); OPD and RLVR (GRPO) from "
    "that checkpoint at lr 1e-6, the paper's rate (both models initialised at std 0.02), measured bf16-aware"
)
ACCURACY_PROTOCOL = "from the same base, same steps × rollouts; held-out greedy accuracy on the same problems"

REGISTRY: tuple[Claim, ...] = (
    Claim(
        "opd_beats_sft",
        "OPD vs SFT",
        "OPD beats SFT on teacher samples at an equal token budget (held-out accuracy)",
        "Thinking Machines, On-policy distillation (2025), via secondary summaries",
        "Qwen3-8B-Base, 32B teacher: SFT ~60% vs OPD ~70% AIME'24",
        f"SFT on teacher samples vs OPD (full-vocabulary reverse KL), seeds of each; {ACCURACY_PROTOCOL}",
        ACCURACY_RULE,
        ("Z",),
        _measure_opd_vs_sft,
        _accuracy_rule(WITHIN_NOISE, "SFT ends significantly more accurate than OPD"),
    ),
    Claim(
        "opd_own_distribution",
        "OPD vs SFT",
        "On the student's own rollouts, the OPD student is closer to the teacher than the SFT student",
        "GKD (Agarwal et al., 2024); the premise of every OPD paper",
        "qualitative",
        "reverse KL(student ‖ teacher) per token at the final students' own sampled rollouts, mean over seeds",
        "reproduced if SFT's KL exceeds OPD's by more than RELATIVE_MARGIN of the larger and Z standard errors",
        ("RELATIVE_MARGIN", "Z"),
        _measure_own_kl,
        _decide_own_kl,
    ),
    Claim(
        "sft_drift",
        "OPD vs SFT",
        "Off-policy training drifts: the SFT student matches the teacher on teacher-written prefixes better than on "
        "its own; OPD removes that gap",
        "GKD (Agarwal et al., 2024): train/inference mismatch of off-policy distillation",
        "qualitative",
        "the final students' KL on their own rollouts vs on the teacher's samples of the same prompts; completions "
        "are worked traces (34 tokens on average, 64 at most) whose every step is written from the one before, so "
        "an early off-policy error is carried into the rest",
        "reproduced if SFT's KL on its own rollouts exceeds its KL on teacher samples (RELATIVE_MARGIN and Z "
        "standard errors) and OPD's own-minus-teacher gap is smaller than SFT's",
        ("RELATIVE_MARGIN", "Z"),
        _measure_drift,
        _decide_drift,
    ),
    Claim(
        "overlap_mass",
        "top-k overlap",
        "In successful OPD runs the student's and teacher's top-k sets share 97–99% of the probability mass at "
        "student-visited states",
        RETHINKING,
        "97–99% (k = 16 of ~152k tokens; averaged over positions with a non-empty intersection)",
        "the student's overlap mass at its own rollouts at the end of OPD and of the failing (incompatible-teacher) "
        "run, at the same step; k = 2 of the 33-token vocabulary",
        "uninformative if the student's top-k holds ≥ TOPK_SATURATION of its mass at step 0 or the failing run "
        "improved too; reproduced if OPD (above the base by Z standard errors) ends ≥ OVERLAP_MASS_CLAIM and the "
        "failing run below it; uninformative if both reach it",
        ("TOPK_SATURATION", "OVERLAP_MASS_CLAIM", "Z"),
        _measure_overlap_mass,
        _decide_overlap_mass,
    ),
    Claim(
        "overlap_rises",
        "top-k overlap",
        "The overlap rises during a successful OPD run (and stalls in a failing one)",
        RETHINKING,
        "overlap ratio ~72% → >91% (JustRL-1.5B ← R1-Distill-1.5B); in the failing run it stalls",
        "overlap ratio |I|/k at step 0 and at the end, OPD vs the failing (incompatible-teacher) run",
        "reproduced if OPD's ratio rises by more than RATIO_MARGIN and ends more than RATIO_MARGIN above the "
        "failing run's at the same step; reversed if it falls",
        ("RATIO_MARGIN",),
        _measure_overlap_rises,
        _decide_overlap_rises,
    ),
    Claim(
        "incompatible_fails",
        "thinking patterns",
        "OPD from a teacher with an incompatible thinking pattern (similar accuracy) starts with a lower overlap and "
        "recovers less of the gap",
        RETHINKING,
        "Qwen3-1.7B-Base: a GRPO'd 4B teacher distills better than Qwen3-4B non-thinking with similar scores",
        "OPD from an always-thinking teacher vs from the direct-answer teacher, from the same base",
        "uninformative if the incompatible teacher is less accurate beyond Z standard errors; reproduced if the "
        "incompatible run ends lower beyond Z standard errors and starts with an overlap ratio lower by RATIO_MARGIN",
        ("Z", "RATIO_MARGIN"),
        _measure_incompatible,
        _decide_incompatible,
    ),
    Claim(
        "cold_start_recovers",
        "thinking patterns",
        "An off-policy cold start (SFT on the teacher's samples first) recovers OPD from an incompatible teacher",
        RETHINKING,
        "higher initial overlap, more stable training, higher ceiling (Qwen3-1.7B SFT'd on Qwen3-4B samples)",
        "the first 20% of the steps SFT on format-filtered samples of the incompatible teacher, then OPD; same "
        "prompts and evaluation as the run without",
        ACCURACY_RULE,
        ("Z",),
        _measure_remedy("opd_incompatible_cold_start"),
        _accuracy_rule(WITHIN_NOISE, "it ends significantly less accurate than OPD without the remedy"),
    ),
    Claim(
        "aligned_prompts_recover",
        "thinking patterns",
        "Teacher-aligned prompt selection recovers OPD from an incompatible teacher",
        RETHINKING,
        "reuse the teacher's post-training prompts: better accuracy and higher overlap mass",
        "data.select_pool: of a pool of 4 batches of prompts, train on the half with the highest teacher–student "
        "overlap mass on a probe rollout; evaluated on the same held-out prompts as the run without",
        ACCURACY_RULE,
        ("Z",),
        _measure_remedy("opd_incompatible_aligned"),
        _accuracy_rule(WITHIN_NOISE, "it ends significantly less accurate than OPD without the remedy"),
    ),
    Claim(
        "new_capability",
        "thinking patterns",
        "OPD succeeds when the teacher brings capabilities the student has not seen (the second condition)",
        RETHINKING,
        "gap recovery 58.6% from Qwen3-4B-NT-RL-Math vs 15.6% from Qwen3-4B (NT)",
        "OPD from the task teacher vs from a teacher that is the base pretrained longer on its own corpus (stronger "
        "by more of the same data only)",
        "uninformative unless both teachers beat the base beyond Z standard errors; reproduced if the task "
        "teacher's gap recovery exceeds the same-data teacher's by RECOVERY_MARGIN",
        ("Z", "RECOVERY_MARGIN"),
        _measure_new_capability,
        _decide_new_capability,
    ),
    Claim(
        "sparsity",
        "update geometry",
        "bf16-visible update sparsity of OPD lies between SFT's and RLVR's",
        GEOMETRY_PAPER,
        "SFT 8.1%, OPD 51.6%, RLVR 77.2%",
        GEOMETRY_PROTOCOL,
        "reproduced if SFT < OPD < RLVR, each step by more than RELATIVE_MARGIN relative; reversed if the opposite",
        ("RELATIVE_MARGIN",),
        _measure_ordering("update_sparsity", "bf16 update sparsity", _pct),
        _decide_ordering(("sft", "opd", "rlvr")),
    ),
    Claim(
        "principal_weights",
        "update geometry",
        "OPD's updates hit principal weights less often than SFT's, below the random baseline",
        GEOMETRY_PAPER,
        "principal-mask overlap falls SFT > OPD > RLVR; OPD and RLVR below the random baseline",
        GEOMETRY_PROTOCOL + "; principal mask: top α of the rank-(width/64) reconstruction of W₀",
        "the overlap's excess over random as a fraction of the largest the density allows (in [−1, 1]); "
        "reproduced if SFT's exceeds OPD's by PRINCIPAL_MARGIN and OPD's is below 0",
        ("PRINCIPAL_MARGIN",),
        _measure_principal,
        _decide_principal,
    ),
    Claim(
        "principal_angles",
        "update geometry",
        "OPD rotates the top singular subspaces little: less than SFT, more than RLVR",
        GEOMETRY_PAPER,
        "SFT >10°, OPD ≈1°, RLVR <0.5°",
        GEOMETRY_PROTOCOL + "; principal angles of the top width/8 singular subspaces",
        "reproduced if RLVR < OPD < SFT, each step by more than RELATIVE_MARGIN relative",
        ("RELATIVE_MARGIN",),
        _measure_ordering("principal_angle_mean_deg", "mean principal angle", lambda v: f"{v:.4f}°"),
        _decide_ordering(("rlvr", "opd", "sft")),
    ),
    Claim(
        "spectral_shift",
        "update geometry",
        "OPD shifts the singular spectrum less than SFT and more than RLVR (normalised spectral shift)",
        GEOMETRY_PAPER,
        "NSS ~1e-3 (SFT), ~1e-4 (OPD), ~1e-5 (RLVR)",
        GEOMETRY_PROTOCOL + "; NSS = ‖σ(W₊) − σ(W₀)‖ / ‖σ(W₀)‖",
        "reproduced if RLVR < OPD < SFT, each step by more than RELATIVE_MARGIN relative",
        ("RELATIVE_MARGIN",),
        _measure_ordering("nss", "NSS", lambda v: f"{v:.2e}"),
        _decide_ordering(("rlvr", "opd", "sft")),
    ),
    Claim(
        "stable_rank",
        "update geometry",
        "OPD's cumulative update has a low stable rank in a narrow band, while SFT's expands",
        GEOMETRY_PAPER,
        "OPD low and flat, SFT expanding, RLVR contracting (figure; no single number)",
        GEOMETRY_PROTOCOL + "; stable rank of the cumulative ΔW at each checkpoint",
        "reproduced if SFT's final stable rank exceeds OPD's and its first by more than RELATIVE_MARGIN",
        ("RELATIVE_MARGIN",),
        _measure_stable_rank,
        _decide_stable_rank,
    ),
    Claim(
        "subspace_locking",
        "subspace locking",
        "OPD's cumulative update locks early into its final subspace (subspace emergence Sim_K at 20% of training)",
        GEOMETRY_PAPER,
        "Sim_16 already high at the first checkpoint (step 63 of 299); random ≈ K/n = 16/4096",
        GEOMETRY_PROTOCOL + "; K = 2, below the updates' stable rank (K = 16 at width 128 spans nearly all of it)",
        "reproduced if OPD's Sim_K at the first checkpoint is ≥ SIM_K_HIGH and exceeds SFT's by RELATIVE_MARGIN",
        ("SIM_K_HIGH", "RELATIVE_MARGIN"),
        _measure_locking,
        _decide_locking,
    ),
    Claim(
        "lock_keeps_opd",
        "subspace locking",
        "Projecting later updates onto the rank-r subspace captured at 20% keeps OPD's gains but hurts SFT",
        GEOMETRY_PAPER,
        "rank 16: OPD essentially unchanged, SFT degraded",
        "OPD and SFT runs locked to rank 2 after 20% of the steps vs the free runs (accuracy regime)",
        "reproduced if the lock does not cost OPD beyond Z standard errors and (SFT locked − SFT) − (OPD locked − "
        "OPD) is below −Z standard errors; reversed if above +Z",
        ("Z",),
        _measure_lock,
        _decide_lock,
    ),
    Claim(
        "sparse_tokens_keep_rank",
        "geometry controls",
        "Sparsifying OPD's update tokens keeps its stable-rank trajectory (the lock is not a token-count effect)",
        GEOMETRY_PAPER,
        "ρ ∈ {0.25, 0.5}, top-KL or random: the stable-rank trajectory is preserved; only the scale changes",
        GEOMETRY_PROTOCOL + "; OPD on the top-divergence half of each batch's tokens",
        "reproduced if every checkpoint's stable rank is within RANK_TOLERANCE of OPD's",
        ("RANK_TOLERANCE",),
        _measure_control("opd_geo_sparse"),
        _decide_keeps,
    ),
    Claim(
        "offpolicy_keeps_rank",
        "geometry controls",
        "OPD's loss on off-policy (teacher) rollouts keeps the stable-rank trajectory",
        GEOMETRY_PAPER,
        "rollouts from the 32B teacher: stable rank preserved, update norm somewhat larger",
        GEOMETRY_PROTOCOL + "; OPD's reverse KL on the teacher's samples",
        "reproduced if every checkpoint's stable rank is within RANK_TOLERANCE of OPD's",
        ("RANK_TOLERANCE",),
        _measure_control("opd_geo_offpolicy"),
        _decide_keeps,
    ),
    Claim(
        "rlvr_mix_changes_rank",
        "geometry controls",
        "Mixing in the RLVR objective (small α) moves the trajectory off OPD's: the lock is objective-sensitive",
        GEOMETRY_PAPER,
        "A = α·A_OPD + (1 − α)·A_RLVR, raw signals: OPD-dominant mixes keep the trajectory; small α leaves it",
        GEOMETRY_PROTOCOL + "; sampled-token OPD mixed with the 0/1 reward, α = 0.05",
        "reproduced if some checkpoint's stable rank departs from OPD's by more than RANK_TOLERANCE",
        ("RANK_TOLERANCE",),
        _measure_control("opd_geo_rlvr_mix"),
        _decide_changes,
    ),
    Claim(
        "opsd_beats_offpolicy",
        "self-distillation",
        "OPSD beats off-policy distillation from the same privileged teacher",
        OPSD_PAPER,
        "qualitative",
        "OPSD (JSD β = 0.5, the answer in the frozen teacher's context) vs the same loss on the teacher's samples; "
        + ACCURACY_PROTOCOL,
        ACCURACY_RULE,
        ("Z",),
        _measure_opsd_offpolicy,
        _accuracy_rule(WITHIN_NOISE, "off-policy distillation ends significantly more accurate"),
    ),
    Claim(
        "opsd_token_efficiency",
        "self-distillation",
        "OPSD is far more token-efficient than GRPO-style RL",
        OPSD_PAPER,
        "4–8× fewer tokens (v1), 8–12× (v2)",
        "completion tokens to reach half of OPSD's final gain, on the seed-mean accuracy curves; GRPO with 4 "
        "samples per prompt",
        "reproduced if OPSD gained (Z standard errors) and GRPO needs ≥ TOKEN_RATIO× its tokens (or never gets there "
        "within ≥ TOKEN_RATIO× them); reversed if GRPO needs fewer",
        ("TOKEN_RATIO", "Z"),
        _measure_token_efficiency,
        _decide_token_efficiency,
    ),
    Claim(
        "opsd_beats_rlvr",
        "self-distillation",
        "At the same budget OPSD ends above GRPO-style RL and the base",
        OPSD_PAPER,
        "Qwen3-8B: base 50.0, GRPO 51.3, OPSD 52.2 (v1, avg of 4 benchmarks)",
        f"OPSD vs GRPO (4 samples per prompt, group-normalised 0/1 reward); {ACCURACY_PROTOCOL}",
        "reproduced if OPSD − GRPO and OPSD − base both exceed Z standard errors; reversed if GRPO is above",
        ("Z",),
        _measure_opsd_rlvr,
        _decide_opsd_rlvr,
    ),
)


def evaluate(data: dict) -> list[dict]:
    """Every claim of the registry: its text, the rule and thresholds, our numbers and the verdict."""
    d = _Data(data)
    out = []
    for claim in REGISTRY:
        numbers = claim.measure(d)
        verdict, reason = claim.decide(numbers)
        out.append(
            {
                "id": claim.id,
                "group": claim.group,
                "claim": claim.claim,
                "source": claim.source,
                "paper": claim.paper,
                "protocol": claim.protocol,
                "rule": claim.rule,
                "thresholds": {name: THRESHOLDS[name] for name in claim.thresholds},
                "ours": numbers.pop("ours"),
                "verdict": verdict,
                "reason": reason,
                "numbers": numbers,
            }
        )
    return out
