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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd_fast._validation import check_tensor, check_weight


@dataclass(frozen=True, eq=False)
class LMHead:
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
        dtype = torch.float64 if torch.float64 in (hidden.dtype, self.weight.dtype) else torch.float32
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
        (:func:`supported_model_classes`); everything else raises ValueError naming the model class and
        the attribute: heads that are not an ``nn.Linear`` (a transform before the projection, several
        heads, a LoRA adapter on the head), forward hooks on the head, offloaded (meta) weights, learned or
        invalid scales, and model classes whose forward has not been verified. For those, read the model's
        forward and build ``LMHead(weight, bias, scale, softcap)`` yourself.
        """
        return _read_head(cls, model, _gathered if not _fsdp_sharded(model) else _refuse_fsdp_shard)


def _read_head(cls, model, gather: Callable[[torch.Tensor], torch.Tensor]) -> LMHead:
    """:meth:`LMHead.from_model` with ``gather`` turning the module's weight and bias (DTensor shards under
    FSDP2 or tensor parallelism) into the plain tensors the head holds; :mod:`opd_fast.integrations.fsdp`
    passes its own, whose gradients are averaged over the data-parallel ranks."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    name, (read_head, module_path) = _family(lm)
    module = _resolve_peft(_attribute(lm, module_path))
    if _is_peft_adapter(module):
        raise ValueError(
            f"{name}.{module_path} carries a peft adapter ({type(module).__module__}.{type(module).__qualname__}): "
            "its output is h·Wᵀ + b plus the adapter's own term (LoRA: s·B·A·dropout(h)), not one projection "
            "opd_fast can stream; leave the lm_head out of target_modules, or merge the adapter first "
            "(merge_and_unload())"
        )
    if _module_class(module) is not torch.nn.Linear:
        raise ValueError(
            f"{name}.{module_path} is a {type(module).__module__}.{type(module).__qualname__}, not a "
            "torch.nn.Linear: its output is not h·Wᵀ + b for one weight W, so opd_fast cannot compute it "
            "exactly (if it does compute h·Wᵀ + b, build LMHead(weight, bias, scale, softcap) yourself)"
        )
    hooks = [h for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()) if not _moves_only(h)]
    if hooks or "forward" in vars(module) or hasattr(module, "_hf_hook"):
        what = ", ".join(repr(h) for h in hooks) or "a replaced forward (e.g. accelerate's device hooks)"
        raise ValueError(
            f"{name}.{module_path} has forward hooks ({what}) that may change its output; opd_fast reads only "
            "the weight and bias: remove the hooks (or, with accelerate, load the model without device_map "
            "offloading) before LMHead.from_model"
        )
    weight, bias = gather(module.weight), None if module.bias is None else gather(module.bias)
    for tensor, what in ((weight, "weight"), (bias, "bias")):
        if tensor is not None and tensor.device.type == "meta":
            raise ValueError(
                f"{name}.{module_path}.{what} is on the meta device (offloaded or not loaded); load the model "
                "with its weights in memory (no device_map offloading) before LMHead.from_model"
            )
    scale, softcap = read_head(lm, name, bias)
    try:
        return cls(weight, bias, scale, softcap)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}.{module_path}: {exc}") from None


def supported_model_classes() -> tuple[str, ...]:
    """The transformers model class names :meth:`LMHead.from_model` accepts (those installed or not)."""
    return tuple(sorted(_FAMILIES))


def _positive_number(name: str, value: object, none_hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__} {value!r}; pass float(...)")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 ({none_hint}), got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Reading heads from transformers models. Each family below was read in transformers' modeling source
# (the lines of its *ForCausalLM.forward between the decoder's output and the loss) and is compared by
# tests/test_heads.py with the model's own forward logits. A reader returns (scale, softcap).


def _attribute(lm, path: str) -> object:
    value = lm
    for part in path.split("."):
        if part == "get_text_config()":
            value = value.get_text_config()
            continue
        if not hasattr(value, part):
            raise ValueError(
                f"{type(lm).__name__}.{path} does not exist, but this model's forward reads it; "
                "the model is not the transformers class opd_fast verified"
            )
        value = getattr(value, part)
    return value


