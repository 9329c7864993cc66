"""transformers causal LMs: their final hidden states, and their output heads as their forwards apply them.

Everything opd_fast knows about transformers' model classes is here: which classes' heads
:meth:`opd_fast.LMHead.from_model` reads and how (the head-family table, each family read in transformers'
modeling source and compared by tests/integrations/test_heads.py with the model's own forward logits), peft
wrappers (the base model, a ``modules_to_save`` copy of the head, a refused adapter on it) and FSDP2 (a sharded
head gathered or refused; the hidden states through the root's forward). transformers itself is imported only to
identify a model's class: a model that is not a transformers class is refused with a message, whether
transformers is installed or not.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # read_head builds the class it is given: heads imports this module, not the other way
    from opd_fast.heads import LMHead


def causal_lm(model):
    """The transformers model under a peft wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_fsdp_sharded(model) -> bool:
    """Whether ``model`` is an FSDP2 root (``fully_shard`` applied to the model itself)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def final_hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, require_fsdp: bool = False
) -> torch.Tensor:
    """[B, T, H] final hidden states (after the final norm; the lm_head is not applied: the fused losses apply it)
    of a transformers causal LM, peft-wrapped too. Differentiable.

    An FSDP2 root (:func:`opd_fast.integrations.fsdp.fully_shard_causal_lm`) runs the decoder inside the root's
    forward, so FSDP gathers the embeddings and reduce-scatters their gradients; ``require_fsdp`` refuses any
    other model (where a plain one is a mistake: the FSDP integration's entry point)."""
    if not is_fsdp_sharded(model):
        if require_fsdp:
            raise ValueError(
                "final_hidden_states takes a model sharded by fully_shard_causal_lm, got a plain "
                f"{type(model).__name__}"
            )
        decoder = causal_lm(model).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    decoder = model.get_decoder()

    def decoder_forward(input_ids, attention_mask):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    # FSDP's hooks are module hooks around ``model.forward``: an instance attribute of that name runs in its
    # place, between the root's pre-forward (all-gather) and post-forward (backward hooks) hooks.
    model.forward = decoder_forward
    try:
        return model(input_ids, attention_mask)
    finally:
        del model.forward


def supported_model_classes() -> tuple[str, ...]:
    """The transformers model class names :meth:`opd_fast.LMHead.from_model` accepts (those installed or not)."""
    return tuple(sorted(_FAMILIES))


def read_head(cls: type[LMHead], model, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LMHead:
    """:meth:`LMHead.from_model` (``cls``: the class it was called on) with ``gather`` turning the module's weight
    and bias (DTensor shards under FSDP2 or tensor parallelism) into the plain tensors the head holds. The default
    gathers a tensor-parallel DTensor once (its gradient the same on every rank) and refuses an FSDP2 shard;
    :mod:`opd_fast.integrations.fsdp` passes its own, whose gradients are averaged over the data-parallel ranks."""
    if gather is None:
        gather = _refuse_fsdp_shard if _has_fsdp_module(model) else _gathered
    lm = causal_lm(model)
    name, (read_family, module_path) = _family(lm)
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
    scale, softcap = read_family(lm, name, bias)
    try:
        return cls(weight, bias, scale, softcap)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}.{module_path}: {exc}") from None


# The head families. Each was read in transformers' modeling source (the lines of its *ForCausalLM.forward between
# the decoder's output and the loss) and is compared by tests/integrations/test_heads.py with the model's own
# forward logits. A reader returns (scale, softcap).


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
        "opd_fast.integrations.transformers.supported_model_classes()), so it cannot tell what the forward does "
        "after the final hidden state; unwrap wrappers first (DistributedDataParallel: model.module, torch.compile: "
        "model._orig_mod), or read the forward and build LMHead(weight, bias, scale, softcap) yourself"
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


def _has_fsdp_module(model) -> bool:
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
