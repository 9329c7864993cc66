"""Input checks shared by every public function: each error names the argument and says how to fix it."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from opd_fast.types import IDENTITY_HEAD, HeadTransform

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# The default skew α of the skew KLs: DistiLLM's (Ko et al., 2024), which found 0.1 best for both directions.
DEFAULT_SKEW = 0.1
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Teacher log-probs from a server are rounded: allow this much above 0, and this much total mass above 1.
LOGPROB_TOLERANCE = 1e-3
MASS_TOLERANCE = 1e-2


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_temperature(temperature: object, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a number > 0, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_teacher_temperature(teacher_temperature: object, temperature: float) -> float:
    """The teacher's temperature τ_t: ``temperature`` (the student's) when None."""
    if teacher_temperature is None:
        return temperature
    return check_temperature(teacher_temperature, "teacher_temperature")


def check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    return float(beta)


def check_skew(skew: object) -> float:
    """The skew α of the skew KLs, in [0, 1): at 1 the mixture is the distribution itself and the divergence 0."""
    if isinstance(skew, bool) or not isinstance(skew, (int, float)):
        raise TypeError(f"skew must be a number in [0, 1), got {type(skew).__name__}")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) (0 = the plain KL; at 1 the skew KL is identically 0), got {skew!r}")
    return float(skew)


def check_filter_eps(filter_eps: object) -> float | None:
    if filter_eps is None:
        return None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be a number in [0, 1) or None, got {type(filter_eps).__name__}")
    if not 0.0 <= filter_eps < 1.0:
        raise ValueError(
            f"filter_eps must be in [0, 1) (0 = exact gradients) or None for the default, got {filter_eps!r}"
        )
    return float(filter_eps)


def check_flag(name: str, value: object) -> bool:
    """A True/False switch (1, "yes" or None are refused: a truthy string would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: object, what: str) -> int:
    """An integer (Python or NumPy/0-d integer types with __index__; not bool, not float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}; pass int({name})") from None


def check_tensor(name: str, value: object, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        hint = "; convert it with torch.as_tensor(...)" if type(value).__name__ in ("ndarray", "list", "tuple") else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; pass {name}.to_dense()")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {value.dtype}; "
            f"cast it with .float()"
        )
    return value


def check_weight(name: str, weight: object, shard: bool = False) -> torch.Tensor:
    """A [V, H] lm_head weight; a vocabulary ``shard`` (under a process group) may have no rows on a rank."""
    weight = check_tensor(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [V, H] (an lm_head weight), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1 and not shard:
        raise ValueError(f"{name} has no vocabulary rows (shape {tuple(weight.shape)}); pass the [V, H] lm_head weight")
    if weight.shape[1] < 1:
        raise ValueError(f"{name} has no hidden columns (shape {tuple(weight.shape)}); pass the [V, H] lm_head weight")
    return weight


class CheckedHead:
    """The base of :class:`opd_fast.LMHead`: a head (``weight``, ``bias``, ``scale``, ``softcap``) validated when it
    was built. It lives here, below heads.py (which builds on this module's checks), so that :func:`check_head`
    recognizes an LMHead without importing heads.py."""

    __slots__ = ()


def check_head(
    name: str, value: object, shard: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, HeadTransform]:
    """(weight [V, H], bias [V] | None, scalar transform) of an lm_head given as a weight tensor or an
    :class:`opd_fast.LMHead` (validated when it was built)."""
    if isinstance(value, CheckedHead):
        weight = check_weight(f"{name}.weight", value.weight, shard)
        return weight, value.bias, HeadTransform(value.scale, value.softcap)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be an lm_head weight tensor [V, H] or an opd_fast.LMHead (LMHead.from_model(model) "
            f"reads bias, logit scaling and softcapping from a transformers model), got {type(value).__name__}"
        )
    return check_weight(name, value, shard), None, IDENTITY_HEAD


def check_hidden(name: str, hidden: object, weight: torch.Tensor, weight_name: str) -> torch.Tensor:
    hidden = check_tensor(name, hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{name} must have shape [..., H], got a 0-d tensor")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name} has hidden size {hidden.shape[-1]} but {weight_name} has {weight.shape[1]} columns "
            f"(shape {tuple(weight.shape)}); pass the final hidden states and the lm_head weight of the same model"
        )
    return hidden


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} is on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device, but {where}; move them with .to(device)")
    return next(iter(devices))


def check_finite(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"{name} contains {bad} non-finite value(s) (NaN or Inf); check_finite=True refuses them. "
                f"Find where they come from (e.g. fp16 overflow) or pass check_finite=False to let NaN propagate"
            )


def check_mask(mask: object, lead_shape: torch.Size) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.layout != torch.strided:
        raise TypeError(f"mask must be a dense (strided) bool tensor, got layout {mask.layout}; pass mask.to_dense()")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = token counts), got {mask.dtype}; pass mask.bool()")
    if mask.shape != lead_shape:
        raise ValueError(
            f"mask must have the leading shape of the hidden states {tuple(lead_shape)}, got {tuple(mask.shape)}; "
            "pass one bool per token (True = the token counts)"
        )
    return mask


def check_vocab(student_weight: torch.Tensor, teacher_weight: torch.Tensor, vocab_size: int | None) -> int:
    """The shared vocabulary size V; both weights are later truncated to their first V rows."""
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student_weight has {v_s} vocabulary rows but teacher_weight has {v_t}; if one is padded "
                f"(e.g. 151936 vs 152064) pass vocab_size={min(v_s, v_t)} to use the first rows of both"
            )
        return v_s
    vocab_size = check_int("vocab_size", vocab_size, "an int or None")
    if not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be in [1, {min(v_s, v_t)}] (student_weight has {v_s} rows, teacher_weight {v_t}), "
            f"got {vocab_size}"
        )
    return vocab_size


def check_k(k: object, vocab: int) -> int:
    k = check_int("k", k, "an int")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}; pick k ≤ the vocabulary rows of the weights")
    return k


def _check_ids(name: str, ids: object, lead_shape: torch.Size, hidden: str) -> torch.Tensor:
    """Type and shape of integer ids ``[...]`` at each token (``hidden``: how the messages name the hidden states)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {ids.layout}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. int64), got {ids.dtype}; pass .long()")
    if ids.shape != lead_shape:
        raise ValueError(f"{name} must have the leading shape of {hidden} {tuple(lead_shape)}, got {tuple(ids.shape)}")
    return ids


