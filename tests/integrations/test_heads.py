"""LMHead and LMHead.from_model: the head read from each transformers causal LM reproduces the model's own
forward logits from opd_fast's final hidden states; what cannot be represented is refused by name."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import rel_err

import opd_fast
from opd_fast.heads import LMHead

transformers = pytest.importorskip("transformers")
head_models = pytest.importorskip("head_models")
from opd_fast.integrations.transformers import final_hidden_states, supported_model_classes  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def built():
    """``built(name)``: (model, input_ids, attention_mask), each architecture built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            arch = head_models.ARCHITECTURES.get(name) or head_models.REFUSED[name]
            if not hasattr(transformers, arch.class_name):
                pytest.skip(f"transformers {transformers.__version__} has no {arch.class_name}")
            cache[name] = head_models.build(name)
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------- LMHead


def _head_inputs(vocab=11, hidden=6, dtype=torch.float64):
    return (
        torch.randn(3, 2, hidden, dtype=dtype),
        torch.randn(vocab, hidden, dtype=dtype),
        torch.randn(vocab, dtype=dtype),
    )


def test_lmhead_is_exported():
    assert opd_fast.LMHead is LMHead
    assert "LMHead" in opd_fast.__all__


def test_logits_order_bias_scale_softcap_then_temperature():
    """z = c·tanh(s·(h·Wᵀ + b)/c): bias inside the scale, the cap after it; the temperature divides z."""
    h, w, b = _head_inputs()
    s, c = 2.5, 1.5
    a = h @ w.T + b
    expected = c * torch.tanh(s * a / c)
    z = LMHead(w, b, s, c).logits(h)
    assert rel_err(z, expected) < 1e-14
    # Every other order gives another number, so the check above pins the order down.
    for other in (c * torch.tanh(s * (h @ w.T) / c) + b, s * c * torch.tanh(a / c), c * torch.tanh(a / c) * s + b):
        assert rel_err(other, expected) > 1e-2
    assert rel_err(LMHead(w, b).logits(h), a) < 1e-14
    assert rel_err(LMHead(w, None, s).logits(h), s * (h @ w.T)) < 1e-14


def test_logits_gradients_flow_through_tanh_scale_bias_and_weight():
    h, w, b = (t.requires_grad_() for t in _head_inputs(vocab=5, hidden=3))
    assert torch.autograd.gradcheck(lambda h, w, b: LMHead(w, b, 0.7, 1.3).logits(h), (h, w, b))