def _number(lm, name: str, path: str, *, optional: bool = False) -> float | None:
    """A config value or module attribute the forward multiplies or divides the logits by."""
    value = _attribute(lm, path)
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise ValueError(
                f"{name}.{path} is a tensor of shape {tuple(value.shape)} (requires_grad={value.requires_grad}); "
                "LMHead takes a fixed number: a learned or per-token scale cannot be represented"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name}.{path} is {value!r}; the forward applies it to the logits, and LMHead needs a finite number > 0 "
            "there (fix the model's config)"
        )
    return float(value)


def _plain(lm, name: str, bias) -> tuple[float, float | None]:
    return 1.0, None


def _reader(*, scale: str | None = None, divide: bool = False, softcap: str | None = None, softcap_optional=True):
    """A reader for ``softcap(s·(h·Wᵀ + b))`` with s = the attribute at ``scale`` (or its inverse when
    ``divide``) and the cap at ``softcap`` (applied only when not None, if ``softcap_optional``)."""

    def read(lm, name: str, bias) -> tuple[float, float | None]:
        s = 1.0 if scale is None else _number(lm, name, scale)
        cap = None if softcap is None else _number(lm, name, softcap, optional=softcap_optional)
        return (1.0 / s if divide else s), cap

    return read


def _minicpm3(lm, name: str, bias) -> tuple[float, float | None]:
    # The forward divides the hidden states, not the logits: (h/s)·Wᵀ = (h·Wᵀ)/s only without a bias.
    if bias is not None:
        raise ValueError(
            f"{name}.lm_head has a bias, but {name}.forward divides the hidden states by config.logits_scaling "
            "before it: (h/s)·Wᵀ + b is not of the form scale·(h·Wᵀ + b)"
        )
    return 1.0 / _number(lm, name, "config.logits_scaling"), None


_SOFTCAP = _reader(softcap="config.final_logit_softcapping")
_TEXT_SOFTCAP = _reader(softcap="config.get_text_config().final_logit_softcapping")
_COHERE = _reader(scale="logit_scale")
_GRANITE = _reader(scale="config.logits_scaling", divide=True)

