"""Update-geometry metrics of one weight matrix before and after training, and of a series of them.

Implements the offline diagnostics of Shen et al., "On the Geometry of On-Policy Distillation"
(arXiv:2606.07082, §3 and App. C), per 2-D weight matrix W₀ (BEFORE) → W₁ (AFTER), ΔW = W₁ − W₀, in
float64 (SVDs included, on the CPU by default as in the paper) except the sparsity, which compares bf16
values in fp32 as the paper does:

* **bf16-aware update sparsity** (App. C): both checkpoints are cast to bf16 and back; entry (i, j) is
  *unchanged* if |Ŵ₁ − Ŵ₀| ≤ η·max(|Ŵ₀|, |Ŵ₁|) (η = 1e-3); sparsity = fraction unchanged. The changed
  entries form the update mask M_upd.
* **Principal angles** (App. C): θ_i with cos θ_i = σ_i(U₀ₖᵀU₁ₖ) between the top-k left singular
  subspaces, and likewise for the right ones (V); k = 512 clipped to min(m, n). A side whose dimension
  equals k (both sides of a square matrix once k is clipped to its full rank) is the whole space there, so
  its angles are 0 by construction: they are not measured but reported as None, flagged by
  principal_angle_{left,right}_full_rank, and left out of the combined max and mean (None when both sides
  are full). Reported as max and mean in degrees. The max
  is sensitive to near-degenerate singular values at the cut (σ_k ≈ σ_{k+1}, as in random matrices, where
  a small update swaps directions across it); the mean is the steadier summary.
* **Normalized spectral shift** NSS = ‖σ(W₁) − σ(W₀)‖₂ / ‖σ(W₀)‖₂ (App. C).
* **Update–mask overlap** (App. C): Overlap(M*) = |M* ∩ M_upd| / |M_upd| for the principal mask (top-α
  entries by |·| of the rank-r reconstruction of W₀, r = 64) and the low-magnitude mask (bottom-α by
  |W₀|); the random baseline is α, so the ratio Overlap/α is > 1 where updates prefer the mask. The
  paper's App. C gives α = 0.5 (its §3.2 quotes a 30% baseline; the default follows App. C).
* **Stable rank** ‖ΔW‖_F² / ‖ΔW‖₂², **Frobenius norm** ‖ΔW‖_F, and the **Hill tail index** of the
  singular values σ₁ ≥ σ₂ ≥ … of ΔW (§3.3): α̂ = [1/(k−1) Σ_{i<k} log(σ_i/σ_k)]⁻¹. The paper does not give
  k; the default here is k = ⌈√ρ⌉ (ρ = numerical rank of ΔW, the usual √n rule of thumb for Hill's k,
  trading the estimator's bias against its variance), clipped to [2, ρ].
* **Subspace emergence** over a series W(0), …, W(T) (§3.3): Sim_K(t, T) = ‖V_K(t)ᵀ V_K(T)‖_F² / K, with
  V_K(t) the top-K right singular vectors of the cumulative update W(t) − W(0), K = 16 (clipped to
  min(m, n)). 1 when the updates live in one K-dimensional row space; ≈ K/n for unrelated updates.

Undefined cases are reported as ``None`` (JSON ``null``) and left out of averages, never as NaN: with
ΔW = 0 the stable rank, norms and NSS are 0, the angles are 0, the sparsity is 1, and the mask overlaps
(no changed entry: 0/0), the Hill index (no spectrum) and Sim_K are ``None``. The same holds for mask
overlaps whenever no entry is bf16-visibly changed, and for the Hill index with fewer than two nonzero
singular values or a flat top spectrum (σ₁ = σ_k, where the estimate diverges).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiagnoseSettings:
    """The settings of the metrics defined in the module docstring, with the paper's defaults; validated once, here.

    ``eta``: relative bf16 tolerance of an unchanged entry; ``top_k``: size of the singular subspaces
    whose principal angles are measured (clipped to the matrix); ``alpha``: fraction of entries in the
    principal and low-magnitude masks; ``rank``: rank of the reconstruction behind the principal mask;
    ``sim_k``: right singular vectors compared by Sim_K in a series; ``hill_k``: top singular values in
    the Hill estimate (None: ⌈√numerical rank⌉).
    """

    eta: float = 1e-3
    top_k: int = 512
    alpha: float = 0.5  # App. C (its §3.2 quotes a 30% baseline)
    rank: int = 64
    sim_k: int = 16
    hill_k: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(
                f"eta must be a finite number >= 0 (relative bf16 tolerance; default 1e-3), got {self.eta}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError(
                f"alpha must be in (0, 1) (mask fraction; default {DiagnoseSettings.alpha}), got {self.alpha}"
            )
        for name in ("top_k", "rank", "sim_k"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.hill_k is not None and (int(self.hill_k) != self.hill_k or self.hill_k < 2):
            raise ValueError(f"hill_k must be an integer >= 2 (or None for ⌈√rank⌉), got {self.hill_k}")


DEFAULT_SETTINGS = DiagnoseSettings()


def bf16_unchanged_mask(before: torch.Tensor, after: torch.Tensor, eta: float = DiagnoseSettings.eta) -> torch.Tensor:
    """Entries that are unchanged at bf16 resolution (paper App. C), bool, same shape as the inputs.

    Both tensors (any float dtype, same shape) are rounded to bf16 and compared in fp32:
    |Ŵ₁ − Ŵ₀| ≤ η·max(|Ŵ₀|, |Ŵ₁|). Two zeros count as unchanged.
    """
    b = before.to(torch.bfloat16).float()
    a = after.to(torch.bfloat16).float()
    return (a - b).abs() <= eta * torch.maximum(a.abs(), b.abs())


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Economy SVD w = U·diag(S)·Vᵀ of w [m, n] → U [m, p], S [p] (descending), V [n, p]; p = min(m, n).

    Note V, not Vᵀ. A wide matrix is decomposed as its contiguous transpose: LAPACK's divide-and-conquer
    SVD is several times faster on a row-major tall matrix than on a wide one.
    """
    if w.shape[0] >= w.shape[1]:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u, s, vh.mT
    u, s, vh = torch.linalg.svd(w.mT.contiguous(), full_matrices=False)
    return vh.mT, s, u


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of w [m, n], descending, [min(m, n)] (computed on the tall orientation; see :func:`svd`)."""
    return torch.linalg.svdvals(w if w.shape[0] >= w.shape[1] else w.mT.contiguous())


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, [k]) between the column spans of a and b, each [d, k] orthonormal.

    cos θ_i = σ_i(aᵀb) as in the paper; for small angles arccos of a cosine near 1 loses half the digits, so
    angles with sin²θ < ½ come from the sines σ((I − aaᵀ)b) instead (Björck & Golub 1973; Knyazev & Argentati
    2002), which resolves the ~0.1° rotations that separate OPD from RLVR.
    """
    cross = a.mT @ b
    cos = torch.linalg.svdvals(cross).clamp(max=1.0)  # descending: pairs with ascending angles
    sin = torch.linalg.svdvals(b - a @ cross).clamp(max=1.0).flip(0)  # ascending, as the angles
    return torch.where(sin.square() < 0.5, torch.asin(sin), torch.acos(cos))


