"""Every bad input of docs/design.md §3 gets a ValueError/TypeError that names the argument and the fix."""

import math
import re

import pytest
import torch
from conftest import make_pair

from opd_fast import (
    BackendUnavailableError,
    OPDLoss,
    chunk_budget,
    get_chunk_budget,
    linear_divergence,
    linear_reverse_kl,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_overlap,
    linear_topk_target_divergence,
    set_chunk_budget,
    shard_rows,
)


@pytest.fixture
def pair():
    return make_pair(lead=(2, 3), hs_dim=8, ht_dim=12, vocab=50)


def _div(pair, **overrides):
    hs, ws, ht, wt = pair
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    kwargs = {"backend": "torch", **{k: v for k, v in overrides.items() if k not in args}}
    args.update({k: v for k, v in overrides.items() if k in args})
    return linear_divergence(*args.values(), **kwargs)


DIVERGENCE_CASES = [
    # (overrides, exception, pattern)
    (
        dict(teacher_weight=torch.randn(52, 12)),
        ValueError,
        r"student_weight has 50 .* teacher_weight has 52.*vocab_size=50",
    ),
    (dict(vocab_size=51), ValueError, r"vocab_size must be in \[1, 50\]"),
    (dict(vocab_size=0), ValueError, r"vocab_size must be in"),
    (dict(vocab_size=2.0), TypeError, r"vocab_size must be an int"),
    (
        dict(student_hidden=torch.randn(2, 3, 9)),
        ValueError,
        r"student_hidden has hidden size 9 .* student_weight has 8",
    ),
    (
        dict(teacher_hidden=torch.randn(2, 3, 8)),
        ValueError,
        r"teacher_hidden has hidden size 8 .* teacher_weight has 12",
    ),
    (dict(teacher_hidden=torch.randn(2, 4, 12)), ValueError, r"same leading shape.*\(2, 3\) and \(2, 4\)"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"mask must have the leading shape .*\(2, 3\)"),
    (dict(mask=torch.ones(2, 3)), TypeError, r"mask must be a bool tensor.*mask.bool\(\)"),
    (dict(mask=[[True] * 3] * 2), TypeError, r"mask must be a bool torch.Tensor"),
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature=math.nan), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature=math.inf), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature="1"), TypeError, r"temperature must be a number"),
    (
        dict(divergence="kl"),
        ValueError,
        r"divergence must be one of 'reverse_kl', 'forward_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl', 'tvd', "
        r"got 'kl'",
    ),
    (dict(divergence="skew_reverse_kl", skew=1.0), ValueError, r"skew must be in \[0, 1\).*identically 0"),
    (dict(skew=-0.1), ValueError, r"skew must be in \[0, 1\)"),
    (dict(entropy_grad=True), ValueError, r"entropy_grad=True makes the returned entropy .* return_entropy=True"),
    (dict(skew="0.1"), TypeError, r"skew must be a number"),
    (dict(hard_label_weight=0.3), ValueError, r"hard_label_weight > 0 .* labels=: pass the target token ids"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, r"labels= .* pass hard_label_weight > 0"),
    (
        dict(labels=torch.zeros(2, 3, dtype=torch.long), hard_label_weight=1.0),
        ValueError,
        r"hard_label_weight must be in \[0, 1\).*linear_token_logprobs",
    ),
    (dict(labels=torch.zeros(2, 3), hard_label_weight=0.5), TypeError, r"labels must be an integer tensor"),
    (dict(labels=torch.zeros(3, 2, dtype=torch.long), hard_label_weight=0.5), ValueError, r"labels must have the"),
    (
        dict(labels=torch.full((2, 3), 50), hard_label_weight=0.5),
        ValueError,
        r"labels must lie in \[0, 50\) .* or be -100.*\[50, 50\]",
    ),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (dict(beta=-0.1), ValueError, r"beta must be in \[0, 1\]"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(backend="tpu"), ValueError, r"backend must be one of 'auto', 'torch', 'triton', 'cuda', got 'tpu'"),
    (dict(student_hidden=[1.0, 2.0]), TypeError, r"student_hidden must be a torch.Tensor, got list"),
    (
        dict(student_hidden=torch.ones(2, 3, 8, dtype=torch.int64)),
        TypeError,
        r"student_hidden must be a floating-point",
    ),
    (dict(student_weight=torch.randn(50, 8, 1)), ValueError, r"student_weight must be 2-D \[V, H\]"),
    (dict(teacher_weight=torch.randn(0, 12)), ValueError, r"teacher_weight has no vocabulary rows"),
    (dict(student_hidden=torch.tensor(1.0)), ValueError, r"student_hidden must have shape \[\.\.\., H\]"),
    (dict(teacher_weight=torch.randn(50, 12, device="meta")), ValueError, r"same device.*teacher_weight is on meta"),
    (dict(process_group=object()), TypeError, r"process_group must be a torch\.distributed ProcessGroup"),
]