# class name -> (reader, the attribute the forward applies to the final hidden state)
_FAMILIES: dict[str, tuple[Callable, str]] = {
    **{
        name: (_plain, "lm_head")
        for name in (
            "AfmoeForCausalLM",
            "ApertusForCausalLM",
            "ArceeForCausalLM",
            "BitNetForCausalLM",
            "BambaForCausalLM",
            "BloomForCausalLM",
            "CodeGenForCausalLM",
            "CTRLLMHeadModel",
            "DeepseekV2ForCausalLM",
            "DeepseekV3ForCausalLM",
            "DiffLlamaForCausalLM",
            "Ernie4_5ForCausalLM",
            "Ernie4_5_MoeForCausalLM",
            "Exaone4ForCausalLM",
            "FalconForCausalLM",
            "GemmaForCausalLM",
            "Glm4ForCausalLM",
            "Glm4MoeForCausalLM",
            "GlmForCausalLM",
            "GPT2LMHeadModel",
            "GPTBigCodeForCausalLM",
            "GPTJForCausalLM",
            "GPTNeoForCausalLM",
            "GptOssForCausalLM",
            "HeliumForCausalLM",
            "JambaForCausalLM",
            "JetMoeForCausalLM",
            "LlamaForCausalLM",
            "Lfm2ForCausalLM",
            "MambaForCausalLM",
            "Mamba2ForCausalLM",
            "MiniMaxForCausalLM",
            "MinistralForCausalLM",
            "Ministral3ForCausalLM",
            "MistralForCausalLM",
            "MixtralForCausalLM",
            "MptForCausalLM",
            "NemotronForCausalLM",
            "NemotronHForCausalLM",
            "OlmoForCausalLM",
            "Olmo2ForCausalLM",
            "Olmo3ForCausalLM",
            "OlmoeForCausalLM",
            "OpenAIGPTLMHeadModel",
            "OPTForCausalLM",
            "PersimmonForCausalLM",
            "PhiForCausalLM",
            "Phi3ForCausalLM",
            "PhimoeForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen2MoeForCausalLM",
            "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM",
            "Qwen3NextForCausalLM",
            "SeedOssForCausalLM",
            "SmolLM3ForCausalLM",
            "StableLmForCausalLM",
            "Starcoder2ForCausalLM",
            "XGLMForCausalLM",
        )
    },
    "GPTNeoXForCausalLM": (_plain, "lm_head"),
    "BioGptForCausalLM": (_plain, "output_projection"),
    "Gemma2ForCausalLM": (_SOFTCAP, "lm_head"),
    "Gemma3ForCausalLM": (_SOFTCAP, "lm_head"),
    "Gemma3nForCausalLM": (_SOFTCAP, "lm_head"),
    "Gemma4ForCausalLM": (_SOFTCAP, "lm_head"),
    "Gemma4UnifiedForCausalLM": (_SOFTCAP, "lm_head"),
    "BeamForCausalLM": (_SOFTCAP, "lm_head"),
    "Inkling2ForCausalLM": (_reader(softcap="logit_softcap.softcap", softcap_optional=False), "lm_head"),
    "VaultGemmaForCausalLM": (_SOFTCAP, "lm_head"),
    "NanoChatForCausalLM": (_SOFTCAP, "lm_head"),
    "Gemma3ForConditionalGeneration": (_plain, "lm_head"),  # never applies text_config.final_logit_softcapping
    "Gemma4ForConditionalGeneration": (_TEXT_SOFTCAP, "lm_head"),
    "CohereForCausalLM": (_COHERE, "lm_head"),
    "Cohere2ForCausalLM": (_COHERE, "lm_head"),
    "Cohere2MoeForCausalLM": (_COHERE, "lm_head"),
    "GraniteForCausalLM": (_GRANITE, "lm_head"),
    "GraniteMoeForCausalLM": (_GRANITE, "lm_head"),
    "GraniteMoeSharedForCausalLM": (_GRANITE, "lm_head"),
    "GraniteMoeHybridForCausalLM": (_GRANITE, "lm_head"),
    "HyperCLOVAXForCausalLM": (_reader(scale="config.logits_scaling"), "lm_head"),
    "FalconH1ForCausalLM": (_reader(scale="model.lm_head_multiplier"), "lm_head"),
    "MiniCPM3ForCausalLM": (_minicpm3, "lm_head"),
    "MuseGlimmerForConditionalGeneration": (
        _reader(
            scale="config.text_config.output_multiplier",
            softcap="config.text_config.final_logit_softcapping",
            softcap_optional=False,
        ),
        "lm_head",
    ),
    "MuseSparkForConditionalGeneration": (
        _reader(
            scale="config.text_config.output_multiplier",
            softcap="config.text_config.final_logit_softcapping",
            softcap_optional=False,
        ),
        "lm_head",
    ),
    "RecurrentGemmaForCausalLM": (_reader(softcap="config.logits_soft_cap", softcap_optional=False), "lm_head"),
}

# Causal LMs whose head cannot be written as softcap(scale·(h·Wᵀ + b)): refused with the reason.
_TRANSFORM = "a dense layer, an activation and a LayerNorm transform the final hidden state before the projection"
_REFUSED: dict[str, tuple[str, str]] = {
    **{
        name: ("cls", _TRANSFORM)
        for name in (
            "BertLMHeadModel",
            "BigBirdForCausalLM",
            "ErnieForCausalLM",
            "MegatronBertForCausalLM",
            "RemBertForCausalLM",
            "RoCBertForCausalLM",
            "RoFormerForCausalLM",
        )
    },
    **{
        name: ("lm_head", _TRANSFORM)
        for name in (
            "CamembertForCausalLM",
            "Data2VecTextForCausalLM",
            "RobertaForCausalLM",
            "RobertaPreLayerNormForCausalLM",
            "XLMRobertaForCausalLM",
            "XLMRobertaXLForCausalLM",
            "XmodForCausalLM",
        )
    },
    "ElectraForCausalLM": ("generator_predictions", _TRANSFORM),
    "ModernBertDecoderForCausalLM": ("lm_head", _TRANSFORM),
    "MusicgenForCausalLM": ("lm_heads", "one head per audio codebook: the logits are not one vocabulary projection"),
    "MusicgenMelodyForCausalLM": ("lm_heads", "one head per audio codebook: the logits are not one projection"),
    "ProphetNetForCausalLM": ("lm_head", "the logits come from n-gram prediction streams, not the final hidden state"),
    "XLMWithLMHeadModel": ("pred_layer", "the prediction layer may be an adaptive softmax"),
    "Gemma4AssistantForCausalLM": ("masked_embedding", "the logits are a masked, ordered embedding lookup"),
}


