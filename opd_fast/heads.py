"""The output head of a causal LM: everything between the final hidden state and the logits.

The losses used to assume ``logits = h·Wᵀ``. Real models do more after the last hidden state (a bias,
a scale, a tanh soft-cap), and reading only ``get_output_embeddings().weight`` silently computes another
distribution for them. :class:`LMHead` states the whole head, and :meth:`LMHead.from_model` reads it
from a transformers causal LM, refusing what is not of that form.

The transformation, in this order (the order every transformers ``forward`` applies; ``generate``'s
temperature warper then divides the final logits, as the losses do)::

    a = h·Wᵀ + b                       (nn.Linear; b = 0 without a bias)
    y = scale · a                      (Cohere logit_scale, 1/Granite logits_scaling, Falcon-H1 ...)
    z = softcap · tanh(y / softcap)    (Gemma 2/3/3n/4 final_logit_softcapping; z = y when softcap is None)
    log p = log_softmax(z / τ)         (τ = the losses' temperature, applied last)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from opd_fast._validation import CheckedHead, check_tensor, check_weight
from opd_fast.types import accumulation_dtype


@dataclass(frozen=True, eq=False)
class LMHead(CheckedHead):
    """An lm_head: ``z = softcap · tanh(scale · (h·Wᵀ + b) / softcap)`` (no tanh when softcap is None).

    Args:
        weight: [V, H] floating tensor, the vocabulary projection (kept as given: gradients reach it).
        bias: [V] floating tensor on the weight's device, or None.
        scale: finite number > 0 multiplying ``h·Wᵀ + b``. Positive because every transformers model's
            scale is, and because then the whole head is strictly increasing in ``h·Wᵀ + b``: ranking
            tokens (top-k, running maxima) on ``h·Wᵀ + b`` ranks them on z. A head with a negative
            scale s is ``LMHead(-weight, -bias, -s)``.
        softcap: finite number > 0, or None for no soft-cap. Applied after the scale.

    The losses' temperature τ divides z after all of this: ``log p = log_softmax(z / τ)``.
    The tensors are stored as given, never copied, so one LMHead is a view of the model's parameters
    (tied embeddings included); build it where it is used (it is cheap) rather than caching it across
    changes of the model (a peft adapter switched, a module replaced).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        weight = check_weight("LMHead weight", self.weight, shard=True)
        if self.bias is not None:
            bias = check_tensor("LMHead bias", self.bias)
            if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"LMHead bias must be 1-D with one entry per vocabulary row ({weight.shape[0]}, the weight's "
                    f"first dimension), got shape {tuple(bias.shape)}; pass the lm_head's own bias"
                )
            if bias.device != weight.device:
                raise ValueError(
                    f"LMHead bias is on {bias.device} but the weight is on {weight.device}; move them to one device"
                )
        object.__setattr__(self, "scale", _positive_number("LMHead scale", self.scale, "1.0 for no scaling"))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", _positive_number("LMHead softcap", self.softcap, "None for no cap"))

    def __repr__(self) -> str:
        def describe(t):
            return None if t is None else f"[{', '.join(map(str, t.shape))}] {t.dtype} on {t.device}"

        tensors = f"weight={describe(self.weight)}, bias={describe(self.bias)}"
        return f"LMHead({tensors}, scale={self.scale}, softcap={self.softcap})"

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialized logits z [..., V] of ``hidden`` [..., H], before any temperature.

        The readable reference of what the fused kernels compute without materializing it. Computed in
        float32, or float64 when any input is float64, whatever the input dtype.
        """
        hidden = check_tensor("hidden", hidden)
        if hidden.dim() < 1 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden must have shape [..., {self.hidden_size}] (the head's hidden size), got "
                f"{tuple(hidden.shape)}; pass the final hidden states of the model this head belongs to"
            )
        if hidden.device != self.weight.device:
            raise ValueError(f"hidden is on {hidden.device} but the head is on {self.weight.device}; move one of them")
        dtype = accumulation_dtype(hidden.dtype, self.weight.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        z = torch.nn.functional.linear(hidden.to(dtype), self.weight.to(dtype), bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def vocab_slice(self, start: int, stop: int) -> LMHead:
        """The head restricted to vocabulary rows [start, stop): views of the weight and bias, same scale and
        softcap. For padded heads (``head.vocab_slice(0, len(tokenizer))``) and vocabulary shards."""
        if not 0 <= start <= stop <= self.vocab_size:
            raise ValueError(
                f"vocab_slice({start}, {stop}) must satisfy 0 <= start <= stop <= {self.vocab_size} (the head's rows)"
            )
        bias = None if self.bias is None else self.bias[start:stop]
        return LMHead(self.weight[start:stop], bias, self.scale, self.softcap)

    def detach(self) -> LMHead:
        """The same head on detached tensors (e.g. a frozen teacher's, or for metrics without gradients)."""
        bias = None if self.bias is None else self.bias.detach()
        return LMHead(self.weight.detach(), bias, self.scale, self.softcap)

    @classmethod
    def from_model(cls, model) -> LMHead:
        """The head of a transformers causal LM (peft-wrapped too), read as its ``forward`` applies it.

        Reads the module the forward applies to the final hidden state (``lm_head``, ``output_projection``) and
        the attributes the forward reads after it: ``final_logit_softcapping`` (Gemma 2/3/3n/4, VaultGemma,
        nanochat, Beam, Inkling2), ``logit_scale`` (Cohere, Cohere2: multiplies), ``logits_scaling`` (Granite,
        Granite-MoE: divides; HyperCLOVA X: multiplies; MiniCPM3 divides the hidden states by it),
        ``lm_head_multiplier`` (Falcon-H1), ``output_multiplier`` then the softcap (Muse Glimmer, Muse Spark),
        ``logits_soft_cap`` (RecurrentGemma), the lm_head bias (Phi ...) and tied embeddings (GPT-2 ...).
        What a class's forward does not apply is not read: Gemma3ForConditionalGeneration ignores
        ``text_config.final_logit_softcapping`` (transformers 5.x), so its head has no softcap.
        Tensor-parallel DTensor heads are gathered with ``full_tensor()`` (a collective: call it on every
        rank; gradients flow back through it, as the same on every rank); an FSDP2 model's head is taken as
        FSDP holds it: gathered during and after the root's forward, and a shard (DTensor) is refused, since
        its data-parallel gradient must be averaged over the ranks (use
        :func:`opd_fast.integrations.fsdp.gathered_head`). torch.distributed's own hooks on the head (they move
        values, never change them) are allowed, any other forward hook is refused. A peft
        ``modules_to_save`` copy of the head is read where the wrapper's forward would route.

        Only the model classes whose forward opd_fast's tests compare against :meth:`logits` are accepted
        (:func:`opd_fast.integrations.transformers.supported_model_classes`); everything else raises ValueError
        naming the model class and the attribute: heads that are not an ``nn.Linear`` (a transform before the
        projection, several heads, a LoRA adapter on the head), forward hooks on the head, offloaded (meta)
        weights, learned or invalid scales, and model classes whose forward has not been verified. For those,
        read the model's forward and build ``LMHead(weight, bias, scale, softcap)`` yourself.
        """
        # The transformers-specific reading sits in the integration, above this core (it imports LMHead).
        from opd_fast.integrations.transformers import read_head

        return read_head(cls, model)


def _positive_number(name: str, value: object, none_hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__} {value!r}; pass float(...)")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 ({none_hint}), got {value!r}")
    return value
