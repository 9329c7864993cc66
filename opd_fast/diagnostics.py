"""Geometry of OPD weight updates, measured from checkpoints, and subspace-locked training.

Implements the offline diagnostics of Shen et al., "On the Geometry of On-Policy Distillation"
(arXiv:2606.07082, §3 and App. C), per 2-D weight matrix W₀ (BEFORE) → W₁ (AFTER), ΔW = W₁ − W₀, in
float64 (SVDs included, on the CPU by default as in the paper) except the sparsity, which compares bf16
values in fp32 as the paper does:

* **bf16-aware update sparsity** (App. C): both checkpoints are cast to bf16 and back; entry (i, j) is
  *unchanged* if |Ŵ₁ − Ŵ₀| ≤ η·max(|Ŵ₀|, |Ŵ₁|) (η = 1e-3); sparsity = fraction unchanged. The changed
  entries form the update mask M_upd.
* **Principal angles** (App. C): θ_i with cos θ_i = σ_i(U₀ₖᵀU₁ₖ) between the top-k left singular
  subspaces, and likewise for the right ones (V); k = 512 clipped to min(m, n). A side whose dimension
  equals k is the whole space there, so its angles are 0. Reported as max and mean in degrees. The max
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

Checkpoints are read with ``safetensors`` only (never ``torch.load``, which can run code from a file),
one matrix at a time, so memory stays at a few copies of the largest matrix. :class:`SubspaceLock`
implements the paper's rank-16 projected training (§4): g ← g·V·Vᵀ with V the top right singular
vectors of the cumulative update at a chosen step.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_ETA = 1e-3
DEFAULT_TOP_K = 512
DEFAULT_ALPHA = 0.5
DEFAULT_RANK = 64
DEFAULT_SIM_K = 16
DEFAULT_LOCK_RANK = 16

# Metrics averaged in the per-layer-type and overall summaries (update_sparsity weighted by parameters,
# as in the paper; the others unweighted over matrices).
SUMMARY_METRICS = (
    "update_sparsity",
    "principal_angle_max_deg",
    "principal_angle_mean_deg",
    "nss",
    "principal_mask_overlap",
    "principal_mask_overlap_ratio",
    "low_magnitude_mask_overlap",
    "low_magnitude_mask_overlap_ratio",
    "stable_rank",
    "frobenius_norm",
    "relative_update_norm",
    "hill_alpha",
)

# Table/plot order of the usual transformer layer types; other types follow in order of appearance.
_TYPE_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_PARAMETER_SUFFIXES = {"weight", "bias"}


class DiagnosticsError(ValueError):
    """A checkpoint cannot be read or compared; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint reading