def _family(lm) -> tuple[str, tuple[Callable, str]]:
    """The verified transformers class ``lm`` is (or subclasses without overriding forward)."""
    try:
        import transformers
    except ImportError:
        transformers = None
    cls = type(lm)
    for klass in cls.__mro__:
        name = klass.__name__
        known = name in _FAMILIES or name in _REFUSED
        if not known or transformers is None or getattr(transformers, name, None) is not klass:
            continue
        if name in _REFUSED:
            attribute, reason = _REFUSED[name]
            raise ValueError(
                f"{name}.{attribute}: {reason}; its logits are not of the form softcap(scale·(h·Wᵀ + b)), which is "
                "all opd_fast's fused losses compute"
            )
        if cls.forward is not klass.forward:
            raise ValueError(
                f"{cls.__name__}.forward overrides {name}.forward, so opd_fast cannot tell what it does after the "
                f"final hidden state; read it and build LMHead(weight, bias, scale, softcap) yourself"
            )
        return name, _FAMILIES[name]
    raise ValueError(
        f"{cls.__module__}.{cls.__qualname__}.forward is not one opd_fast has verified (no transformers class among "
        "opd_fast.heads.supported_model_classes()), so it cannot tell what the forward does after the final hidden "
        "state; unwrap wrappers first (DistributedDataParallel: model.module, torch.compile: model._orig_mod), or "
        "read the forward and build LMHead(weight, bias, scale, softcap) yourself"
    )


def _is_peft_adapter(module) -> bool:
    return type(module).__module__.startswith("peft.")


def _resolve_peft(module):
    """The module a peft ``modules_to_save`` wrapper routes to, as its forward decides; other modules as given."""
    if type(module).__name__ != "ModulesToSaveWrapper" or not _is_peft_adapter(module):
        return module
    active = module.active_adapters
    if module.disable_adapters or not active or any(a not in module.modules_to_save for a in active):
        return module.original_module
    return module.modules_to_save[active[0]]


def _moves_only(hook) -> bool:
    """torch.distributed's own hooks (FSDP2 unsharding, tensor-parallel input/output layouts) change where the
    values live, never the values; any other hook could change the logits."""
    function = getattr(hook, "func", hook)  # functools.partial
    function = getattr(function, "__func__", function)  # bound method
    return (getattr(function, "__module__", None) or "").startswith("torch.distributed.")


def _module_class(module: torch.nn.Module) -> type:
    """The module's class; for a module FSDP2 sharded on its own (``fully_shard`` makes its class a subclass
    ``FSDP<Class>`` of FSDPModule and the original, with the same forward), the original class."""
    cls = type(module)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
            return cls.__bases__[1]
    return cls


def _fsdp_sharded(model) -> bool:
    """Whether FSDP2 (``fully_shard``) manages any of the model's modules."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _refuse_fsdp_shard(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 model's head: plain where FSDP holds it gathered (inside or after the root's forward); a shard
    is refused, since :func:`_gathered` treats its gradient as the same on every rank (tensor parallelism)
    while under FSDP every rank's differs and must be summed."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        raise ValueError(
            "the lm_head is an FSDP2 shard (a DTensor): LMHead.from_model's gather would give each rank only its "
            "own batch's gradient of its rows, not the average over ranks; use "
            "opd_fast.integrations.fsdp.gathered_head(model) (or fsdp_linear_divergence) instead"
        )
    return tensor


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP2, tensor parallel) is gathered once, differentiably."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor
