"""Trainer configuration: the sections (dataclasses with their defaults) and their validation; reading them from
YAML and ``section.key=value`` overrides is opd_fast.trainer.config_loader.

A YAML file mirrors the dataclasses (sections ``student``, ``teacher``, ``lora``, ``data``, ``rollout``,
``loss``, ``optim``, ``train`` plus top-level ``out_dir``, ``seed``, ``device``). Unknown keys, wrong
types and out-of-range values are refused with a message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

# The full-vocabulary divergences (opd_fast.linear_divergence), then the other loss modes.
DIVERGENCE_MODES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
LOSS_MODES = (*DIVERGENCE_MODES, "topk", "sampled_token", "sft")
ROLLOUT_SOURCES = ("student", "teacher", "reference")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TOPK_SUPPORTS = ("student", "teacher", "union", "intersection")
TEACHER_ENGINES = ("hf", "vllm")
ROLLOUT_ENGINES = ("hf", "vllm")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclass
class ModelConfig:
    """A local transformers causal-LM directory (None: the built-in demo's model)."""

    path: str | None = None
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    # Run Python code shipped with the model directory (config auto_map). Off: only set it for code you trust.
    trust_remote_code: bool = False
    # Teacher only: on-policy self-distillation (OPSD). The student is its own teacher, frozen at the
    # initial weights (a frozen copy; with LoRA, the student with its adapters disabled), and the teacher
    # pass sees data.teacher_template (privileged context such as the reference answer).
    self_distill: bool = False


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model computed in-process (``engine: hf``, hidden states and head), or one that returns only
    its top-``top_k`` log-probs per position, trained with the top-k target loss (``loss.mode: topk``, the tail
    bucket on by ``loss.add_tail``): a vLLM server (``server``: a URL or a list of URLs, round-robin) or an
    in-process vLLM engine (``engine: vllm``, on ``path``)."""

    server: str | list[str] | None = None
    engine: str = "hf"
    # The k of a served / vLLM teacher: vLLM's prompt_logprobs, which its --max-logprobs (default 20) must allow.
    top_k: int = 16
    # A served teacher's patience: the limit of one HTTP request, and how many times a failed one is sent again
    # (backoff 1, 2, 4, ... s, each retry to the next URL).
    timeout_s: float = 120.0
    retries: int = 5
    # Offline teacher top-k (opd-fast teacher-topk): shards of sequences with the teacher's top-k log-probs. Alone
    # (no path, server or engine=vllm), every step trains on them (off-policy distillation, loss.mode=topk); beside
    # a live teacher, the first train.cold_start_steps steps do (a cold start), then training goes on-policy.
    topk_dir: str | None = None

    @property
    def offline(self) -> bool:
        """Whether the shards of topk_dir are the only teacher: every step is off-policy, on their sequences."""
        live = self.path is not None or self.server is not None or self.engine == "vllm" or self.self_distill
        return self.topk_dir is not None and not live

    @property
    def topk_only(self) -> bool:
        """Whether the teacher returns only its top-k log-probs (a server or a vLLM engine)."""
        return self.server is not None or self.engine == "vllm"

    @property
    def server_urls(self) -> list[str]:
        return [] if self.server is None else [self.server] if isinstance(self.server, str) else list(self.server)


@dataclass
class LoraConfig:
    """LoRA adapters on the student via peft (optional dependency: pip install 'opd_fast[lora]')."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    """Prompts with verifiable answers: a built-in synthetic task, or JSONL files of {"prompt", "answer"}."""

    task: str = "reverse"
    train_path: str | None = None
    eval_path: str | None = None
    eval_size: int = 256
    # exact, same_letters, contains, boxed or "module:function"; None: the task's own (exact match, but for anagram).
    verifier: str | None = None
    # The teacher's prompt, from {prompt} and {answer}: "{prompt}" unless it gets privileged context.
    teacher_template: str = "{prompt}"
    # Drop teacher samples whose format is wrong: None, "task" (the task's own check) or "module:function".
    format_filter: str | None = None
    # Teacher-aligned prompt selection: score select_pool candidate prompts by the teacher-student top-k
    # overlap mass on a probe rollout of select_probe_tokens tokens and train on the best select_keep.
    select_pool: int | None = None
    select_keep: float = 0.5
    select_probe_tokens: int = 8
    # Near-duplicate removal of the candidate pool: character 3-gram Jaccard similarity ≥ this drops a prompt.
    dedup_threshold: float | None = None


@dataclass
class RolloutConfig:
    """Sampling of completions: who samples, how many prompts per micro-batch, and how."""

    source: str = "student"
    batch_size: int = 32
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # Top-k sampling (0: off).
    top_k: int = 0
    reuse: int = 1
    # λ: the probability that a step's rollout is on-policy; otherwise the teacher samples it (GKD mixing).
    on_policy_fraction: float = 1.0
    # Who samples the student's completions: transformers' generate (hf), or an in-process vLLM engine (vllm,
    # opd_fast.trainer.vllm_rollout) that gets the student's weights after every optimizer step (LoRA merged), with
    # an explicit KV cache of kv_cache_gb. Under torchrun every rank runs its own engine.
    engine: str = "hf"
    kv_cache_gb: float = 0.5


@dataclass
class LossConfig:
    """The per-token loss on completion tokens (see opd_fast.trainer.losses)."""

    mode: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    # The teacher's logits' temperature (after its head's scale and softcap, as TRL orders it); None: loss.temperature.
    teacher_temperature: float | None = None
    # The skew KLs' α (mode skew_forward_kl: KL(p_t ‖ α p_t + (1 − α) p_s); skew_reverse_kl: KL(p_s ‖ α p_s +
    # (1 − α) p_t)); DistiLLM's 0.1.
    skew: float = 0.1
    # w of w · CE(student, completion tokens) + (1 − w) · divergence for the divergence modes, from the same sweep
    # (Liger-Kernel's weight_hard_loss, NeMo's kd_ratio); the targets are the completion's tokens.
    hard_label_weight: float = 0.0
    top_k: int = 16
    support: str = "student"
    renormalize: bool = True
    topk_divergence: str = "reverse_kl"
    discount: float = 0.0
    ratio_clip: float | None = None
    backend: str = "auto"
    # With a top-k-only teacher (teacher.server, teacher.engine=vllm): one more bucket matching the teacher's mass
    # outside its top-k against the student's (linear_topk_target_divergence's add_tail). loss.top_k, support and
    # renormalize are for in-process teachers; a top-k-only teacher's support is its own top teacher.top_k.
    add_tail: bool = True
    # Per-entry clipping (OPSD v3): each vocabulary entry's divergence term ℓ_v becomes min(ℓ_v, entry_clip)
    # before the sum; no gradient where clipped. Torch backend only.
    entry_clip: float | None = None
    # Token sparsification: keep this fraction ρ of each micro-batch's completion tokens, chosen by the
    # largest per-token divergence ("top_divergence") or at random; the loss is their mean (× T/Σmask).
    token_keep: float = 1.0
    token_select: str = "top_divergence"
    # Reward mixing (sampled_token): advantage α·A_OPD + (1 − α)·A_RLVR, the verifiable reward of the
    # completion on every token. reward: None (the task's verifier, 1/0) or "module:function".
    reward_mix: float = 1.0
    reward: str | None = None

    @property
    def resolved_teacher_temperature(self) -> float:
        """τ_t: teacher_temperature, or temperature when it is None."""
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    def teacher_temperature_setting(self) -> str:
        """The setting that gives τ_t, for messages."""
        if self.teacher_temperature is None:
            return f"loss.temperature={self.temperature} (loss.teacher_temperature unset)"
        return f"loss.teacher_temperature={self.teacher_temperature}"


@dataclass
class OptimConfig:
    """AdamW with warm-up and a schedule, gradient clipping and accumulation."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1


@dataclass
class LoopConfig:
    """Length of training and the cadence of logging, evaluation and checkpoints."""

    steps: int = 100
    # Off-policy cold start: the first cold_start_steps steps are SFT on (format-filtered) teacher samples.
    cold_start_steps: int = 0
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    # k of the logged top-k overlap metrics. None: 16, or a fifth of a vocabulary under 80 tokens (the top 16 of a
    # tiny vocabulary hold all the mass, and every overlap metric would read 1.0).
    overlap_k: int | None = None
    # Subspace-locked training (opd_fast.trainer.SubspaceLock): after this many steps, project every
    # later gradient of the selected matrices onto the top right singular vectors of their update so far.
    subspace_lock_step: int | None = None
    subspace_lock_rank: int = 16
    subspace_lock_include: str | None = None
    # FSDP2 (torch.distributed.fsdp.fully_shard, opd_fast.integrations.fsdp) instead of DistributedDataParallel:
    # the student's parameters, gradients and optimizer state sharded over the ranks. Needs torchrun (> 1 rank).
    fsdp: bool = False
    # torch's CPU threads. None: one thread when both models are narrower than SMALL_MODEL_HIDDEN (their matmuls are
    # too small to split, and on a busy machine every split op waits for a time slice), else torch's default;
    # an OMP_NUM_THREADS set in the environment is kept. Ignored on CUDA.
    cpu_threads: int | None = None


@dataclass
class TrainConfig:
    out_dir: str = "runs/opd"
    seed: int = 0
    device: str = "auto"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check every value; returns self. Raises ConfigError naming the key."""
        _choice("device", self.device, DEVICES)
        for role in ("student", "teacher"):
            _choice(f"{role}.dtype", getattr(self, role).dtype, DTYPES)
        _positive("lora.r", self.lora.r)
        _positive("lora.alpha", self.lora.alpha)
        _range("lora.dropout", self.lora.dropout, 0.0, 1.0, high_open=True)
        _positive("data.eval_size", self.data.eval_size)
        _choice("rollout.source", self.rollout.source, ROLLOUT_SOURCES)
        _positive("rollout.batch_size", self.rollout.batch_size)
        _positive("rollout.max_new_tokens", self.rollout.max_new_tokens)
        _range("rollout.temperature", self.rollout.temperature, 0.0, math.inf, low_open=True, high_open=True)
        _range("rollout.top_p", self.rollout.top_p, 0.0, 1.0, low_open=True)
        _positive("rollout.reuse", self.rollout.reuse)
        _range("rollout.top_k", self.rollout.top_k, 0, math.inf)
        _choice("rollout.engine", self.rollout.engine, ROLLOUT_ENGINES)
        _range("rollout.kv_cache_gb", self.rollout.kv_cache_gb, 0.0, math.inf, low_open=True, high_open=True)
        _choice("loss.mode", self.loss.mode, LOSS_MODES)
        _range("loss.beta", self.loss.beta, 0.0, 1.0)
        _range("loss.skew", self.loss.skew, 0.0, 1.0, high_open=True)
        _range("loss.hard_label_weight", self.loss.hard_label_weight, 0.0, 1.0, high_open=True)
        _range("loss.temperature", self.loss.temperature, 0.0, math.inf, low_open=True, high_open=True)
        if self.loss.teacher_temperature is not None:
            tau_t = self.loss.teacher_temperature
            _range("loss.teacher_temperature", tau_t, 0.0, math.inf, low_open=True, high_open=True)
        _positive("loss.top_k", self.loss.top_k)
        _choice("loss.support", self.loss.support, TOPK_SUPPORTS)
        _choice("loss.topk_divergence", self.loss.topk_divergence, ("reverse_kl", "forward_kl"))
        _range("loss.discount", self.loss.discount, 0.0, 1.0)
        if self.loss.ratio_clip is not None:
            _range("loss.ratio_clip", self.loss.ratio_clip, 1.0, math.inf)
        _choice("loss.backend", self.loss.backend, ("auto", "torch", "triton", "cuda"))
        _range("optim.lr", self.optim.lr, 0.0, math.inf, low_open=True)
        _range("optim.weight_decay", self.optim.weight_decay, 0.0, math.inf)
        _range("optim.beta1", self.optim.beta1, 0.0, 1.0, high_open=True)
        _range("optim.beta2", self.optim.beta2, 0.0, 1.0, high_open=True)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _range("optim.warmup_steps", self.optim.warmup_steps, 0, math.inf)
        _range("optim.min_lr_ratio", self.optim.min_lr_ratio, 0.0, 1.0)
        _range("optim.max_grad_norm", self.optim.max_grad_norm, 0.0, math.inf, low_open=True)
        _positive("optim.grad_accum", self.optim.grad_accum)
        for key in ("steps", "log_every", "eval_every", "save_every", "keep_checkpoints"):
            _positive(f"train.{key}", getattr(self.train, key))
        if self.train.overlap_k is not None:
            _positive("train.overlap_k", self.train.overlap_k)
        _range("train.cold_start_steps", self.train.cold_start_steps, 0, self.train.steps)
        _range("rollout.on_policy_fraction", self.rollout.on_policy_fraction, 0.0, 1.0)
        if self.loss.entry_clip is not None:
            _range("loss.entry_clip", self.loss.entry_clip, 0.0, math.inf, low_open=True, high_open=True)
        _range("loss.token_keep", self.loss.token_keep, 0.0, 1.0, low_open=True)
        _choice("loss.token_select", self.loss.token_select, ("top_divergence", "random"))
        _range("loss.reward_mix", self.loss.reward_mix, 0.0, 1.0)
        if self.train.cpu_threads is not None:
            _positive("train.cpu_threads", self.train.cpu_threads)
        if self.data.select_pool is not None:
            _positive("data.select_pool", self.data.select_pool)
        _range("data.select_keep", self.data.select_keep, 0.0, 1.0, low_open=True)
        _positive("data.select_probe_tokens", self.data.select_probe_tokens)
        if self.data.dedup_threshold is not None:
            _range("data.dedup_threshold", self.data.dedup_threshold, 0.0, 1.0, low_open=True)
        if not isinstance(self.data.teacher_template, str) or "{prompt}" not in self.data.teacher_template:
            raise ConfigError("data.teacher_template must contain {prompt} (the question the student answers)")
        if self.train.subspace_lock_step is not None:
            _positive("train.subspace_lock_step", self.train.subspace_lock_step)
        _positive("train.subspace_lock_rank", self.train.subspace_lock_rank)
        if self.loss.mode == "sft" and self.rollout.source == "student":
            raise ConfigError(
                "loss.mode=sft learns from someone else's completions: set rollout.source=teacher (distill the "
                "teacher's samples) or rollout.source=reference (the dataset's answers)"
            )
        if self.loss.mode != "sft" and self.rollout.source == "reference":
            raise ConfigError(
                f"rollout.source=reference (dataset answers) only works with loss.mode=sft, not {self.loss.mode}"
            )
        if self.lora.enabled and self.student.path is None:
            raise ConfigError("lora.enabled needs student.path (the built-in demo trains full weights)")
        if self.train.fsdp and self.lora.enabled:
            raise ConfigError(
                "train.fsdp shards the student's full weights; LoRA trains small adapters, for which data "
                "parallelism (train.fsdp=false under torchrun) is the right tool"
            )
        if self.train.fsdp and self.rollout.engine == "vllm":
            raise ConfigError(
                "rollout.engine=vllm gives every rank an engine with the whole student, which train.fsdp shards: "
                "use data parallelism (train.fsdp=false) or rollout.engine=hf"
            )
        if self.train.fsdp and self.train.subspace_lock_step is not None:
            raise ConfigError("train.subspace_lock_step projects whole gradient matrices: not with train.fsdp")
        if self.teacher.self_distill and self.teacher.path is not None:
            raise ConfigError(
                "teacher.self_distill uses the student as its own (frozen) teacher: leave teacher.path unset"
            )
        if self.rollout.on_policy_fraction < 1.0 and self.loss.mode == "sampled_token":
            raise ConfigError(
                "rollout.on_policy_fraction < 1 mixes in teacher samples, where the sampled-token advantage has no "
                "meaning; use a full-vocabulary loss (reverse_kl, forward_kl, jsd, topk)"
            )
        if self.loss.reward_mix < 1.0 and self.loss.mode != "sampled_token":
            raise ConfigError("loss.reward_mix mixes advantages: it needs loss.mode=sampled_token")
        self._validate_topk_teacher()
        if self.loss.entry_clip is not None and self.loss.mode not in DIVERGENCE_MODES:
            raise ConfigError(
                f"loss.entry_clip clips full-vocabulary divergence terms: use one of {', '.join(DIVERGENCE_MODES)}"
            )
        if self.loss.hard_label_weight > 0 and self.loss.mode not in DIVERGENCE_MODES:
            raise ConfigError(
                "loss.hard_label_weight mixes the cross-entropy into a full-vocabulary divergence: use one of "
                f"{', '.join(DIVERGENCE_MODES)} (loss.mode=sft is the cross-entropy alone)"
            )
        return self

    def _validate_topk_teacher(self) -> None:
        """A teacher that returns only its top-k log-probs (teacher.server, teacher.engine=vllm) feeds the top-k
        target loss and nothing that needs its weights."""
        teacher = self.teacher
        _choice("teacher.engine", teacher.engine, TEACHER_ENGINES)
        _positive("teacher.top_k", teacher.top_k)
        _range("teacher.timeout_s", teacher.timeout_s, 0.0, math.inf, low_open=True)
        _range("teacher.retries", teacher.retries, 0, math.inf)
        for url in teacher.server_urls:
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
                raise ConfigError(f"teacher.server must be http(s)://host:port URLs, got {url!r}")
        if teacher.server is not None and not teacher.server_urls:
            raise ConfigError("teacher.server is an empty list; give a URL or a list of URLs")
        self._validate_topk_dir()
        if not teacher.topk_only:
            return
        which = "teacher.server" if teacher.server is not None else "teacher.engine=vllm"
        if teacher.server is not None and teacher.engine == "vllm":
            raise ConfigError("teacher.server and teacher.engine=vllm are two teachers: set one of them")
        if teacher.engine == "vllm" and teacher.path is None:
            raise ConfigError("teacher.engine=vllm runs the teacher in-process: set teacher.path to its directory")
        if self.loss.mode != "topk":
            raise ConfigError(
                f"{which} gives only the teacher's top-k log-probs: use loss.mode=topk (the top-k target loss, "
                f"tail bucket by loss.add_tail), not {self.loss.mode}"
            )
        if self.loss.resolved_teacher_temperature != 1.0:
            raise ConfigError(
                f"{which}: the teacher's log-probs come at temperature 1 (vLLM's prompt_logprobs), not at "
                f"{self.loss.teacher_temperature_setting()}: set loss.teacher_temperature=1 (loss.temperature stays "
                "the student's)"
            )
        needs_weights = {
            "teacher.self_distill": teacher.self_distill,
            "rollout.source=teacher": self.rollout.source == "teacher",
            "rollout.on_policy_fraction < 1": self.rollout.on_policy_fraction < 1.0,
            # With teacher.topk_dir the cold start trains on the shards instead of the teacher's samples.
            "train.cold_start_steps > 0": self.train.cold_start_steps > 0 and teacher.topk_dir is None,
            "data.select_pool": self.data.select_pool is not None,
        }
        for key, used in needs_weights.items():
            if used:
                raise ConfigError(
                    f"{key} needs the teacher's weights in-process (it samples from the teacher or reads its hidden "
                    f"states), which {which} does not give; use teacher.engine=hf with teacher.path"
                )

    def _validate_topk_dir(self) -> None:
        """teacher.topk_dir: the top-k target loss on stored sequences, every step (alone) or as a cold start."""
        teacher = self.teacher
        if teacher.topk_dir is None:
            return
        if self.loss.resolved_teacher_temperature != 1.0:
            raise ConfigError(
                "teacher.topk_dir: the stored log-probs are the teacher's at temperature 1, not at "
                f"{self.loss.teacher_temperature_setting()}: set loss.teacher_temperature=1 (loss.temperature stays "
                "the student's)"
            )
        if not teacher.offline:
            if self.train.cold_start_steps == 0:
                raise ConfigError(
                    "teacher.topk_dir beside a live teacher (teacher.path, server or engine=vllm) is its cold start: "
                    "set train.cold_start_steps > 0, or drop the live teacher to train on the shards every step"
                )
            return
        if self.loss.mode != "topk":
            raise ConfigError(
                "teacher.topk_dir alone holds only the teacher's top-k log-probs: use loss.mode=topk (the top-k "
                f"target loss, tail bucket by loss.add_tail), not {self.loss.mode}"
            )
        unused = {
            "train.cold_start_steps > 0": self.train.cold_start_steps > 0,
            "rollout.source=teacher": self.rollout.source == "teacher",
            "rollout.on_policy_fraction < 1": self.rollout.on_policy_fraction < 1.0,
            "data.select_pool": self.data.select_pool is not None,
            "rollout.engine=vllm": self.rollout.engine == "vllm",
        }
        for key, used in unused.items():
            if used:
                raise ConfigError(
                    f"{key} does not apply to teacher.topk_dir alone, where every step trains on the stored "
                    "sequences; give a live teacher (teacher.path, server or engine=vllm) for on-policy steps"
                )


def check_vocabulary_settings(config: TrainConfig, vocab_size: int) -> None:
    """The settings that count tokens against the models' shared vocabulary, known once the tokenizer is loaded:
    a top-k larger than the vocabulary would fail at the first loss call, after a rollout, and a clamped
    overlap_k would log a meaningless 1.0 for every overlap metric."""
    ks = {"train.overlap_k": config.train.overlap_k} if config.train.overlap_k is not None else {}
    if config.loss.mode == "topk":
        if config.teacher.topk_only:
            ks["teacher.top_k"] = config.teacher.top_k
        else:
            ks["loss.top_k"] = config.loss.top_k
    for key, k in ks.items():
        if k > vocab_size:
            raise ConfigError(
                f"{key}={k} exceeds the vocabulary shared by the models' tokenizer ({vocab_size} tokens); "
                f"use {key}={vocab_size} or less"
            )


def overlap_k(config: TrainConfig, vocab_size: int) -> int:
    """train.overlap_k, or its default for this vocabulary (see LoopConfig.overlap_k)."""
    return config.train.overlap_k or (16 if vocab_size >= 80 else max(1, vocab_size // 5))


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer; got {value!r}")


def _range(key, value, low, high, low_open=False, high_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{key} must be a number; got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}; got {value!r}")