def _safe_open(file: Path):
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise DiagnosticsError("reading checkpoints needs safetensors: pip install safetensors") from None
    try:
        return safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise DiagnosticsError(
            f"cannot read {file}: {exc} (is it a complete, uncorrupted .safetensors file?)"
        ) from None


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DiagnosticsError(
            f"cannot read the shard index {index}: {type(exc).__name__}: {exc} "
            "(expected JSON with a 'weight_map' of tensor name -> shard file)"
        ) from None
    files = [index.parent / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise DiagnosticsError(f"{index} lists the shard {file.name}, but {file} does not exist")
    return files


def _checkpoint_files(path: Path) -> list[Path]:
    """The .safetensors files that make up the checkpoint at ``path``."""
    if not path.exists():
        raise DiagnosticsError(
            f"checkpoint not found: {path} (pass a model directory with *.safetensors or a .safetensors file)"
        )
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return [path]
        if path.name.endswith(".safetensors.index.json"):
            return _index_shards(path)
        raise DiagnosticsError(
            f"{path} is not a .safetensors file; diagnose reads only safetensors (torch.load can run code "
            "from the file): re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    indices = sorted(path.glob("*.safetensors.index.json"))
    if len(indices) > 1:
        names = ", ".join(index.name for index in indices)
        raise DiagnosticsError(f"{path} holds several shard indices ({names}); pass the index file to use")
    if indices:
        return _index_shards(indices[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(others)}: re-save with save_pretrained(..., safe_serialization=True); "
            "diagnose never uses torch.load)"
            if others
            else ""
        )
        raise DiagnosticsError(f"no *.safetensors file in the directory {path}{hint}")
    return files


class Checkpoint:
    """Lazy, read-only view of the tensors of a safetensors checkpoint.

    ``path``: a .safetensors file, a shard index (``*.safetensors.index.json``), or a model directory
    holding either (sharded checkpoints are found through their index). Only headers are read here;
    :meth:`load` memory-maps one tensor at a time.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in _checkpoint_files(self.path):
            handle = _safe_open(file)
            names = handle.keys()  # a safe_open handle is not iterable
            for name in names:
                if name in self._file_of:
                    raise DiagnosticsError(
                        f"tensor {name!r} is stored twice, in {self._file_of[name]} and {file}; "
                        "pass the one file or the shard index to use"
                    )
                self._file_of[name] = file
            self._handles[file] = handle

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype code, e.g. "BF16", "F32"."""
        return self._handles[self._file_of[name]].get_slice(name).get_dtype()

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, on the CPU."""
        file = self._file_of[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:  # SafetensorError and friends: report which file is broken
            raise DiagnosticsError(f"cannot read tensor {name!r} from {file}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Metrics on single matrices


def layer_type(name: str) -> str:
    """The layer type of a parameter name: its last component that is not an index or "weight"/"bias".

    "model.layers.3.self_attn.q_proj.weight" → "q_proj"; "model.embed_tokens.weight" → "embed_tokens";
    "lm_head.weight" → "lm_head"; a bare name such as "w1" is its own type.
    """
    parts = [part for part in name.split(".") if part and not part.isdigit()]
    if len(parts) > 1 and parts[-1] in _PARAMETER_SUFFIXES:
        parts = parts[:-1]
    return parts[-1] if parts else name


def bf16_unchanged_mask(before: torch.Tensor, after: torch.Tensor, eta: float = DEFAULT_ETA) -> torch.Tensor:
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
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    eta: float = DEFAULT_ETA,
    top_k: int = DEFAULT_TOP_K,
    alpha: float = DEFAULT_ALPHA,
    rank: int = DEFAULT_RANK,
    hill_k: int | None = None,
) -> dict[str, float | int | None]:
    """All pairwise update-geometry metrics of one matrix W₀ = ``before`` → W₁ = ``after`` ([m, n], any float
    dtype, same device); see the module docstring for the definitions. SVDs run in float64 on that device.

    Returns a dict: update_sparsity, principal_angle_{max,mean}_deg (over the left and right angles
    together) and principal_angle_{left,right}_{max,mean}_deg, top_k (k after clipping), nss,
    principal_mask_overlap(_ratio), low_magnitude_mask_overlap(_ratio), stable_rank, frobenius_norm,
    spectral_norm, relative_update_norm (‖ΔW‖_F / ‖W₀‖_F), hill_alpha, hill_k.
    """
    unchanged = bf16_unchanged_mask(before, after, eta)
    sparsity = unchanged.sum().item() / unchanged.numel()  # exact count: a float32 mean drifts at 1e8 entries
    changed = ~unchanged
    del unchanged
    w0 = before.to(torch.float64)
    w1 = after.to(torch.float64)
    identical = torch.equal(w0, w1)
    u0, s0, v0 = svd(w0)
    k = min(top_k, s0.numel())
    if identical:
        # Same matrix, same subspaces: skip the second SVD, whose rounding would only add ~1e-14° noise.
        s1 = s0
        left = right = torch.zeros(k, dtype=torch.float64)
    else:
        u1, s1, v1 = svd(w1)
        left = principal_angles(u0[:, :k], u1[:, :k])
        right = principal_angles(v0[:, :k], v1[:, :k])
        del u1, v1
    r = min(rank, s0.numel())
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
    hill, used_k = hill_alpha(s_delta, hill_k, rank=rho)
    angles = torch.cat([left, right]).rad2deg()
    w0_norm = w0.norm().item()
    return {
        "update_sparsity": sparsity,
        "principal_angle_max_deg": angles.max().item(),
        "principal_angle_mean_deg": angles.mean().item(),
        "principal_angle_left_max_deg": left.max().rad2deg().item(),
        "principal_angle_left_mean_deg": left.mean().rad2deg().item(),
        "principal_angle_right_max_deg": right.max().rad2deg().item(),
        "principal_angle_right_mean_deg": right.mean().rad2deg().item(),
        "top_k": k,
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


def subspace_emergence(series: Sequence[torch.Tensor], k: int = DEFAULT_SIM_K) -> list[float | None]:
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


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def _natural_key(name: str) -> list[int | str]:
    # layers.2 before layers.10; split() alternates text and digits, so positions never mix int and str.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _match_matrices(
    checkpoints: Sequence[Checkpoint], include: re.Pattern | None
) -> tuple[list[str], list[dict], list[dict]]:
    """(names of the 2-D float matrices in every checkpoint with one shape, skipped, mismatched)."""
    names = sorted(set().union(*(c.names for c in checkpoints)), key=_natural_key)
    common, skipped, mismatched = [], [], []
    for name in names:
        if include is not None and not include.search(name):
            continue
        missing = [str(c.path) for c in checkpoints if name not in c]
        if missing:
            skipped.append({"name": name, "reason": f"missing from {', '.join(missing)}"})
            continue
        shapes = [c.shape(name) for c in checkpoints]
        dtypes = {c.dtype(name) for c in checkpoints}
        if any(len(shape) != 2 for shape in shapes):
            skipped.append({"name": name, "reason": f"{len(shapes[0])}-D, not a matrix"})
        elif not dtypes <= _FLOAT_DTYPES:
            skipped.append({"name": name, "reason": f"dtype {'/'.join(sorted(dtypes))} is not floating point"})
        elif len(set(shapes)) > 1:
            mismatched.append({"name": name, "shapes": [list(shape) for shape in shapes]})
        else:
            common.append(name)
    return common, skipped, mismatched


def _mean(values: Iterable[float | None], weights: Iterable[float] | None = None) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights or itertools.repeat(1.0)) if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per-layer-type and overall averages of the per-matrix rows (as in ``diagnose()["matrices"]``).

    update_sparsity is weighted by parameter count (the fraction of all parameters unchanged, as in the
    paper); the other metrics are unweighted means over matrices, skipping None. With ``sim_k`` in the
    rows, the mean Sim_K per checkpoint is added (key ``sim_k``: list per checkpoint t = 1 … T).
    """

    def block(group: Sequence[Mapping]) -> dict:
        out: dict = {"matrices": len(group), "parameters": sum(r["parameters"] for r in group)}
        for key in SUMMARY_METRICS:
            weights = [r["parameters"] for r in group] if key == "update_sparsity" else None
            out[key] = _mean((r[key] for r in group), weights)
        if group and "sim_k" in group[0]:
            out["sim_k"] = [_mean(r["sim_k"][t] for r in group) for t in range(len(group[0]["sim_k"]))]
        return out

    seen = list(dict.fromkeys(r["layer_type"] for r in rows))
    types = sorted(seen, key=lambda t: (_TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER), seen.index(t)))
    return {
        "by_layer_type": {t: block([r for r in rows if r["layer_type"] == t]) for t in types},
        "overall": block(rows),
    }


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU here; use device='cpu'")
    return device


def _check_settings(eta: float, top_k: int, alpha: float, rank: int, sim_k: int, hill_k: int | None) -> None:
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (relative bf16 tolerance; default 1e-3), got {eta}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (mask fraction; default {DEFAULT_ALPHA}), got {alpha}")
    for name, value in (("top_k", top_k), ("rank", rank), ("sim_k", sim_k)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if hill_k is not None and (int(hill_k) != hill_k or hill_k < 2):
        raise ValueError(f"hill_k must be an integer >= 2 (or None for ⌈√rank⌉), got {hill_k}")


def diagnose(
    checkpoints: Sequence[str | os.PathLike],
    *,
    eta: float = DEFAULT_ETA,
    top_k: int = DEFAULT_TOP_K,
    alpha: float = DEFAULT_ALPHA,
    rank: int = DEFAULT_RANK,
    sim_k: int = DEFAULT_SIM_K,
    hill_k: int | None = None,
    include: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Update-geometry diagnostics between checkpoints (docs/design.md §4), one matrix at a time.

    ``checkpoints``: BEFORE, AFTER (paths: model directories, .safetensors files or shard indices), or a
    series BEFORE, …, AFTER in training order, which adds Sim_K(t, AFTER) per matrix. The pairwise
    metrics (:func:`compare_matrices`) always compare the first with the last. Every 2-D float tensor
    present in all checkpoints with one shape is compared; ``include`` (a regex searched in the name)
    narrows that. ``device``: where the float64 math runs; the paper's numbers use the CPU (GPU SVDs of
    near-identical matrices can differ in the last digits of the angles).

    Returns ``{"matrices": [row, ...], "summary": {...}}``: a row per matrix with ``name``,
    ``layer_type``, ``shape``, ``parameters``, the metrics of :func:`compare_matrices` and, for a series,
    ``sim_k`` (one value per checkpoint after the first); the summary holds :func:`summarize`'s averages plus
    ``checkpoints``, ``settings``, ``skipped`` (with reasons) and ``mismatched`` (same name, other shape).
    Raises :class:`DiagnosticsError` naming the file for missing/unreadable checkpoints or when no matrix is
    common to all, ValueError for bad settings.
    """
    from tqdm import tqdm

    _check_settings(eta, top_k, alpha, rank, sim_k, hill_k)
    device = _resolve_device(device)
    if len(checkpoints) < 2:
        raise ValueError(f"checkpoints needs at least two paths (BEFORE AFTER), got {len(checkpoints)}")
    try:
        pattern = re.compile(include) if include is not None else None
    except re.error as exc:
        raise ValueError(f"include={include!r} is not a valid regular expression: {exc}") from None
    opened = [Checkpoint(path) for path in checkpoints]
    names, skipped, mismatched = _match_matrices(opened, pattern)
    if not names:
        counts = ", ".join(f"{c.path} ({len(c.names)} tensors, e.g. {c.names[:2]})" for c in opened)
        raise DiagnosticsError(
            "no 2-D weight matrix has the same name and shape in all checkpoints"
            + (f" matching include={include!r}" if include else "")
            + f": {counts}; are they the same architecture, saved with the same name prefixes?"
        )
    series = len(opened) > 2
    rows = []
    bar = tqdm(names, desc="diagnose (SVDs)", unit="matrix", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        before, after = (c.load(name).to(device) for c in (opened[0], opened[-1]))
        bad = [str(c.path) for c, w in ((opened[0], before), (opened[-1], after)) if not torch.isfinite(w).all()]
        if bad:
            skipped.append({"name": name, "reason": f"non-finite values in {', '.join(bad)}"})
            continue
        try:
            metrics = compare_matrices(before, after, eta=eta, top_k=top_k, alpha=alpha, rank=rank, hill_k=hill_k)
        except torch.linalg.LinAlgError as exc:
            skipped.append({"name": name, "reason": f"SVD failed: {exc}"})
            continue
        row = {"name": name, "layer_type": layer_type(name), "shape": list(before.shape)}
        row.update(parameters=before.numel(), **metrics)
        del before, after
        if series:
            row["sim_k"] = subspace_emergence([c.load(name).to(device) for c in opened], sim_k)
        rows.append(row)
    if not rows:
        raise DiagnosticsError(f"no matrix could be compared: {skipped[-1]['reason']} (and others, see skipped)")
    summary = summarize(rows)
    summary.update(
        checkpoints=[str(c.path) for c in opened],
        settings={
            "eta": eta,
            "top_k": top_k,
            "alpha": alpha,
            "rank": rank,
            "sim_k": sim_k if series else None,
            "hill_k": hill_k,
            "device": str(device),
        },
        skipped=skipped,
        mismatched=mismatched,
    )
    return {"matrices": rows, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# Output: table, JSON, plots


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# Table columns: header, summary key, number format.
_COLUMNS = (
    ("sparsity", "update_sparsity", ".4f"),
    ("angle max°", "principal_angle_max_deg", ".3g"),
    ("angle mean°", "principal_angle_mean_deg", ".3g"),
    ("NSS", "nss", ".2e"),
    ("srank", "stable_rank", ".3g"),
    ("|dW|_F", "frobenius_norm", ".3g"),
    ("rel |dW|", "relative_update_norm", ".2e"),
    ("Hill a", "hill_alpha", ".3g"),
    ("princ/a", "principal_mask_overlap_ratio", ".3f"),
    ("low/a", "low_magnitude_mask_overlap_ratio", ".3f"),
)


def format_table(report: Mapping) -> str:
    """Terminal table of a :func:`diagnose` report: one line per layer type plus the overall line, then
    Sim_K per checkpoint (series) and what was skipped."""
    summary = report["summary"]
    header = f"{'layer type':<16} {'n':>4} {'params':>7} " + " ".join(f"{h:>{max(len(h), 8)}}" for h, _, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, b in [*summary["by_layer_type"].items(), ("all", summary["overall"])]:
        if name == "all":
            lines.append("-" * len(header))
        cells = " ".join(f"{_fmt(b[key], spec):>{max(len(h), 8)}}" for h, key, spec in _COLUMNS)
        lines.append(f"{name:<16} {b['matrices']:>4} {_count(b['parameters']):>7} {cells}")
    settings = summary["settings"]
    lines.append(
        f"sparsity: bf16-unchanged fraction (eta={settings['eta']:g}, parameter-weighted); angles: top-k="
        f"{settings['top_k']} (clipped to the matrix) singular subspaces, left and right; princ/a, low/a: "
        f"update-mask overlap over the random baseline alpha={settings['alpha']:g} (principal mask from rank "
        f"{settings['rank']}); other columns: means over matrices"
    )
    if "sim_k" in summary["overall"]:
        types = list(summary["by_layer_type"])
        lines.append("")
        lines.append(f"Sim_K(t, end), K={settings['sim_k']}: subspace emergence of the cumulative update")
        lines.append(f"{'checkpoint':<40} {'mean':>6} " + " ".join(f"{t[:12]:>12}" for t in types))
        for i, path in enumerate(summary["checkpoints"][1:]):
            cells = " ".join(f"{_fmt(summary['by_layer_type'][t]['sim_k'][i], '.3f'):>12}" for t in types)
            lines.append(f"{path[-40:]:<40} {_fmt(summary['overall']['sim_k'][i], '.3f'):>6} {cells}")
    skipped, mismatched = summary["skipped"], summary["mismatched"]
    if skipped or mismatched:
        reasons: dict[str, int] = {}
        for item in skipped:
            reason = re.sub(r"^\d+-D, not a matrix$", "not a matrix", item["reason"])
            reasons[reason] = reasons.get(reason, 0) + 1
        detail = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
        lines.append("")
        lines.append(f"skipped {len(skipped)} tensors ({detail or 'none'}); {len(mismatched)} with mismatched shapes")
        lines.extend(f"  mismatched: {m['name']} {m['shapes']}" for m in mismatched[:10])
    return "\n".join(lines)


def write_json(path: str | os.PathLike, report: Mapping) -> None:
    """Write a :func:`diagnose` report as JSON (strict: no NaN/Infinity; undefined values are null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


_PLOTTED = (
    ("update_sparsity", "bf16 update sparsity", False, None),
    ("principal_angle_max_deg", "max principal angle (°)", False, None),
    ("nss", "normalized spectral shift", True, None),
    ("stable_rank", "stable rank of ΔW", False, None),
    ("frobenius_norm", "‖ΔW‖_F", True, None),
    ("hill_alpha", "Hill tail index of σ(ΔW)", False, None),
    ("principal_mask_overlap_ratio", "principal-mask overlap / α", False, 1.0),
    ("low_magnitude_mask_overlap_ratio", "low-magnitude overlap / α", False, 1.0),
)


def plot(report: Mapping, directory: str | os.PathLike) -> list[Path]:
    """PNG plots of a :func:`diagnose` report into ``directory``; returns the files written.

    ``metrics_by_layer_type.png``: per layer type, a box plot over its matrices of each metric (ratios
    with the random baseline 1 dashed). For a series also ``sim_k.png``: Sim_K(t, end) vs checkpoint,
    one line per layer type and the mean.
    """
    from opd_fast.bench import require_matplotlib

    plt = require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = report["matrices"]
    summary = report["summary"]
    types = list(summary["by_layer_type"])
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, log, baseline) in zip(axes.flat, _PLOTTED):
        data = [[r[key] for r in rows if r["layer_type"] == t and r[key] is not None] for t in types]
        shown = [(t, d) for t, d in zip(types, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown])
            ax.set_xticks(range(1, len(shown) + 1), [t for t, _ in shown])
        else:
            ax.text(0.5, 0.5, "undefined for every matrix", ha="center", va="center", transform=ax.transAxes)
        if log and any(v > 0 for _, d in shown for v in d):
            ax.set_yscale("log")
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(True, axis="y", alpha=0.3)
    checkpoints = summary["checkpoints"]
    fig.suptitle(f"OPD update geometry: {checkpoints[0]} → {checkpoints[-1]} ({len(rows)} matrices)")
    fig.tight_layout()
    written = [directory / "metrics_by_layer_type.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    if "sim_k" in summary["overall"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        steps = list(range(1, len(checkpoints)))
        for t in types:
            values = summary["by_layer_type"][t]["sim_k"]
            ax.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=t, alpha=0.7)
        mean = [math.nan if v is None else v for v in summary["overall"]["sim_k"]]
        ax.plot(steps, mean, marker="s", color="black", linewidth=2.5, label="mean")
        ax.set_xticks(steps, [Path(p).name for p in checkpoints[1:]], rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("checkpoint")
        ax.set_ylabel(f"Sim_K(t, end), K={summary['settings']['sim_k']}")
        ax.set_title("subspace emergence of the cumulative update")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(directory / "sim_k.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Subspace-locked training


class SubspaceLock:
    """Rank-r projected training (paper §4, "functional sufficiency"): g ← g·V·Vᵀ for each locked matrix.

    Usage::

        lock = SubspaceLock(model, rank=16, include=r"self_attn\\.")  # copies the initial weights (CPU)
        ...train ~20% of the steps...
        lock.capture(model)   # V [n, r] = top-r right singular vectors of W(t) − W(0), float64 SVD on the CPU
        lock.attach(model)    # from now on every gradient of a locked matrix is projected onto span(V)
        ...train...
        lock.detach()

    or, instead of hooks, ``lock.project_(model)`` after each ``backward()``. Locked are the 2-D floating
    parameters (weights [m, n] = [out, in]) whose name matches ``include`` (a regex searched in the name,
    or a predicate; None = all). ``initial``: the model at step 0, or a dict name → tensor with the
    model's parameter names. V is stored in the parameter's dtype and device and has
    min(r, numerical rank of ΔW) columns: a matrix that has not moved gets V = [n, 0] and stays frozen.

    The projection keeps each gradient in the captured row space, so SGD (with momentum, without weight
    decay) only changes W within it: ΔW·(I − VVᵀ) = 0, provided the optimizer state starts at the capture
    (momentum gathered before it holds unprojected gradients). Adam's elementwise scaling and decoupled
    weight decay act after the projection and move weights off the subspace; the paper projects the
    gradients (with Adam), and so does this class.
    """

    def __init__(
        self,
        initial: nn.Module | Mapping[str, torch.Tensor],
        *,
        rank: int = DEFAULT_LOCK_RANK,
        include: str | Callable[[str], bool] | None = None,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank must be a positive integer (the paper uses 16), got {rank}")
        self.rank = int(rank)
        if isinstance(include, str):
            pattern = re.compile(include)
            self._selected: Callable[[str], bool] = lambda name: pattern.search(name) is not None
        else:
            self._selected = include or (lambda name: True)
        items = initial.named_parameters() if isinstance(initial, nn.Module) else initial.items()
        # The CPU copy costs no accelerator memory until capture(); float64 is formed there per matrix.
        self.initial = {
            name: t.detach().to("cpu", copy=True)
            for name, t in items
            if t.ndim == 2 and t.is_floating_point() and self._selected(name)
        }
        if not self.initial:
            raise ValueError(f"no 2-D floating-point weight in initial matches include={include!r}")
        self.bases: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def locked_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [name for name in self.initial if name not in params]
        if missing:
            raise ValueError(
                f"model has no parameter {missing[0]!r} (of {len(missing)} locked ones); pass the model whose "
                "initial weights built this SubspaceLock"
            )
        return {name: params[name] for name in self.initial}

    def capture(self, model: nn.Module) -> dict[str, int]:
        """Compute V for every locked matrix from the cumulative update W(now) − W(0); returns name → rank."""
        for name, p in self.locked_parameters(model).items():
            w0 = self.initial[name]
            if p.shape != w0.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} but was {tuple(w0.shape)} initially")
            delta = p.detach().to("cpu", torch.float64) - w0.to(torch.float64)
            _, s, v = svd(delta)
            r = min(self.rank, numerical_rank(s, delta.shape))
            self.bases[name] = v[:, :r].to(dtype=p.dtype, device=p.device)
        return {name: v.shape[1] for name, v in self.bases.items()}

    def _require_bases(self) -> None:
        if not self.bases:
            raise RuntimeError("SubspaceLock has no subspace yet: call capture(model) first")

    def project(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """g·V·Vᵀ for the gradient g [m, n] of the locked matrix ``name`` (V [n, r])."""
        v = self.bases[name]
        return (grad @ v) @ v.mT

    def project_(self, model: nn.Module) -> None:
        """Project the ``.grad`` of every locked parameter in place (call after ``backward()``)."""
        self._require_bases()
        for name, p in self.locked_parameters(model).items():
            if p.grad is not None:
                p.grad.copy_(self.project(name, p.grad))

    def attach(self, model: nn.Module) -> SubspaceLock:
        """Register gradient hooks that project each locked matrix's gradient before it is accumulated.

        Hooks read the current bases, so a later :meth:`capture` takes effect without re-attaching.
        Returns self; :meth:`detach` removes the hooks.
        """
        self._require_bases()
        self.detach()
        for name, p in self.locked_parameters(model).items():
            if p.requires_grad:
                self._handles.append(p.register_hook(lambda grad, name=name: self.project(name, grad)))
        return self

    def detach(self) -> None:
        """Remove the hooks registered by :meth:`attach` (no-op when none are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