def test_logits_dtype_and_no_copies():
    h, w, b = _head_inputs(dtype=torch.bfloat16)
    head = LMHead(w, b)
    assert head.weight is w and head.bias is b
    assert head.logits(h).dtype == torch.float32
    assert LMHead(w.double()).logits(h).dtype == torch.float64
    assert (head.vocab_size, head.hidden_size) == (11, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.scale = 2.0


def test_vocab_slice_is_a_view_with_the_same_transform():
    h, w, b = _head_inputs()
    head = LMHead(w, b, 0.5, 3.0)
    part = head.vocab_slice(2, 9)
    assert part.weight.data_ptr() == w[2].data_ptr() and part.bias.data_ptr() == b[2].data_ptr()
    assert (part.scale, part.softcap) == (0.5, 3.0)
    assert rel_err(part.logits(h), head.logits(h)[..., 2:9]) < 1e-14
    assert head.vocab_slice(4, 4).vocab_size == 0
    with pytest.raises(ValueError, match=r"vocab_slice\(3, 12\)"):
        head.vocab_slice(3, 12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": [[1.0]]}, TypeError, "LMHead weight must be a torch.Tensor"),
        ({"weight": torch.ones(3)}, ValueError, r"LMHead weight must be 2-D \[V, H\]"),
        ({"weight": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "LMHead weight must be a floating-point"),
        ({"bias": torch.ones(4)}, ValueError, "LMHead bias must be 1-D with one entry per vocabulary row"),
        ({"bias": torch.ones(3, 1)}, ValueError, "LMHead bias must be 1-D"),
        ({"bias": torch.ones(3, dtype=torch.int32)}, TypeError, "LMHead bias must be a floating-point"),
        ({"bias": torch.ones(3, device="meta")}, ValueError, "LMHead bias is on meta but the weight is on cpu"),
        ({"scale": 0.0}, ValueError, r"LMHead scale must be a finite number > 0 \(1.0 for no scaling\)"),
        ({"scale": -2.0}, ValueError, "LMHead scale must be a finite number > 0"),
        ({"scale": math.inf}, ValueError, "LMHead scale must be a finite number > 0"),
        ({"scale": math.nan}, ValueError, "LMHead scale must be a finite number > 0"),
        ({"scale": True}, TypeError, "LMHead scale must be a Python number"),
        ({"scale": torch.tensor(2.0)}, TypeError, r"LMHead scale must be a Python number.*float\(\.\.\.\)"),
        ({"softcap": 0.0}, ValueError, r"LMHead softcap must be a finite number > 0 \(None for no cap\)"),
        ({"softcap": -30.0}, ValueError, "LMHead softcap must be a finite number > 0"),
        ({"softcap": math.inf}, ValueError, "LMHead softcap must be a finite number > 0"),
        ({"softcap": "30"}, TypeError, "LMHead softcap must be a Python number"),
    ],
)
def test_bad_heads_are_refused_by_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        LMHead(**{"weight": torch.ones(3, 2), **kwargs})


def test_detach_and_repr():
    h, w, b = (t.requires_grad_() for t in _head_inputs())
    head = LMHead(w, b, 0.5, 3.0)
    frozen = head.detach()
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    assert frozen.weight.data_ptr() == w.data_ptr() and (frozen.scale, frozen.softcap) == (0.5, 3.0)
    assert rel_err(frozen.logits(h), head.logits(h)) == 0
    assert repr(head) == (
        "LMHead(weight=[11, 6] torch.float64 on cpu, bias=[11] torch.float64 on cpu, scale=0.5, softcap=3.0)"
    )


def test_numbers_are_stored_as_floats():
    head = LMHead(torch.ones(3, 2), scale=2, softcap=30)
    assert type(head.scale) is float and type(head.softcap) is float


def test_logits_rejects_mismatched_hidden():
    with pytest.raises(ValueError, match=r"hidden must have shape \[\.\.\., 2\]"):
        LMHead(torch.ones(3, 2)).logits(torch.ones(4, 5))


# ------------------------------------------------------------------------- the architecture matrix


def _check_matches_forward(model, input_ids, attention_mask, arch):
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = final_hidden_states(model, input_ids, attention_mask)
        head = LMHead.from_model(model)
        logits = head.logits(hidden)
        plain = hidden @ head.weight.T
    assert logits.shape == expected.shape
    assert rel_err(logits, expected) <= TOL, arch.class_name
    # The head values the builder set must matter, or the comparison above proves nothing.
    applied = bool(arch.head) and not arch.forward_ignores_head
    assert (head.scale != 1.0 or head.softcap is not None) == applied
    assert (head.bias is not None) == arch.lm_head_bias
    if applied or arch.lm_head_bias:
        assert rel_err(plain, expected) > 1e-2
    return head


@pytest.mark.parametrize("name", list(head_models.CORE))
def test_head_reproduces_forward_logits(built, name):
    model, input_ids, attention_mask = built(name)
    _check_matches_forward(model, input_ids, attention_mask, head_models.ARCHITECTURES[name])


@pytest.mark.parametrize("name", list(head_models.MORE))
def test_head_reproduces_forward_logits_every_supported_class(built, name):
    model, input_ids, attention_mask = built(name)
    _check_matches_forward(model, input_ids, attention_mask, head_models.ARCHITECTURES[name])


@pytest.mark.parametrize("name", list(head_models.CORE))
def test_gradients_reach_the_models_parameters(built, name):
    """Gradients through final hidden states and the head equal those through the forward logits, for every
    parameter (the lm_head's weight and bias, tied embeddings, the body)."""
    model, input_ids, attention_mask = built(name)
    params = [p for p in model.parameters() if p.requires_grad]
    expected_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    probe = torch.randn_like(expected_logits)
    expected = torch.autograd.grad((expected_logits * probe).sum(), params, allow_unused=True)
    logits = LMHead.from_model(model).logits(final_hidden_states(model, input_ids, attention_mask))
    actual = torch.autograd.grad((logits * probe).sum(), params, allow_unused=True)
    for param, a, e in zip(params, actual, expected, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            assert rel_err(a, e) <= TOL, [n for n, p in model.named_parameters() if p is param]


def test_every_supported_class_has_a_tiny_model_in_the_matrix():
    assert set(supported_model_classes()) == set(head_models.ARCHITECTURES)


def test_tied_head_is_the_input_embedding(built):
    model, _, _ = built("GPT2LMHeadModel")
    assert LMHead.from_model(model).weight is model.transformer.wte.weight


@pytest.mark.parametrize("name", ["Gemma2ForCausalLM", "CohereForCausalLM", "GraniteForCausalLM", "PhiForCausalLM"])
def test_generate_applies_the_temperature_after_the_head(built, name):
    """``generate``'s sampling scores are the head's logits divided by τ: softcap and scale come first."""
    model, input_ids, _ = built(name)
    temperature = 0.7
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=1,
            pad_token_id=0,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        hidden = final_hidden_states(model, input_ids, torch.ones_like(input_ids))[:, -1]
        z = LMHead.from_model(model).logits(hidden)
    assert rel_err(out.logits[0], z) <= TOL
    assert rel_err(out.scores[0], z / temperature) <= TOL


def test_padded_head_is_sliced_to_the_tokenizer(built):
    model, input_ids, attention_mask = built("Gemma2ForCausalLM")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :90]
        hidden = final_hidden_states(model, input_ids, attention_mask)
        assert rel_err(LMHead.from_model(model).vocab_slice(0, 90).logits(hidden), expected) <= TOL


# ------------------------------------------------------------------------------------------ peft


def _lora(model, **kwargs):
    peft = pytest.importorskip("peft")
    import copy

    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))