def check_token_ids(token_ids: object, lead_shape: torch.Size) -> torch.Tensor:
    """Type and shape of ``token_ids``; their values are checked by :func:`check_token_range`."""
    return _check_ids("token_ids", token_ids, lead_shape, "hidden")


def check_token_range(token_ids: torch.Tensor, vocab: int) -> None:
    """Every id in [0, vocab)."""
    if token_ids.numel():
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"token_ids must lie in [0, {vocab}) (rows of weight), found values in [{low}, {high}]; "
                "check the tokenizer matches this lm_head and that padding ids are masked out or replaced"
            )


IGNORE_INDEX = -100  # a label that takes no cross-entropy (transformers' convention)


def check_hard_label_weight(hard_label_weight: object) -> float:
    """w of w · CE(p_s, labels) + (1 − w) · D, in [0, 1)."""
    if isinstance(hard_label_weight, bool) or not isinstance(hard_label_weight, (int, float)):
        raise TypeError(f"hard_label_weight must be a number in [0, 1), got {type(hard_label_weight).__name__}")
    if not 0.0 <= hard_label_weight < 1.0:
        raise ValueError(
            f"hard_label_weight must be in [0, 1) (the loss is w · CE + (1 − w) · divergence), got "
            f"{hard_label_weight!r}; at 1 the loss is the cross-entropy alone: −opd_fast.linear_token_logprobs(hidden, "
            "weight, labels) averaged over the labelled tokens, without the teacher's logits"
        )
    return float(hard_label_weight)


def check_labels_given(hard_label_weight: float, labels: object) -> None:
    """``labels`` are given exactly when the cross-entropy has a weight."""
    if hard_label_weight > 0 and labels is None:
        raise ValueError(
            "hard_label_weight > 0 mixes in the cross-entropy with labels=: pass the target token ids "
            f"([...], {IGNORE_INDEX} where a token has none)"
        )
    if hard_label_weight == 0 and labels is not None:
        raise ValueError(
            "labels= are the targets of the hard-label cross-entropy: pass hard_label_weight > 0 with them "
            "(the loss is w · CE + (1 − w) · divergence), or leave labels out"
        )


def check_labels(labels: object, lead_shape: torch.Size) -> torch.Tensor:
    """Type and shape of ``labels`` ``[...]``; their values are checked by :func:`check_label_range`."""
    return _check_ids("labels", labels, lead_shape, "the hidden states")


def check_label_range(labels: torch.Tensor, vocab: int) -> None:
    """Every label in [0, vocab) or −100 (no target: the token does not count)."""
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel():
        low, high = int(valid.min()), int(valid.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"labels must lie in [0, {vocab}) (the vocabulary) or be {IGNORE_INDEX} (no target), found values in "
                f"[{low}, {high}]; check the tokenizer matches this lm_head"
            )


def check_teacher_topk(ids: object, logprobs: object, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-K ids and log-probs (e.g. from a vLLM server): types and shapes ``[..., K]``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"teacher_topk_ids must be an integer torch.Tensor [..., K] of token ids, got {type(ids).__name__}"
        )
    if ids.layout != torch.strided:
        raise TypeError(f"teacher_topk_ids must be a dense (strided) tensor, got layout {ids.layout}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(
            f"teacher_topk_ids must be an integer torch.Tensor [..., K] of token ids, got {ids.dtype}; pass .long()"
        )
    logprobs = check_tensor("teacher_topk_logprobs", logprobs)
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead or ids.shape[-1] < 1:
        raise ValueError(
            f"teacher_topk_ids must have shape [..., K] with the hidden states' leading shape {tuple(lead)}, "
            f"got {tuple(ids.shape)}"
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs must have the shape of teacher_topk_ids {tuple(ids.shape)}, "
            f"got {tuple(logprobs.shape)}"
        )
    return ids, logprobs