@pytest.mark.parametrize(("overrides", "exc", "pattern"), DIVERGENCE_CASES, ids=lambda v: None)
def test_divergence_bad_inputs(pair, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _div(pair, **overrides)


@pytest.mark.parametrize("name", ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_check_finite_names_the_tensor(pair, name, bad):
    tensors = dict(zip(("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"), pair))
    poisoned = tensors[name].detach().clone()
    poisoned.view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
        _div(pair, **{name: poisoned}, check_finite=True)
    loss = _div(pair, **{name: poisoned})  # unchecked: NaN propagates, never a finite wrong number
    assert not torch.isfinite(loss)


TOKEN_CASES = [
    (dict(token_ids=torch.tensor([[0, 1, 50]] * 2)), ValueError, r"token_ids must lie in \[0, 50\).*\[0, 50\]"),
    (dict(token_ids=torch.tensor([[0, -1, 2]] * 2)), ValueError, r"token_ids must lie in \[0, 50\)"),
    (dict(token_ids=torch.zeros(2, 3)), TypeError, r"token_ids must be an integer tensor.*\.long\(\)"),
    (dict(token_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"token_ids must have the leading shape"),
    (dict(token_ids=[0, 1]), TypeError, r"token_ids must be an integer torch.Tensor"),
    (dict(hidden=torch.randn(2, 3, 7)), ValueError, r"hidden has hidden size 7 but weight has 8"),
    (dict(weight=torch.randn(50)), ValueError, r"weight must be 2-D"),
    (dict(temperature=0), ValueError, r"temperature must be a finite number > 0"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
    (dict(process_group=object()), TypeError, r"process_group must be a torch\.distributed ProcessGroup"),
]


@pytest.mark.parametrize(("overrides", "exc", "pattern"), TOKEN_CASES, ids=lambda v: None)
def test_token_logprobs_bad_inputs(pair, overrides, exc, pattern):
    hs, ws, _, _ = pair
    args = dict(hidden=hs, weight=ws, token_ids=torch.zeros(2, 3, dtype=torch.long))
    args.update({k: v for k, v in overrides.items() if k in args})
    kwargs = {k: v for k, v in overrides.items() if k not in args}
    kwargs.setdefault("backend", "torch")
    with pytest.raises(exc, match=pattern):
        linear_token_logprobs(*args.values(), **kwargs)


@pytest.mark.parametrize(
    ("k", "exc", "pattern"),
    [
        (0, ValueError, r"k must be in \[1, V\] = \[1, 50\], got 0"),
        (51, ValueError, r"got 51"),
        (2.0, TypeError, "k must be an int"),
    ],
)
def test_topk_bad_k(pair, k, exc, pattern):
    with pytest.raises(exc, match=pattern):
        linear_topk_overlap(*pair, k=k, backend="torch")


def test_topk_checks_pair_inputs(pair):
    hs, ws, ht, _ = pair
    with pytest.raises(ValueError, match="vocab_size=50"):
        linear_topk_overlap(hs, ws, ht, torch.randn(60, 12), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        linear_topk_overlap(*pair, temperature=-2.0, backend="torch")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(divergence="tv"), "divergence must be one of"),
        (dict(skew=1.0), r"skew must be in \[0, 1\)"),
        (dict(hard_label_weight=1.0), r"hard_label_weight must be in \[0, 1\)"),
        (dict(beta=2.0), r"beta must be in \[0, 1\]"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(reduction="mean_tokens"), "reduction must be one of"),
        (dict(backend="metal"), "backend must be one of"),
    ],
)
def test_opdloss_validates_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPDLoss(**kwargs)


def test_reverse_kl_passes_errors_through(pair):
    hs, ws, ht, wt = pair
    with pytest.raises(ValueError, match="reduction"):
        linear_reverse_kl(hs, ws, ht, wt, reduction="max")


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_chunk_budget(bad):
    with pytest.raises(ValueError, match="positive integer"):
        set_chunk_budget(bad)
    with pytest.raises(ValueError, match="positive integer"), chunk_budget(bad):
        pass


def test_bad_chunk_budget_env(monkeypatch, pair):
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", "lots")
    with pytest.raises(ValueError, match="OPD_FAST_CHUNK_ELEMENTS='lots' is not an integer"):
        _div(pair)
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", "-3")
    with pytest.raises(ValueError, match="OPD_FAST_CHUNK_ELEMENTS must be a positive integer"):
        _div(pair)


# ---------------------------------------------------------------------------------------------------------------
# The bad-input matrix: every public function × every tensor argument × wrong type / dtype / layout / device,
# and every scalar option × wrong type / range. Each call differs from a valid one (checked first) in one value.

V, HS, HT = 50, 8, 12
PAIR = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


def _valid_inputs():
    hs, ws, ht, wt = make_pair(lead=(2, 3), hs_dim=HS, ht_dim=HT, vocab=V)
    topk_ids = torch.tensor([0, 1, 2]).expand(2, 3, 3).clone()
    return dict(
        student_hidden=hs,
        student_weight=ws,
        teacher_hidden=ht,
        teacher_weight=wt,
        mask=torch.ones(2, 3, dtype=torch.bool),
        hidden=hs,
        weight=ws,
        token_ids=torch.zeros(2, 3, dtype=torch.long),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=torch.full((2, 3, 3), -2.0, dtype=torch.float64),
    )


def _pair_call(fn):
    def call(t, **kw):
        return fn(*(t[name] for name in PAIR), mask=t["mask"], **kw)

    return call


def _opdloss_call(t, **kw):
    return OPDLoss(**kw)(*(t[name] for name in PAIR), t["mask"])


# name -> (call(tensors, **kwargs), float tensor arguments, integer tensor arguments, scalar options it takes)
FUNCTIONS = {
    "linear_divergence": (
        _pair_call(linear_divergence),
        (*PAIR,),
        (),
        {"temperature", "backend", "reduction", "check_finite", "vocab_size", "filter_eps", "beta", "divergence"},
    ),
    "linear_reverse_kl": (
        _pair_call(linear_reverse_kl),
        (*PAIR,),
        (),
        {"temperature", "backend", "reduction", "check_finite", "vocab_size", "filter_eps"},
    ),
    "linear_token_logprobs": (
        lambda t, **kw: linear_token_logprobs(t["hidden"], t["weight"], t["token_ids"], **kw),
        ("hidden", "weight"),
        ("token_ids",),
        {"temperature", "backend", "check_finite", "filter_eps"},
    ),
    "linear_topk_overlap": (
        _pair_call(linear_topk_overlap),
        (*PAIR,),
        (),
        {"temperature", "backend", "check_finite", "vocab_size", "k"},
    ),
    "linear_topk_divergence": (
        _pair_call(linear_topk_divergence),
        (*PAIR,),
        (),
        {"temperature", "backend", "reduction", "check_finite", "vocab_size", "filter_eps", "k"},
    ),
    "linear_topk_target_divergence": (
        lambda t, **kw: linear_topk_target_divergence(
            t["student_hidden"],
            t["student_weight"],
            t["teacher_topk_ids"],
            t["teacher_topk_logprobs"],
            mask=t["mask"],
            **kw,
        ),
        ("student_hidden", "student_weight", "teacher_topk_logprobs"),
        ("teacher_topk_ids",),
        {"temperature", "backend", "reduction", "check_finite", "filter_eps"},
    ),
    "OPDLoss": (
        _opdloss_call,
        (*PAIR,),
        (),
        {"temperature", "backend", "reduction", "filter_eps", "beta", "divergence"},
    ),
}
MASKED = [name for name in FUNCTIONS if name != "linear_token_logprobs"]


def _call(function: str, replace: dict | None = None, **kwargs):
    call = FUNCTIONS[function][0]
    tensors = {**_valid_inputs(), **(replace or {})}
    if function != "OPDLoss":
        kwargs.setdefault("backend", "torch")
    return call(tensors, **kwargs)


def _tensor_args(kind: str):
    for function, (_, floats, ints, _) in FUNCTIONS.items():
        names = floats if kind == "float" else ints if kind == "int" else (*floats, *ints)
        for name in names:
            yield pytest.param(function, name, id=f"{function}-{name}")
        if kind == "any" and function in MASKED:
            yield pytest.param(function, "mask", id=f"{function}-mask")


def _options(option: str, values):
    return [
        pytest.param(function, value, id=f"{function}-{value!r}")
        for function, (*_, options) in FUNCTIONS.items()
        if option in options
        for value in values
    ]


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_matrix_baseline_inputs_are_valid(function):
    """The matrix below changes one value of these calls: they must succeed as they are."""
    out = _call(function)
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize(("function", "name"), list(_tensor_args("any")))
@pytest.mark.parametrize("bad", [[[1.0, 2.0]], 3.0, None], ids=["list", "float", "None"])
def test_non_tensor_arguments_are_refused(function, name, bad):
    if name == "mask" and bad is None:
        _call(function, {name: bad})  # None is the documented "every token counts"
        return
    expected = "lm_head weight tensor .* or an opd_fast\\.LMHead" if name.endswith("weight") else "torch\\.Tensor"
    with pytest.raises(TypeError, match=rf"{name} must be an? (bool |integer )?{expected}.*got {type(bad).__name__}"):
        _call(function, {name: bad})


@pytest.mark.parametrize(("function", "name"), list(_tensor_args("float")))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_float_arguments_refuse_other_dtypes(function, name, dtype):
    bad = _valid_inputs()[name].detach().to(dtype)
    with pytest.raises(
        TypeError, match=rf"{name} must be a floating-point tensor .*got {dtype}; cast it with \.float\(\)"
    ):
        _call(function, {name: bad})


@pytest.mark.parametrize(("function", "name"), list(_tensor_args("int")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64], ids=str)
def test_integer_arguments_refuse_other_dtypes(function, name, dtype):
    bad = _valid_inputs()[name].to(dtype)
    with pytest.raises(TypeError, match=rf"{name} must be an integer .*{dtype}.*\.long\(\)"):
        _call(function, {name: bad})


@pytest.mark.parametrize("function", MASKED)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32], ids=str)
def test_mask_must_be_bool(function, dtype):
    with pytest.raises(TypeError, match=rf"mask must be a bool tensor .*got {dtype}; pass mask\.bool\(\)"):
        _call(function, {"mask": torch.ones(2, 3, dtype=dtype)})


