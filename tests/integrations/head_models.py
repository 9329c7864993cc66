"""Tiny transformers causal LMs, one per architecture, for comparing opd_fast's heads and losses with the
models' own forward logits.

``build(name)`` returns ``(model, input_ids, attention_mask)``: a float32 model in eval mode with random
weights (seeded), hidden size 32, two layers, a vocabulary of 101 ids, and a batch of two rows of 7
tokens, the second right-padded. The head attributes that change the logits (softcap, scales, bias) are
set to values that change them a lot, and the lm_head weight is re-drawn so that logits have a standard
deviation of a few units (random init gives near-zero logits, on which a softcap or a scale barely acts):
a head read wrongly fails the comparison by far.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

VOCAB = 101
HIDDEN = 32

# Applied to the (text) config wherever the attribute exists: a tiny, fast model.
_TINY = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 48,
    "n_inner": 48,
    "ffn_dim": 48,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48}
_MLA = {  # multi-head latent attention (DeepSeek V2/V3, MiniCPM3)
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
}


@dataclass(frozen=True)
class Architecture:
    """A transformers causal LM class built from a tiny config.

    ``head`` holds the config attributes that change the output head, set to non-trivial values; the
    test checks that the plain projection h·Wᵀ differs from the model's logits whenever the forward
    applies them or the lm_head has a bias.
    """

    class_name: str
    model_type: str
    head: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # other overrides a tiny model of this type needs
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False  # the architecture's lm_head has a bias
    forward_ignores_head: bool = False  # the config sets ``head`` but the class's forward does not apply it


def _arch(class_name, model_type, **kwargs) -> tuple[str, Architecture]:
    return class_name, Architecture(class_name, model_type, **kwargs)


# The matrix of issue 18: every family TRL 1.16's DistillationTrainer special-cases that transformers
# builds from a config, and the common ones.
CORE = dict(
    [
        _arch("LlamaForCausalLM", "llama"),
        _arch("MistralForCausalLM", "mistral"),
        _arch("Qwen2ForCausalLM", "qwen2"),
        _arch("Qwen3ForCausalLM", "qwen3"),
        _arch("Qwen3MoeForCausalLM", "qwen3_moe"),
        _arch("GemmaForCausalLM", "gemma", tie_word_embeddings=True),
        _arch("Gemma2ForCausalLM", "gemma2", head={"final_logit_softcapping": 2.0}),
        _arch("Gemma3ForCausalLM", "gemma3_text", head={"final_logit_softcapping": 2.0}),
        _arch("CohereForCausalLM", "cohere", head={"logit_scale": 0.37}),
        _arch("Cohere2ForCausalLM", "cohere2", head={"logit_scale": 0.37}),
        _arch("GraniteForCausalLM", "granite", head={"logits_scaling": 2.5}),
        _arch("GraniteMoeForCausalLM", "granitemoe", head={"logits_scaling": 2.5}),
        _arch("HyperCLOVAXForCausalLM", "hyperclovax", head={"logits_scaling": 0.4}),
        _arch(
            "FalconH1ForCausalLM",
            "falcon_h1",
            head={"lm_head_multiplier": 0.45},
            config={
                "mamba_d_ssm": 32,
                "mamba_n_heads": 4,
                "mamba_d_head": 8,
                "mamba_d_state": 16,
                "mamba_chunk_size": 8,
            },
        ),
        _arch("MiniCPM3ForCausalLM", "minicpm3", head={"dim_model_base": 8}, config=_MLA),
        _arch("PhiForCausalLM", "phi", lm_head_bias=True),
        _arch("Phi3ForCausalLM", "phi3"),
        _arch("GPT2LMHeadModel", "gpt2", tie_word_embeddings=True),
        _arch("Olmo2ForCausalLM", "olmo2"),
        _arch("GPTNeoXForCausalLM", "gpt_neox"),
    ]
)


# Every other class LMHead.from_model accepts: each is compared with its forward too.
MORE = dict(
    [
        _arch("AfmoeForCausalLM", "afmoe"),
        _arch("ApertusForCausalLM", "apertus"),
        _arch("ArceeForCausalLM", "arcee"),
        _arch("BioGptForCausalLM", "biogpt"),
        _arch("BitNetForCausalLM", "bitnet"),
        _arch("BloomForCausalLM", "bloom"),
        _arch("CTRLLMHeadModel", "ctrl", lm_head_bias=True),
        _arch("CodeGenForCausalLM", "codegen", lm_head_bias=True, config={"rotary_dim": 4}),
        _arch("Cohere2MoeForCausalLM", "cohere2_moe", head={"logit_scale": 0.37}),
        _arch("DeepseekV2ForCausalLM", "deepseek_v2", config=_MLA),
        _arch("DeepseekV3ForCausalLM", "deepseek_v3", config={**_MLA, "n_group": 1, "topk_group": 1}),
        _arch("DiffLlamaForCausalLM", "diffllama"),
        _arch("Ernie4_5ForCausalLM", "ernie4_5"),
        _arch("Ernie4_5_MoeForCausalLM", "ernie4_5_moe"),
        _arch("Exaone4ForCausalLM", "exaone4"),
        _arch("FalconForCausalLM", "falcon"),
        _arch("GPTBigCodeForCausalLM", "gpt_bigcode"),
        _arch("GPTJForCausalLM", "gptj", lm_head_bias=True, config={"rotary_dim": 4}),
        _arch("GPTNeoForCausalLM", "gpt_neo", config={"attention_types": [[["global", "local"], 1]]}),
        _arch(
            "Gemma3ForConditionalGeneration",
            "gemma3",
            head={"final_logit_softcapping": 2.0},
            forward_ignores_head=True,  # transformers' Gemma3ForConditionalGeneration.forward never applies it
            config={"vision_config": {**_TINY_VISION, "image_size": 28, "patch_size": 14}, "mm_tokens_per_image": 4},
        ),
        _arch(
            "Gemma3nForCausalLM",
            "gemma3n_text",
            head={"final_logit_softcapping": 2.0},
            config={"num_kv_shared_layers": 0},
        ),
        _arch(
            "Gemma4ForConditionalGeneration",
            "gemma4",
            head={"final_logit_softcapping": 2.0},
            config={"vision_config": _TINY_VISION},
        ),
        _arch("Gemma4ForCausalLM", "gemma4_text", head={"final_logit_softcapping": 2.0}),
        _arch("Glm4ForCausalLM", "glm4"),
        _arch("Glm4MoeForCausalLM", "glm4_moe"),
        _arch("GlmForCausalLM", "glm"),
        _arch("GptOssForCausalLM", "gpt_oss"),
        _arch(
            "GraniteMoeHybridForCausalLM",
            "granitemoehybrid",
            head={"logits_scaling": 2.5},
            config={"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16},
        ),
        _arch("GraniteMoeSharedForCausalLM", "granitemoeshared", head={"logits_scaling": 2.5}),
        _arch("HeliumForCausalLM", "helium"),
        _arch(
            "JambaForCausalLM",
            "jamba",
            config={"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2},
        ),
        _arch("JetMoeForCausalLM", "jetmoe"),
        _arch("Mamba2ForCausalLM", "mamba2", config={"num_heads": 8, "head_dim": 8, "n_groups": 1, "state_size": 16}),
        _arch("MambaForCausalLM", "mamba"),
        _arch("MinistralForCausalLM", "ministral"),
        _arch("MixtralForCausalLM", "mixtral"),
        _arch("MptForCausalLM", "mpt"),
        _arch(
            "MuseGlimmerForConditionalGeneration",
            "muse_glimmer",
            head={"output_multiplier": 0.6, "final_logit_softcapping": 2.0},
            config={"vision_config": _TINY_VISION, "out_hidden_size": 32, "projector_hidden_size": 32},
        ),
        _arch("NanoChatForCausalLM", "nanochat", head={"final_logit_softcapping": 2.0}),
        _arch("NemotronForCausalLM", "nemotron"),
        _arch("OPTForCausalLM", "opt"),
        _arch("Olmo3ForCausalLM", "olmo3"),
        _arch("OlmoForCausalLM", "olmo"),
        _arch("OlmoeForCausalLM", "olmoe"),
        _arch("OpenAIGPTLMHeadModel", "openai-gpt"),
        _arch("PersimmonForCausalLM", "persimmon"),
        _arch("PhimoeForCausalLM", "phimoe"),
        _arch("Qwen2MoeForCausalLM", "qwen2_moe"),
        _arch("Qwen3NextForCausalLM", "qwen3_next", config={"layer_types": ["linear_attention", "full_attention"]}),
        _arch(
            "RecurrentGemmaForCausalLM",
            "recurrent_gemma",
            head={"logits_soft_cap": 2.0},
            config={"block_types": ["recurrent", "attention"], "lru_width": 32},
        ),
        _arch("SeedOssForCausalLM", "seed_oss"),
        _arch("SmolLM3ForCausalLM", "smollm3"),
        _arch("StableLmForCausalLM", "stablelm"),
        _arch("Starcoder2ForCausalLM", "starcoder2"),
        _arch("VaultGemmaForCausalLM", "vaultgemma", head={"final_logit_softcapping": 2.0}),
        _arch("XGLMForCausalLM", "xglm"),
        _arch("Lfm2ForCausalLM", "lfm2"),
        _arch("Gemma4UnifiedForCausalLM", "gemma4_unified_text", head={"final_logit_softcapping": 2.0}),
        _arch("BeamForCausalLM", "beam", head={"final_logit_softcapping": 2.0}),
        _arch("Inkling2ForCausalLM", "inkling2_text", head={"final_logit_softcapping": 2.0}),
        _arch(
            "MuseSparkForConditionalGeneration",
            "muse_spark",
            head={"output_multiplier": 0.6, "final_logit_softcapping": 2.0},
            config={
                "vision_config": _TINY_VISION,
                "audio_config": {
                    "num_hidden_layers": 1,
                    "patch_sizes": (4,),
                    "hidden_sizes": (16,),
                    "depths": (1,),
                    "out_hidden_size": 32,
                },
            },
        ),
        _arch("MiniMaxForCausalLM", "minimax"),
        _arch("Ministral3ForCausalLM", "ministral3"),
        _arch(
            "BambaForCausalLM",
            "bamba",
            config={"attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16},
        ),
        _arch("NemotronHForCausalLM", "nemotron_h"),
    ]
)

# Causal LMs whose head is not softcap(scale·(h·Wᵀ + b)): LMHead.from_model must refuse them, naming the module.
REFUSED = dict(
    [
        _arch("BertLMHeadModel", "bert", config={"is_decoder": True}),  # cls: dense + gelu + LayerNorm first
        _arch("RobertaForCausalLM", "roberta", config={"is_decoder": True}),  # lm_head: the same transform
    ]
)


def config(name: str):
    """The tiny transformers config of architecture ``name`` (a class name)."""
    import transformers

    arch = ARCHITECTURES[name] if name in ARCHITECTURES else REFUSED[name]
    config_class = transformers.CONFIG_MAPPING[arch.model_type]
    overrides = {**arch.config, "tie_word_embeddings": arch.tie_word_embeddings}
    if "text_config" not in _fields(config_class):
        return config_class(**{**_tiny(config_class), **overrides, **arch.head})
    # Multimodal: the head's attributes live on the text config.
    text_class = type(config_class().get_text_config())
    text = {**_tiny(text_class), **arch.config.get("text_config", {}), **arch.head}
    return config_class(**{**overrides, "text_config": {**text, "tie_word_embeddings": arch.tie_word_embeddings}})


def build(name: str, seed: int = 0):
    """``(model, input_ids [2, 7], attention_mask [2, 7])`` for architecture ``name`` (a class name)."""
    import transformers

    arch = ARCHITECTURES[name] if name in ARCHITECTURES else REFUSED[name]
    torch.manual_seed(seed)
    model = getattr(transformers, arch.class_name)(config(name)).float().eval()
    _spread_logits(model)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return model, input_ids, attention_mask


def _fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _tiny(config_class) -> dict:
    """The tiny sizes among this config class's fields."""
    fields = _fields(config_class)
    return {key: value for key, value in _TINY.items() if key in fields}


@torch.no_grad()
def _spread_logits(model) -> None:
    """Logits of std ≈ 3 on unit-scale hidden states, and a bias of std 1 where the head has one."""
    head = model.get_output_embeddings()
    head.weight.normal_(0.0, 3.0 / head.weight.shape[1] ** 0.5)
    if head.bias is not None:
        head.bias.normal_(0.0, 1.0)


ARCHITECTURES: dict[str, Architecture] = {**CORE, **MORE}