def test_peft_model_with_lora_in_the_body(built):
    model, input_ids, attention_mask = built("Qwen2ForCausalLM")
    wrapped = _lora(model, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    _check_matches_forward(wrapped, input_ids, attention_mask, head_models.ARCHITECTURES["Qwen2ForCausalLM"])


def test_lora_on_the_lm_head_is_refused_by_name(built):
    model, _, _ = built("Qwen2ForCausalLM")
    wrapped = _lora(model, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM\.lm_head carries a peft adapter .*lora"):
        LMHead.from_model(wrapped)


def test_peft_modules_to_save_head_is_the_trained_copy(built):
    model, input_ids, attention_mask = built("PhiForCausalLM")
    wrapped = _lora(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    wrapper = wrapped.get_base_model().lm_head
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.mul_(1.5)
        wrapper.modules_to_save["default"].bias.add_(1.0)
    head = _check_matches_forward(wrapped, input_ids, attention_mask, head_models.ARCHITECTURES["PhiForCausalLM"])
    assert head.weight is wrapper.modules_to_save["default"].weight
    with wrapped.disable_adapter():
        head = _check_matches_forward(wrapped, input_ids, attention_mask, head_models.ARCHITECTURES["PhiForCausalLM"])
        assert head.weight is wrapper.original_module.weight


# ---------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("name", "attribute"), [("BertLMHeadModel", "cls"), ("RobertaForCausalLM", "lm_head")])
def test_heads_with_a_transform_are_refused_by_name(built, name, attribute):
    model, _, _ = built(name)
    with pytest.raises(ValueError, match=rf"{name}\.{attribute}: a dense layer, an activation and a LayerNorm"):
        LMHead.from_model(model)


def test_unverified_model_classes_are_refused():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 7)

    with pytest.raises(ValueError, match=r"test_heads\..*Custom\.forward is not one opd_fast has verified"):
        LMHead.from_model(Custom())


def test_subclass_overriding_forward_is_refused(built):
    model, _, _ = built("LlamaForCausalLM")

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits
            return out

    doubled = Doubled(model.config)
    with pytest.raises(ValueError, match=r"Doubled\.forward overrides LlamaForCausalLM\.forward"):
        LMHead.from_model(doubled)


def test_subclass_keeping_forward_is_read(built):
    model, input_ids, attention_mask = built("CohereForCausalLM")

    class Renamed(transformers.CohereForCausalLM):
        pass

    renamed = Renamed(model.config).eval()
    renamed.load_state_dict(model.state_dict())
    _check_matches_forward(renamed, input_ids, attention_mask, head_models.ARCHITECTURES["CohereForCausalLM"])


def _modified(built, name):
    import copy

    return copy.deepcopy(built(name)[0])


def test_non_linear_head_is_refused(built):
    model = _modified(built, "LlamaForCausalLM")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 101))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\.lm_head is a torch\.nn\.modules\.container\.Sequential"):
        LMHead.from_model(model)