@pytest.mark.parametrize(("function", "name"), list(_tensor_args("any")))
def test_tensors_on_another_device_are_named(function, name):
    """meta stands in for a second device (e.g. a mask left on the CPU while the hidden states are on the GPU)."""
    bad = _valid_inputs()[name].detach().to("meta")
    with pytest.raises(
        ValueError, match=rf"all tensors must be on the same device, .*{name} is on meta.*\.to\(device\)"
    ):
        _call(function, {name: bad})


@pytest.mark.parametrize(("function", "name"), list(_tensor_args("any")))
def test_sparse_tensors_are_refused(function, name):
    bad = _valid_inputs()[name].detach().to_sparse()
    with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\).*sparse_coo"):
        _call(function, {name: bad})


@pytest.mark.parametrize("function", MASKED)
@pytest.mark.parametrize("shape", [(3, 2), (6,), (2, 3, 1)], ids=str)
def test_mask_shape_must_match_the_tokens(function, shape):
    with pytest.raises(
        ValueError,
        match=rf"mask must have the leading shape of the hidden states \(2, 3\), got {re.escape(str(shape))}; ",
    ):
        _call(function, {"mask": torch.ones(shape, dtype=torch.bool)})


@pytest.mark.parametrize(
    ("function", "hidden", "weight"),
    [(f, "student_hidden", "student_weight") for f in FUNCTIONS if f != "linear_token_logprobs"]
    + [(f, "teacher_hidden", "teacher_weight") for f in MASKED if f != "linear_topk_target_divergence"]
    + [("linear_token_logprobs", "hidden", "weight")],
    ids=str,
)
def test_hidden_size_must_match_the_weight(function, hidden, weight):
    size = _valid_inputs()[weight].shape[1]
    with pytest.raises(ValueError, match=rf"{hidden} has hidden size {size + 1} but {weight} has {size} columns"):
        _call(function, {hidden: torch.randn(2, 3, size + 1, dtype=torch.float64)})