def check_teacher_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> None:
    """Value checks on the counted rows (padding rows may hold anything)."""
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"teacher_topk_ids must lie in [0, {vocab}) (the student's vocabulary), found [{low}, {high}]")
    sorted_ids = ids.sort(dim=-1).values
    duplicated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(dim=-1)
    if bool(duplicated.any()):
        row = int(duplicated.nonzero()[0])
        raise ValueError(f"teacher_topk_ids repeat a token id within a position (first at counted row {row})")
    if bool(torch.isnan(logprobs).any()):
        raise ValueError("teacher_topk_logprobs contain NaN")
    top = float(logprobs.max())
    if top > LOGPROB_TOLERANCE:
        raise ValueError(f"teacher_topk_logprobs must be log-probabilities (≤ 0), found {top:.4g}")
    mass = logprobs.double().exp().sum(dim=-1)
    if float(mass.max()) > 1.0 + MASS_TOLERANCE:
        row = int(mass.argmax())
        raise ValueError(
            f"teacher_topk_logprobs sum to a probability mass of {float(mass.max()):.4f} > 1 at counted row {row}; "
            f"pass the teacher's normalized log-probs (log_softmax), not logits"
        )


def check_process_group(process_group: object) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or dist.new_group(...)) "
            f"or None, got {type(process_group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized; call init_process_group")


@dataclass(frozen=True)
class DivergenceSpec:
    """What a backend computes per token: the divergence kind, β and the temperatures: τ divides the student's
    logits and τ_t (``teacher_temperature``; τ when not given) the teacher's.

    ``kind`` is already resolved, and ``beta`` is the teacher's weight in the mixture m = β p_t + (1 − β) p_s of
    the kinds that have one: JSD's β; α for ``skew_forward_kl`` = KL(p_t ‖ α p_t + (1 − α) p_s) and 1 − α for
    ``skew_reverse_kl`` = KL(p_s ‖ α p_s + (1 − α) p_t) (``skew`` α); unused by the KLs and ``tvd``. The ends
    where a mixture divergence is a plain KL are resolved to it (JSD with β = 0 is forward KL and with β = 1
    reverse KL, TRL's and Liger-Kernel's convention; a skew of 0 is the plain KL of its direction), so backends
    only ever see a mixture with 0 < β < 1. ``filter_eps`` is the gradient-filtering threshold of the kernel
    backends (None = their default, 0 = exact); the torch backend is always exact. ``entry_clip`` (torch backend
    only) caps each vocabulary entry's term.
    """

    kind: str
    beta: float
    temperature: float
    filter_eps: float | None = None
    entry_clip: float | None = None
    teacher_temperature: float | None = None
    entropy: bool = False  # also the student's per-token entropy, from the same sweep
    entropy_grad: bool = False  # ... differentiable (its backward sweeps the student's logits once more)
    # w of a loss w · CE(p_s, labels) + (1 − w) · D, in [0, 1) (backends.hard_labels); the ops take the labels
    hard_label_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.teacher_temperature is None:
            object.__setattr__(self, "teacher_temperature", self.temperature)

    @classmethod
    def make(
        cls,
        divergence: object,
        beta: object,
        temperature: object,
        filter_eps: object = None,
        entry_clip: object = None,
        teacher_temperature: object = None,
        skew: object = DEFAULT_SKEW,
    ) -> DivergenceSpec:
        kind = check_choice("divergence", divergence, DIVERGENCES)
        beta = check_beta(beta)
        skew = check_skew(skew)
        temperature = check_temperature(temperature)
        teacher_temperature = check_teacher_temperature(teacher_temperature, temperature)
        filter_eps = check_filter_eps(filter_eps)
        if entry_clip is not None:
            if isinstance(entry_clip, bool) or not isinstance(entry_clip, (int, float)):
                raise TypeError(f"entry_clip must be a number > 0 or None, got {type(entry_clip).__name__}")
            if not math.isfinite(entry_clip) or entry_clip <= 0:
                raise ValueError(
                    f"entry_clip must be a finite number > 0 (or None for no clipping), got {entry_clip!r}"
                )
            entry_clip = float(entry_clip)
        if kind == "skew_forward_kl":
            beta = skew
        elif kind == "skew_reverse_kl":
            beta = 1.0 - skew
        if kind in ("jsd", "skew_forward_kl", "skew_reverse_kl") and beta == 0.0:
            kind = "forward_kl"
        elif kind in ("jsd", "skew_forward_kl", "skew_reverse_kl") and beta == 1.0:
            kind = "reverse_kl"
        return cls(kind, beta, temperature, filter_eps, entry_clip, teacher_temperature)


def flatten(hidden: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] (a view when possible)."""
    return hidden.reshape(-1, hidden.shape[-1])