def normalized_spectral_shift(s_before: torch.Tensor, s_after: torch.Tensor) -> float | None:
    """NSS = ‖σ(W₁) − σ(W₀)‖₂ / ‖σ(W₀)‖₂ (paper App. C) from the two spectra [p]; None if W₀ = 0 ≠ W₁."""
    shift = (s_after - s_before).norm().item()
    scale = s_before.norm().item()
    if scale == 0:
        return 0.0 if shift == 0 else None
    return shift / scale


def stable_rank(s: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖₂² = Σσ_i² / σ₁² from the singular values s [p] (descending); 0 for ΔW = 0."""
    top = s[0].item() if s.numel() else 0.0
    return (s.square().sum().item() / top**2) if top > 0 else 0.0


def numerical_rank(s: torch.Tensor, shape: Sequence[int]) -> int:
    """Singular values above σ₁·max(m, n)·ε (float64 ε), numpy's matrix_rank tolerance."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = s[0].item() * max(shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum().item())


def hill_alpha(s: torch.Tensor, k: int | None = None, *, rank: int | None = None) -> tuple[float | None, int]:
    """Hill tail-index estimate α̂ = [1/(k−1) Σ_{i<k} log(σ_i/σ_k)]⁻¹ of a spectrum (paper §3.3).

    ``s`` [p]: singular values, descending. Only the ``rank`` numerically nonzero ones count (default: all
    positive ones). ``k`` defaults to ⌈√rank⌉ and is clipped to [2, rank]. Returns (α̂, k used); α̂ is None
    when undefined: fewer than two nonzero values, or σ₁ = σ_k (a flat top, where α̂ → ∞).
    """
    rho = int((s > 0).sum().item()) if rank is None else rank
    if rho < 2:
        return None, 0
    k = min(max(2, math.ceil(math.sqrt(rho)) if k is None else k), rho)
    mean_log = torch.log(s[: k - 1] / s[k - 1]).mean().item()
    return (1.0 / mean_log if mean_log > 0 else None), k


def mask_overlap(score: torch.Tensor, update: torch.Tensor, alpha: float, *, largest: bool) -> float | None:
    """|M ∩ M_upd| / |M_upd| for M = the top-α (``largest``) or bottom-α fraction of ``score`` (paper App. C).

    ``score`` (float) and ``update`` (bool, True = changed) have the same shape. M holds exactly round(α·n)
    entries; ties at the threshold are counted fractionally, i.e. the expected overlap under uniform random
    tie-breaking (bf16 checkpoints have many equal magnitudes, and breaking ties by position would bias the
    overlap). None when no entry changed.
    """
    upd = update.reshape(-1)
    changed = int(upd.sum().item())
    if changed == 0:
        return None
    flat = score.reshape(-1)
    n = flat.numel()
    size = min(max(1, round(alpha * n)), n)
    threshold = flat.kthvalue(n - size + 1 if largest else size).values
    strict = flat > threshold if largest else flat < threshold
    ties = flat == threshold
    n_strict, n_ties = int(strict.sum().item()), int(ties.sum().item())
    hits = (strict & upd).sum().item() + (size - n_strict) / n_ties * (ties & upd).sum().item()
    return hits / changed


def subspace_similarity(v_a: torch.Tensor, v_b: torch.Tensor) -> float:
    """Sim_K = ‖V_aᵀ V_b‖_F² / K for orthonormal bases v_a, v_b [n, K] (paper §3.3); in [0, 1]."""
    return (v_a.mT @ v_b).square().sum().item() / v_a.shape[1]


def top_right_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of w [m, n] (float64), as columns [n, min(k, m, n)]."""
    return svd(w)[2][:, :k]


def compare_matrices(
    before: torch.Tensor, after: torch.Tensor, settings: DiagnoseSettings = DEFAULT_SETTINGS
) -> dict[str, float | int | None]:
    """All pairwise update-geometry metrics of one matrix W₀ = ``before`` → W₁ = ``after`` ([m, n], any float
    dtype, same device) with ``settings`` (η, top-k, α, r, Hill k); see the module docstring for the
    definitions. SVDs run in float64 on that device.

    Returns a dict: update_sparsity, principal_angle_{max,mean}_deg (over the left and right angles
    together) and principal_angle_{left,right}_{max,mean}_deg, top_k (k after clipping),
    principal_angle_{left,right}_full_rank (k is that side's dimension: its angles are None) and
    principal_angle_full_rank (both sides: every angle is None), nss,
    principal_mask_overlap(_ratio), low_magnitude_mask_overlap(_ratio), stable_rank, frobenius_norm,
    spectral_norm, relative_update_norm (‖ΔW‖_F / ‖W₀‖_F), hill_alpha, hill_k.
    """
    eta, alpha = settings.eta, settings.alpha
    unchanged = bf16_unchanged_mask(before, after, eta)
    sparsity = unchanged.sum().item() / unchanged.numel()  # exact count: a float32 mean drifts at 1e8 entries
    changed = ~unchanged
    del unchanged
    w0 = before.to(torch.float64)
    w1 = after.to(torch.float64)
    identical = torch.equal(w0, w1)
    u0, s0, v0 = svd(w0)
    k = min(settings.top_k, s0.numel())
    # Where k reaches a side's dimension, both top-k subspaces are that whole space and the angles are 0 by
    # construction; computing them would return SVD rounding (~1e-13°) that looks like a measurement. None
    # rather than 0: such an angle says nothing about the update, and a 0 would pull the per-layer-type means
    # toward "no rotation" as if it had been measured.
    left_full, right_full = k == w0.shape[0], k == w0.shape[1]
    if identical:
        # Same matrix, same subspaces: skip the second SVD, whose rounding would only add ~1e-14° noise.
        s1 = s0
        left = None if left_full else torch.zeros(k, dtype=torch.float64)
        right = None if right_full else torch.zeros(k, dtype=torch.float64)
    else:
        u1, s1, v1 = svd(w1)
        left = None if left_full else principal_angles(u0[:, :k], u1[:, :k])
        right = None if right_full else principal_angles(v0[:, :k], v1[:, :k])
        del u1, v1
    measured = [side for side in (left, right) if side is not None]
    angles = torch.cat(measured).rad2deg() if measured else None
    r = min(settings.rank, s0.numel())
    reconstruction = (u0[:, :r] * s0[:r]) @ v0[:, :r].mT
    del u0, v0
    principal = mask_overlap(reconstruction.abs_(), changed, alpha, largest=True)
    del reconstruction
    low = mask_overlap(w0.abs(), changed, alpha, largest=False)
    delta = w1 - w0
    del w1
    s_delta = torch.zeros_like(s0) if identical else singular_values(delta)
    frobenius = delta.norm().item()
    rho = numerical_rank(s_delta, delta.shape)
    hill, used_k = hill_alpha(s_delta, settings.hill_k, rank=rho)
    w0_norm = w0.norm().item()
    return {
        "update_sparsity": sparsity,
        "principal_angle_max_deg": None if angles is None else angles.max().item(),
        "principal_angle_mean_deg": None if angles is None else angles.mean().item(),
        "principal_angle_left_max_deg": None if left is None else left.max().rad2deg().item(),
        "principal_angle_left_mean_deg": None if left is None else left.mean().rad2deg().item(),
        "principal_angle_right_max_deg": None if right is None else right.max().rad2deg().item(),
        "principal_angle_right_mean_deg": None if right is None else right.mean().rad2deg().item(),
        "top_k": k,
        "principal_angle_full_rank": left_full and right_full,
        "principal_angle_left_full_rank": left_full,
        "principal_angle_right_full_rank": right_full,
        "nss": normalized_spectral_shift(s0, s1),
        "principal_mask_overlap": principal,
        "principal_mask_overlap_ratio": None if principal is None else principal / alpha,
        "low_magnitude_mask_overlap": low,
        "low_magnitude_mask_overlap_ratio": None if low is None else low / alpha,
        "stable_rank": stable_rank(s_delta),
        "frobenius_norm": frobenius,
        "spectral_norm": s_delta[0].item(),
        "relative_update_norm": frobenius / w0_norm if w0_norm > 0 else None,
        "hill_alpha": hill,
        "hill_k": used_k,
    }


def subspace_emergence(series: Sequence[torch.Tensor], k: int = DiagnoseSettings.sim_k) -> list[float | None]:
    """Sim_K(t, T) for t = 1 … T over the checkpoints W(0), …, W(T) of one matrix (paper §3.3).

    ``series``: T + 1 ≥ 2 tensors [m, n] (any float dtype). V_K(t) are the top-K right singular vectors of
    the cumulative update W(t) − W(0) in float64, K clipped to min(m, n). Returns T values (the last is 1);
    None where W(t) = W(0) or W(T) = W(0) (no update, no subspace).
    """
    base = series[0].to(torch.float64)

    def basis(w: torch.Tensor) -> torch.Tensor | None:
        delta = w.to(torch.float64) - base
        return None if not delta.any() else top_right_vectors(delta, k)

    end = basis(series[-1])
    sims: list[float | None] = []
    for w in series[1:-1]:
        v = basis(w)
        sims.append(None if v is None or end is None else subspace_similarity(v, end))
    sims.append(None if end is None else subspace_similarity(end, end))
    return sims