@pytest.mark.parametrize(
    ("function", "weight"),
    [(f, "student_weight") for f in FUNCTIONS if f != "linear_token_logprobs"]
    + [(f, "teacher_weight") for f in MASKED if f != "linear_topk_target_divergence"]
    + [("linear_token_logprobs", "weight")],
    ids=str,
)
@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((V,), r"must be 2-D \[V, H\] \(an lm_head weight\), got shape \(50,\)"),
        ((V, 1, 1), r"must be 2-D \[V, H\] \(an lm_head weight\), got shape \(50, 1, 1\)"),
        ((0, HS), r"has no vocabulary rows .*pass the \[V, H\] lm_head weight"),
        ((V, 0), r"has no hidden columns .*pass the \[V, H\] lm_head weight"),
    ],
    ids=["1d", "3d", "no-rows", "no-columns"],
)
def test_weight_must_be_a_nonempty_matrix(function, weight, shape, pattern):
    with pytest.raises(ValueError, match=rf"{weight} {pattern}"):
        _call(function, {weight: torch.randn(shape, dtype=torch.float64)})


@pytest.mark.parametrize("function", [f for f in MASKED if f != "linear_topk_target_divergence"])
def test_pair_shapes_must_agree(function):
    with pytest.raises(
        ValueError, match=r"student_weight has 50 vocabulary rows but teacher_weight has 52.*vocab_size=50"
    ):
        _call(function, {"teacher_weight": torch.randn(52, HT, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"same leading shape.*\(2, 3\) and \(3, 2\)"):
        _call(function, {"teacher_hidden": torch.randn(3, 2, HT, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"student_hidden must have shape \[\.\.\., H\], got a 0-d tensor"):
        _call(function, {"student_hidden": torch.tensor(1.0, dtype=torch.float64)})


@pytest.mark.parametrize(("function", "value"), _options("temperature", [0, -1.0, math.nan, math.inf, "1", True, None]))
def test_bad_temperature(function, value):
    exc = ValueError if isinstance(value, float | int) and not isinstance(value, bool) else TypeError
    with pytest.raises(exc, match=r"temperature must be a (finite )?number > 0"):
        _call(function, temperature=value)


@pytest.mark.parametrize(("function", "value"), _options("check_finite", ["yes", 1, None]))
def test_check_finite_must_be_a_bool(function, value):
    with pytest.raises(TypeError, match=rf"check_finite must be True or False, got {type(value).__name__}"):
        _call(function, check_finite=value)


@pytest.mark.parametrize(("function", "value"), _options("backend", ["tpu", "Torch", None, 3]))
def test_unknown_backend(function, value):
    with pytest.raises(ValueError, match=rf"backend must be one of 'auto', 'torch', 'triton', 'cuda', got {value!r}"):
        _call(function, backend=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA backend may be available here")
@pytest.mark.parametrize(("function", "value"), _options("backend", ["cuda"]))
def test_unavailable_backend_says_why(function, value):
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' is not available on cpu: .*use backend='torch'"):
        _call(function, backend=value)


@pytest.mark.parametrize(("function", "value"), _options("reduction", ["avg", "", None, "MEAN"]))
def test_unknown_reduction(function, value):
    with pytest.raises(ValueError, match=rf"reduction must be one of 'mean', 'sum', 'none', got {value!r}"):
        _call(function, reduction=value)


@pytest.mark.parametrize(("function", "value"), _options("filter_eps", [1.0, -0.1, math.nan, "0", True]))
def test_bad_filter_eps(function, value):
    exc = TypeError if isinstance(value, str | bool) else ValueError
    with pytest.raises(exc, match=r"filter_eps must be (in|a number in) \[0, 1\)"):
        _call(function, filter_eps=value)


@pytest.mark.parametrize(("function", "value"), _options("beta", [-0.1, 1.5, math.nan, "0.5", True, None]))
def test_bad_beta(function, value):
    exc = TypeError if isinstance(value, str | bool) or value is None else ValueError
    with pytest.raises(exc, match=r"beta must be (in|a number in) \[0, 1\]"):
        _call(function, divergence="jsd", beta=value)


@pytest.mark.parametrize(("function", "value"), _options("divergence", ["kl", None, "JSD"]))
def test_unknown_divergence(function, value):
    names = "'reverse_kl', 'forward_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl', 'tvd'"
    with pytest.raises(ValueError, match=rf"divergence must be one of {names}, got {value!r}"):
        _call(function, divergence=value)


@pytest.mark.parametrize(("function", "value"), _options("vocab_size", [0, -1, V + 1, 2.0, True, "50"]))
def test_bad_vocab_size(function, value):
    if isinstance(value, int) and not isinstance(value, bool):
        with pytest.raises(ValueError, match=rf"vocab_size must be in \[1, {V}\] .*got {value}"):
            _call(function, vocab_size=value)
    else:
        with pytest.raises(TypeError, match=rf"vocab_size must be an int or None, got {type(value).__name__}"):
            _call(function, vocab_size=value)


@pytest.mark.parametrize(("function", "value"), _options("k", [0, -1, V + 1, 10**6, 2.0, True, "3", None]))
def test_bad_k(function, value):
    if isinstance(value, int) and not isinstance(value, bool):
        with pytest.raises(ValueError, match=rf"k must be in \[1, V\] = \[1, {V}\], got {value}; pick k"):
            _call(function, k=value)
    else:
        with pytest.raises(TypeError, match=rf"k must be an int, got {type(value).__name__}"):
            _call(function, k=value)


@pytest.mark.parametrize("function", ["linear_topk_overlap", "linear_topk_divergence"])
def test_k_is_checked_against_the_truncated_vocabulary(function):
    with pytest.raises(ValueError, match=r"k must be in \[1, V\] = \[1, 10\]"):
        _call(function, k=11, vocab_size=10)


def test_numpy_integers_are_accepted_where_an_int_is_expected():
    np = pytest.importorskip("numpy")
    out = _call("linear_topk_overlap", k=np.int64(3), vocab_size=np.int64(V - 1))
    assert out.student_topk_ids.shape == (2, 3, 3) and int(out.student_topk_ids.max()) < V - 1


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(entry_clip=0), ValueError, r"entry_clip must be a finite number > 0 \(or None for no clipping\), got 0"),
        (dict(entry_clip=-1.0), ValueError, r"entry_clip must be a finite number > 0"),
        (dict(entry_clip=math.inf), ValueError, r"entry_clip must be a finite number > 0"),
        (dict(entry_clip="1"), TypeError, r"entry_clip must be a number > 0 or None, got str"),
        (dict(entry_clip=True), TypeError, r"entry_clip must be a number > 0 or None, got bool"),
        (dict(entry_clip=1.0, backend="triton"), ValueError, r"entry_clip is computed by the torch backend only"),
    ],
)
def test_divergence_only_options(pair, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _div(pair, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(support="both"), ValueError, r"support must be one of 'student', 'teacher', 'union', 'intersection'"),
        (dict(divergence="jsd"), ValueError, r"divergence must be one of 'reverse_kl', 'forward_kl', got 'jsd'"),
        (dict(renormalize=1), TypeError, r"renormalize must be True or False, got int"),
        (dict(renormalize=None), TypeError, r"renormalize must be True or False, got NoneType"),
    ],
)
def test_topk_divergence_only_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call("linear_topk_divergence", **kwargs)


@pytest.mark.parametrize(
    ("replace", "kwargs", "exc", "pattern"),
    [
        ({}, dict(divergence="jsd"), ValueError, r"divergence must be one of 'reverse_kl', 'forward_kl', got 'jsd'"),
        ({}, dict(add_tail="no"), TypeError, r"add_tail must be True or False, got str"),
        (
            dict(teacher_topk_ids=torch.tensor(1)),
            {},
            ValueError,
            r"teacher_topk_ids must have shape \[\.\.\., K\] with the hidden states' leading shape \(2, 3\), got \(\)",
        ),
        (dict(teacher_topk_ids=torch.zeros(2, 3, 0, dtype=torch.long)), {}, ValueError, r"got \(2, 3, 0\)"),
        (dict(teacher_topk_ids=torch.zeros(3, 2, 3, dtype=torch.long)), {}, ValueError, r"got \(3, 2, 3\)"),
        (
            dict(
                teacher_topk_ids=torch.arange(V + 1).expand(2, 3, V + 1).clone(),
                teacher_topk_logprobs=torch.full((2, 3, V + 1), -10.0, dtype=torch.float64),
            ),
            {},
            ValueError,
            rf"teacher_topk_ids must lie in \[0, {V}\)",
        ),
        (
            dict(teacher_topk_logprobs=torch.full((2, 3, 3), math.inf, dtype=torch.float64)),
            {},
            ValueError,
            r"log-probabilities \(≤ 0\), found inf",
        ),
    ],
)
def test_topk_target_only_inputs(replace, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call("linear_topk_target_divergence", replace, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(divergence=None), ValueError, r"divergence must be one of .* got None"),
        (dict(beta=True), TypeError, r"beta must be a number in \[0, 1\], got bool"),
        (dict(temperature="1"), TypeError, r"temperature must be a number > 0, got str"),
        (dict(temperature=-0.5), ValueError, r"temperature must be a finite number > 0"),
        (dict(filter_eps=2), ValueError, r"filter_eps must be in \[0, 1\)"),
        (dict(filter_eps="small"), TypeError, r"filter_eps must be a number in \[0, 1\) or None"),
        (dict(reduction=None), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got None"),
        (dict(backend=3), ValueError, r"backend must be one of 'auto', 'torch', 'triton', 'cuda', got 3"),
    ],
)
def test_opdloss_constructor_bad_types(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        OPDLoss(**kwargs)


@pytest.mark.parametrize("bad", ["x", "1024", 2.0, [1024], object()], ids=["x", "1024-text", "2.0", "list", "object"])
def test_bad_chunk_budget_types(bad):
    before = get_chunk_budget()
    with pytest.raises(ValueError, match=r"elements must be a positive integer number of logits elements per tile"):
        set_chunk_budget(bad)
    assert get_chunk_budget() == before  # a refused value leaves the budget alone


def test_chunk_budget_accepts_numpy_integers_and_none_restores():
    np = pytest.importorskip("numpy")
    before = get_chunk_budget()
    try:
        set_chunk_budget(np.int64(1024))
        assert get_chunk_budget() == 1024 and type(get_chunk_budget()) is int
    finally:
        set_chunk_budget(None)
    assert get_chunk_budget() == before


@pytest.mark.parametrize(
    ("weight", "kwargs", "exc", "pattern"),
    [
        ([[1.0]], {}, TypeError, r"weight must be an lm_head weight tensor \[V, H\] or an nn\.Linear.*got list"),
        (torch.ones(4), {}, ValueError, r"weight must be 2-D \[V, H\]"),
        (torch.ones(4, 2, dtype=torch.long), {}, TypeError, r"weight must be a floating-point tensor"),
        (torch.ones(4, 2), dict(process_group="world"), TypeError, r"process_group must be a torch\.distributed"),
        (torch.ones(4, 2), dict(sizes=4), TypeError, r"sizes must be a list of row counts, one int per rank"),
        (torch.ones(4, 2), dict(sizes="2,2"), TypeError, r"sizes must be a list of row counts"),
        (torch.ones(4, 2), dict(sizes=[2.0, 2.0]), TypeError, r"sizes\[0\] must be an int \(a row count\), got float"),
        (torch.ones(4, 2), {}, ValueError, r"shard_rows needs torch\.distributed: call dist\.init_process_group"),
    ],
)
def test_shard_rows_bad_inputs(weight, kwargs, exc, pattern):
    assert not torch.distributed.is_initialized()
    with pytest.raises(exc, match=pattern):
        shard_rows(weight, **kwargs)


@pytest.mark.parametrize(
    ("sizes", "pattern"),
    [([3], r"summing to 4, got \[3\]; or leave sizes=None"), ([2, 2], r"one .* per rank \(1\)"), ([True], r"got bool")],
)
def test_shard_rows_bad_sizes_in_a_group(tmp_path, sizes, pattern):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises((ValueError, TypeError), match=pattern):
            shard_rows(torch.nn.Linear(2, 4, bias=False), sizes=sizes)
    finally:
        dist.destroy_process_group()