def test_hooked_head_is_refused(built):
    model = _modified(built, "LlamaForCausalLM")
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\.lm_head has forward hooks"):
        LMHead.from_model(model)


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(head_models.config("LlamaForCausalLM"))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM\.lm_head\.weight is on the meta device"):
        LMHead.from_model(model)


def test_learned_scale_is_refused(built):
    model = _modified(built, "CohereForCausalLM")
    model.logit_scale = torch.nn.Parameter(torch.tensor(0.37))
    with pytest.raises(ValueError, match=r"CohereForCausalLM\.logit_scale is a tensor .*requires_grad=True"):
        LMHead.from_model(model)


def test_missing_attribute_is_refused(built):
    model = _modified(built, "FalconH1ForCausalLM")
    del model.model.lm_head_multiplier
    with pytest.raises(ValueError, match=r"FalconH1ForCausalLM\.model\.lm_head_multiplier does not exist"):
        LMHead.from_model(model)


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [
        ("Gemma2ForCausalLM", "final_logit_softcapping", 0.0),
        ("GraniteForCausalLM", "logits_scaling", -2.0),
        ("HyperCLOVAXForCausalLM", "logits_scaling", math.nan),
    ],
)
def test_invalid_config_values_are_refused_by_attribute(built, name, attribute, value):
    model = _modified(built, name)
    setattr(model.config, attribute, value)
    with pytest.raises(ValueError, match=rf"{name}\.config\.{attribute} is {value!r}"):
        LMHead.from_model(model)


def test_minicpm3_with_a_biased_head_is_refused(built):
    """MiniCPM3 divides the hidden states, not the logits: equal only without a bias."""
    model = _modified(built, "MiniCPM3ForCausalLM")
    model.lm_head = torch.nn.Linear(32, 101, bias=True)
    with pytest.raises(ValueError, match=r"MiniCPM3ForCausalLM\.lm_head has a bias"):
        LMHead.from_model(model)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_dtensor_head_is_gathered_with_its_gradients(tmp_path):
    """Tensor-parallel lm_head over 2 gloo ranks: weight and bias are DTensor row shards, with
    torch.distributed's layout hooks on the module."""
    import head_tp_worker
    import torch.multiprocessing as mp

    mp.spawn(head_tp_worker.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["plain"]
        assert rel_err(result["logits"], result["expected"]) <= TOL
        for got, expected in zip(result["grads"], result["expected_grads"], strict=True):
            assert rel_err(got, expected) <= TOL
