"""Update-geometry diagnostics and subspace locking on planted updates with known answers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from opd_fast.cli.diagnose import add_diagnose_parser
from opd_fast.diagnostics import (
    Checkpoint,
    DiagnoseSettings,
    DiagnosticsError,
    bf16_unchanged_mask,
    compare_matrices,
    diagnose,
    hill_alpha,
    layer_type,
    principal_angles,
    subspace_emergence,
)
from opd_fast.diagnostics.report import _figures
from opd_fast.trainer import SubspaceLock, run

transformers = pytest.importorskip("transformers")
save_file = pytest.importorskip("safetensors.torch").save_file
load_file = pytest.importorskip("safetensors.torch").load_file

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    # The matrices here are tiny: OpenMP threads only add synchronization, which on a busy 2-core machine
    # turns a millisecond SVD into half a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bf16_grid(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """fp32 random values that bf16 represents exactly, so bf16 rounding of small changes is predictable."""
    return (torch.randn(*shape) * scale).bfloat16().float()


def orthonormal(n: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0].float()


def tiny_qwen2(**overrides):
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
        **overrides,
    )
    return transformers.Qwen2ForCausalLM(config)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd-fast")
    add_diagnose_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


# ---------------------------------------------------------------------------------------------------------------
# Single-matrix metrics


def test_layer_type_from_name():
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert layer_type("model.layers.11.mlp.down_proj.weight") == "down_proj"
    assert layer_type("model.embed_tokens.weight") == "embed_tokens"
    assert layer_type("lm_head.weight") == "lm_head"
    assert layer_type("w1") == "w1"


def test_bf16_invisible_changes_count_as_unchanged():
    w0 = bf16_grid(64, 48)
    # 1.5e-3 relative: above eta = 1e-3 in fp32, but below half a bf16 ulp (>= 2^-9), so rounding undoes it.
    w1 = w0 * (1 + 1.5e-3)
    raw = (w1 - w0).abs() <= 1e-3 * torch.maximum(w0.abs(), w1.abs())
    assert raw.float().mean() < 0.01
    assert bf16_unchanged_mask(w0, w1).all()
    assert not bf16_unchanged_mask(w0, w0 * 1.05).any()


def test_principal_angles_known_rotation():
    for theta in (1e-9, 0.3, math.pi / 3):
        a = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
        b = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
        assert principal_angles(a, b).item() == pytest.approx(theta, rel=1e-9)
    q = orthonormal(10, 4).double()
    assert principal_angles(q, q).abs().max() < 1e-7


def test_hill_estimator():
    s = torch.tensor([math.e**2, math.e, 1.0], dtype=torch.float64)
    # 1/(k-1) Σ_{i<k} log(σ_i/σ_k) = (2 + 1)/2 → α̂ = 2/3
    assert hill_alpha(s, 3) == (pytest.approx(2 / 3), 3)
    # σ_i = i^(-1/a) is the quantile function of a Pareto tail of index a: α̂ → a for k ≪ n.
    power_law = torch.arange(1, 401, dtype=torch.float64) ** -0.5
    alpha, k = hill_alpha(power_law, 60)
    assert k == 60 and alpha == pytest.approx(2.0, rel=0.1)
    assert hill_alpha(power_law)[1] == 20  # default k = ⌈√400⌉
    assert hill_alpha(torch.tensor([1.0, 0.0, 0.0])) == (None, 0)
    assert hill_alpha(torch.ones(5))[0] is None  # flat spectrum: α̂ diverges


def test_dense_low_rank_update():
    m, n, r = 96, 64, 3
    w0 = bf16_grid(m, n, scale=0.1)
    delta = 0.2 * orthonormal(m, r) @ orthonormal(n, r).T  # r equal singular values: stable rank exactly r
    out = compare_matrices(w0, w0 + delta, DiagnoseSettings(top_k=8))
    assert out["stable_rank"] == pytest.approx(r, abs=1e-3)
    assert out["frobenius_norm"] == pytest.approx(0.2 * math.sqrt(r), rel=1e-4)
    assert out["spectral_norm"] == pytest.approx(0.2, rel=1e-4)
    assert out["top_k"] == 8
    assert out["principal_angle_max_deg"] > 1 and out["principal_angle_left_max_deg"] > 1
    assert out["principal_angle_right_max_deg"] > 1
    assert 0 < out["nss"] < 1
    assert out["update_sparsity"] < 0.15  # a dense change is bf16-visible in almost every entry
    # With k = min(m, n) the right subspace is all of R^n: no rotation is possible there, nothing is measured.
    clipped = compare_matrices(w0, w0 + delta, DiagnoseSettings(top_k=1000))
    assert clipped["principal_angle_right_full_rank"] and clipped["principal_angle_right_max_deg"] is None


def test_full_rank_subspaces_are_flagged_not_measured():
    w0 = bf16_grid(32, 16, scale=0.1)
    w1 = w0 + 0.05 * torch.randn(32, 16)
    square = compare_matrices(w0[:16], w1[:16])  # top_k = 512 clipped to 16: both subspaces are all of R^16
    assert square["top_k"] == 16 and square["principal_angle_full_rank"]
    assert square["principal_angle_left_full_rank"] and square["principal_angle_right_full_rank"]
    angle_keys = [f"principal_angle{side}_{stat}_deg" for side in ("", "_left", "_right") for stat in ("max", "mean")]
    assert all(square[key] is None for key in angle_keys)  # not the ~1e-13° of SVD rounding
    assert compare_matrices(w0[:16], w0[:16])["principal_angle_max_deg"] is None
    tall = compare_matrices(w0, w1)  # k = 16: the right side is all of R^16, the left a 16-D subspace of R^32
    assert not tall["principal_angle_full_rank"] and not tall["principal_angle_left_full_rank"]
    assert tall["principal_angle_right_full_rank"] and tall["principal_angle_right_max_deg"] is None
    assert tall["principal_angle_left_max_deg"] > 1
    assert tall["principal_angle_max_deg"] == tall["principal_angle_left_max_deg"]
    assert tall["principal_angle_mean_deg"] == pytest.approx(tall["principal_angle_left_mean_deg"], rel=1e-12)
    below = compare_matrices(w0[:16], w1[:16], DiagnoseSettings(top_k=8))
    assert not (below["principal_angle_left_full_rank"] or below["principal_angle_right_full_rank"])
    assert below["principal_angle_left_max_deg"] > 1 and below["principal_angle_right_max_deg"] > 1


def test_sparse_update_and_mask_overlaps():
    m, n = 96, 64
    w0 = bf16_grid(m, n)
    magnitude = w0.abs().flatten()

    def changed_at(index: torch.Tensor) -> torch.Tensor:
        w1 = (w0 * (1 + 1.5e-3)).flatten()  # invisible in bf16 everywhere ...
        w1[index] = w0.flatten()[index] * 1.5  # ... visible at the planted entries
        return w1.view(m, n)

    density = 0.3
    count = round(density * m * n)
    random_entries = torch.randperm(m * n)[:count]
    out = compare_matrices(w0, changed_at(random_entries))
    assert out["update_sparsity"] == pytest.approx(1 - count / (m * n), abs=1e-12)
    assert out["low_magnitude_mask_overlap"] == pytest.approx(0.5, abs=0.06)
    assert out["principal_mask_overlap"] == pytest.approx(0.5, abs=0.06)
    assert out["low_magnitude_mask_overlap_ratio"] == pytest.approx(out["low_magnitude_mask_overlap"] / 0.5)

    low_entries = magnitude.argsort()[:count]  # all inside the bottom half by |W0|
    out = compare_matrices(w0, changed_at(low_entries))
    assert out["low_magnitude_mask_overlap"] == pytest.approx(1.0)
    assert out["low_magnitude_mask_overlap_ratio"] == pytest.approx(2.0)

    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    principal = ((u[:, :8] * s[:8]) @ vh[:8]).abs().flatten()
    top = changed_at(principal.argsort(descending=True)[:count])
    out = compare_matrices(w0, top, DiagnoseSettings(rank=8, alpha=0.4))
    assert out["principal_mask_overlap"] == pytest.approx(1.0)
    assert out["principal_mask_overlap_ratio"] == pytest.approx(2.5)


def test_untouched_matrix_has_defined_metrics():
    w0 = bf16_grid(40, 24)
    for w1 in (w0.clone(), w0 * (1 + 1.5e-3)):  # identical, and changed below bf16 resolution
        out = compare_matrices(w0, w1)
        assert out["update_sparsity"] == 1.0
        assert out["principal_mask_overlap"] is None and out["low_magnitude_mask_overlap"] is None
        assert out["principal_angle_max_deg"] < 1e-4  # fp32 rounding of w1 alone rotates by ~1e-6°
        assert all(v is None or math.isfinite(v) for v in out.values())
    out = compare_matrices(w0, w0.clone())
    assert (out["stable_rank"], out["frobenius_norm"], out["spectral_norm"], out["nss"]) == (0, 0, 0, 0)
    assert out["principal_angle_max_deg"] == 0 and out["hill_alpha"] is None
    json.dumps(out, allow_nan=False)


def test_subspace_emergence_planted_and_random():
    m, n, k, steps = 48, 64, 4, 5
    w0 = torch.randn(m, n)
    basis = orthonormal(n, k)
    locked = [w0] + [w0 + torch.randn(m, k) @ basis.T for _ in range(steps)]
    sims = subspace_emergence(locked, k)
    assert len(sims) == steps and min(sims) > 0.999
    unrelated = [w0] + [w0 + torch.randn(m, n) for _ in range(steps)]
    sims = subspace_emergence(unrelated, k)
    assert sims[-1] == pytest.approx(1.0)
    assert sum(sims[:-1]) / (steps - 1) == pytest.approx(k / n, abs=0.1)
    assert subspace_emergence([w0, w0, w0 + 1], k) == [None, pytest.approx(1.0)]


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ({"eta": -1e-3}, "eta must be a finite number >= 0"),
        ({"eta": math.inf}, "eta must be a finite number >= 0"),
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"sim_k": -3}, "sim_k must be a positive integer"),
        ({"hill_k": 1}, "hill_k must be an integer >= 2"),
    ],
)
def test_settings_are_validated_once_when_built(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiagnoseSettings(**bad)
    settings = DiagnoseSettings(top_k=8, hill_k=3)
    with pytest.raises(AttributeError):
        settings.top_k = 0  # frozen: a validated object stays valid


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    """A tiny Qwen2 saved as BEFORE and, sharded, as AFTER with planted updates in layer 0."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    model = tiny_qwen2()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(root / "before")
    layer = model.model.layers[0]
    planted = {}
    with torch.no_grad():
        q = layer.self_attn.q_proj.weight
        q += 0.05 * orthonormal(q.shape[0], 2) @ orthonormal(q.shape[1], 2).T
        gate = layer.mlp.gate_proj.weight
        mask = torch.rand(gate.shape) < 0.2
        planted["gate_density"] = mask.sum().item() / mask.numel()
        gate.mul_(1 + 1.5e-3)
        gate[mask] *= 1.5
    model.save_pretrained(root / "after", max_shard_size="40KB")
    assert (root / "after" / "model.safetensors.index.json").exists()
    return root / "before", root / "after", planted


def test_diagnose_model_checkpoints(model_pair):
    before, after, planted = model_pair
    report = diagnose([before, after], DiagnoseSettings(top_k=8), progress=False)
    rows = {r["name"]: r for r in report["matrices"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["layer_type"] == "q_proj" and q["shape"] == [64, 64]
    assert q["stable_rank"] == pytest.approx(2, abs=0.01)
    assert q["principal_angle_max_deg"] > 0.1
    gate = rows["model.layers.0.mlp.gate_proj.weight"]
    assert gate["update_sparsity"] == pytest.approx(1 - planted["gate_density"], abs=1e-9)
    untouched = rows["model.layers.1.mlp.down_proj.weight"]
    assert untouched["update_sparsity"] == 1.0 and untouched["frobenius_norm"] == 0.0
    assert untouched["stable_rank"] == 0.0 and untouched["principal_angle_max_deg"] == 0.0
    assert len(rows) == 2 * 7 + 2  # 7 projections per layer, embed_tokens, lm_head
    summary = report["summary"]
    assert list(summary["by_layer_type"])[:2] == ["embed_tokens", "q_proj"]
    assert summary["by_layer_type"]["q_proj"]["matrices"] == 2
    assert summary["by_layer_type"]["q_proj"]["stable_rank"] == pytest.approx(1, abs=0.01)  # mean of 2 and 0
    total = sum(r["parameters"] for r in rows.values())
    unchanged = sum(r["parameters"] * r["update_sparsity"] for r in rows.values())
    assert summary["overall"]["update_sparsity"] == pytest.approx(unchanged / total)
    assert summary["overall"]["parameters"] == total
    assert {s["reason"] for s in summary["skipped"]} == {"1-D, not a matrix"}  # norms and biases
    assert summary["mismatched"] == []
    json.dumps(report, allow_nan=False)


def test_diagnose_reports_mismatched_and_missing(tmp_path):
    save_file(
        {"a.weight": torch.randn(8, 4), "b.weight": torch.randn(8, 4), "c.weight": torch.randn(3, 3)},
        tmp_path / "x.safetensors",
    )
    save_file(
        {"a.weight": torch.randn(8, 4), "b.weight": torch.randn(4, 8), "d.weight": torch.randn(3, 3)},
        tmp_path / "y.safetensors",
    )
    report = diagnose([tmp_path / "x.safetensors", tmp_path / "y.safetensors"], progress=False)
    assert [r["name"] for r in report["matrices"]] == ["a.weight"]
    assert report["summary"]["mismatched"] == [{"name": "b.weight", "shapes": [[8, 4], [4, 8]]}]
    reasons = {s["name"]: s["reason"] for s in report["summary"]["skipped"]}
    assert "y.safetensors" in reasons["c.weight"] and "x.safetensors" in reasons["d.weight"]


def test_diagnose_series_adds_sim_k(tmp_path):
    m, n, k = 48, 64, 4
    w0 = {"planted.weight": torch.randn(m, n), "random.weight": torch.randn(m, n)}
    basis = orthonormal(n, k)
    paths = []
    for t in range(5):
        weights = dict(w0)
        if t:
            weights["planted.weight"] = w0["planted.weight"] + torch.randn(m, k) @ basis.T
            weights["random.weight"] = w0["random.weight"] + torch.randn(m, n)
        paths.append(tmp_path / f"step{t}.safetensors")
        save_file(weights, paths[-1])
    report = diagnose(paths, DiagnoseSettings(sim_k=k), progress=False)
    rows = {r["name"]: r for r in report["matrices"]}
    assert min(rows["planted.weight"]["sim_k"]) > 0.999
    assert sum(rows["random.weight"]["sim_k"][:-1]) / 3 == pytest.approx(k / n, abs=0.1)
    summary = report["summary"]
    assert len(summary["overall"]["sim_k"]) == 4 and summary["settings"]["sim_k"] == k
    assert summary["by_layer_type"]["planted"]["sim_k"] == rows["planted.weight"]["sim_k"]


def test_checkpoint_errors_name_the_file(tmp_path, model_pair):
    before, _, _ = model_pair
    missing = tmp_path / "nowhere"
    with pytest.raises(DiagnosticsError, match="nowhere"):
        diagnose([before, missing], progress=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(DiagnosticsError, match=r"garbage\.safetensors"):
        diagnose([before, garbage], progress=False)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(16, 16)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DiagnosticsError, match=r"truncated\.safetensors"):
        diagnose([good, truncated], progress=False)
    with pytest.raises(DiagnosticsError, match="no 2-D weight matrix"):
        diagnose([before, good], progress=False)
    bin_dir = tmp_path / "bin_model"
    bin_dir.mkdir()
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DiagnosticsError, match="safe_serialization"):
        diagnose([before, bin_dir], progress=False)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard-1.safetensors"}}))
    with pytest.raises(DiagnosticsError, match=r"shard-1\.safetensors"):
        diagnose([good, sharded], progress=False)
    with pytest.raises(ValueError, match="alpha"):
        DiagnoseSettings(alpha=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_json_table_and_plots(model_pair, tmp_path, capsys):
    before, after, _ = model_pair
    out_json, plots = tmp_path / "report.json", tmp_path / "plots"
    assert (
        run_cli(["diagnose", str(before), str(after), "--json", str(out_json), "--plot", str(plots), "--top-k", "8"])
        == 0
    )
    data = json.loads(out_json.read_text())
    assert set(data) == {"matrices", "summary"}
    for row in data["matrices"]:
        assert {"name", "update_sparsity", "stable_rank", "frobenius_norm", "nss", "principal_angle_max_deg"} <= set(
            row
        )
    assert data["summary"]["settings"]["top_k"] == 8
    assert (plots / "metrics_by_layer_type.png").read_bytes()[:8] == PNG
    table = capsys.readouterr().out
    assert "q_proj" in table and "gate_proj" in table and "all" in table and "skipped" in table


def test_cli_series_plots_sim_k(model_pair, tmp_path):
    before, after, _ = model_pair
    plots = tmp_path / "plots"
    assert run_cli(["diagnose", str(before), str(after), str(after), "--plot", str(plots), "--sim-k", "4"]) == 0
    assert (plots / "sim_k.png").read_bytes()[:8] == PNG


def test_plots_name_the_pair_and_the_full_rank_angles(model_pair):
    plt = pytest.importorskip("matplotlib.pyplot")
    before, after, _ = model_pair
    report = diagnose(
        [before, after, after / "model.safetensors.index.json"], DiagnoseSettings(top_k=8), progress=False
    )
    figures = dict(_figures(report))
    # Figure.get_suptitle needs matplotlib 3.8; the plot extra allows 3.7.
    assert (
        figures["metrics_by_layer_type.png"]._suptitle.get_text()
        == "update geometry: before → after/model (16 matrices)"
    )
    assert figures["sim_k.png"].axes[0].get_title().endswith(": before → after/model")
    assert [t.get_text() for t in figures["sim_k.png"].axes[0].get_xticklabels()] == ["after", "after/model"]
    angles = figures["metrics_by_layer_type.png"].axes[1]
    assert angles.get_title() == "max principal angle (°)" and angles.get_xlabel() == ""  # top-k = 8 < every side
    for fig in figures.values():
        plt.close(fig)

    clipped = diagnose([before, after], progress=False)  # top_k = 512: every side of the 64-wide model
    figures = dict(_figures(clipped))
    angles = figures["metrics_by_layer_type.png"].axes[1]
    assert "whole space" in angles.get_xlabel() and "16 of 16 matrices" in angles.get_xlabel()
    shown = [t.get_text() for t in angles.get_xticklabels()]
    assert shown == ["embed_tokens", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]  # not square
    square = diagnose([before, after], include="q_proj", progress=False)
    figures = dict(_figures(square))
    angles = figures["metrics_by_layer_type.png"].axes[1]
    assert "0 by construction" in angles.texts[0].get_text()
    for fig in figures.values():
        plt.close(fig)


def test_trainer_checkpoints_read_only_the_model_weights(models, tmp_path, capsys):
    # rollout.reuse=2 stores the rollout's integer tensors, the subspace lock its bases under the locked
    # matrix's own name: the files the bundled trainer keeps next to model.safetensors.
    overrides = ["train.steps=2", "train.save_every=1", "rollout.reuse=2", "train.subspace_lock_step=1"]
    run(tiny_config(models, tmp_path, *overrides, "train.subspace_lock_include=q_proj", "train.subspace_lock_rank=2"))
    first, second = tmp_path / "checkpoints" / "step-00000001", tmp_path / "checkpoints" / "step-00000002"
    assert list(load_file(second / "subspace.safetensors")) == ["model.layers.0.self_attn.q_proj.weight"]
    assert "0.input_ids" in load_file(second / "rollout.safetensors")
    out_json = tmp_path / "report.json"
    assert run_cli(["diagnose", str(first), str(second), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    summary = json.loads(out_json.read_text())["summary"]
    assert {s["reason"] for s in summary["skipped"]} == {"1-D, not a matrix"}  # norm weights only
    assert sorted(Path(f).name for f in summary["ignored_files"]) == sorted(
        2 * ["rng.safetensors", "rollout.safetensors", "subspace.safetensors"]
    )
    assert summary["overall"]["matrices"] == 9  # embed_tokens, 7 projections, lm_head
    assert f"skipped {len(summary['skipped'])} tensors: {len(summary['skipped'])} not a 2-D matrix" in table
    assert "not read: 6 files" in table and "I64" not in table and "torch_cpu" not in table
    # The 16-wide student's matrices: top-k = 512 spans a side of every one and both sides of the square ones.
    assert "angles: top-k=512 spans a whole side of 9 of 9 matrices (both sides of 4)" in table
    assert "--top-k 14 or less" in table  # the 15-row embedding is the smallest side

    lone = tmp_path / "lone"  # a directory without transformers' file names: every .safetensors file is read
    lone.mkdir()
    (lone / "adapter_model.safetensors").write_bytes((second / "model.safetensors").read_bytes())
    assert Checkpoint(lone).names == Checkpoint(second).names and Checkpoint(lone).ignored == []


def test_cli_bad_input_exits_2_with_message(model_pair, tmp_path, capsys):
    before, _, _ = model_pair
    missing = tmp_path / "missing_ckpt"
    assert run_cli(["diagnose", str(before), str(missing)]) == 2
    err = capsys.readouterr().err
    assert "missing_ckpt" in err and "Traceback" not in err
    assert run_cli(["diagnose", str(before)]) == 2
    assert "BEFORE and AFTER" in capsys.readouterr().err
    for bad in (["--alpha", "1.5"], ["--top-k", "0"], ["--eta", "-1"], ["--hill-k", "1"], ["--include", "("]):
        with pytest.raises(SystemExit) as exc:
            run_cli(["diagnose", str(before), str(before), *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Subspace locking


def lm_step(model, optimizer, lock_project=None):
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    loss = model(tokens, labels=tokens).loss
    optimizer.zero_grad()
    loss.backward()
    if lock_project is not None:
        lock_project(model)
    optimizer.step()


def off_subspace(delta: torch.Tensor, basis: torch.Tensor) -> float:
    """‖ΔW (I − VVᵀ)‖ / ‖ΔW‖."""
    delta, basis = delta.double(), basis.double()
    return ((delta - (delta @ basis) @ basis.T).norm() / delta.norm()).item()


@pytest.mark.parametrize("mode", ["hooks", "project_"])
def test_subspace_lock_keeps_updates_in_captured_row_space(mode):
    torch.manual_seed(0)
    model = tiny_qwen2().double()  # float64, so the check below sees the projection, not fp32 rounding
    lock = SubspaceLock(model, rank=2, include=r"self_attn|mlp")
    assert all("self_attn" in name or "mlp" in name for name in lock.initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        lm_step(model, optimizer)
    ranks = lock.capture(model)
    assert set(ranks.values()) == {2} and len(ranks) == 2 * 7
    captured = {name: p.detach().clone() for name, p in model.named_parameters()}
    # A fresh optimizer: momentum gathered before the capture holds unprojected gradients.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    if mode == "hooks":
        lock.attach(model)
    for _ in range(3):
        lm_step(model, optimizer, lock.project_ if mode == "project_" else None)
    params = dict(model.named_parameters())
    for name, basis in lock.bases.items():
        assert basis.shape == (params[name].shape[1], 2) and basis.dtype == params[name].dtype
        delta = params[name].detach() - captured[name]
        assert delta.norm() > 0, name
        assert off_subspace(delta, basis) < 1e-9, name
    embed = "model.embed_tokens.weight"  # not locked: free to move
    assert embed not in lock.bases and not torch.equal(params[embed].detach(), captured[embed])
    if mode == "hooks":
        lock.detach()
        name = "model.layers.0.self_attn.q_proj.weight"
        start = params[name].detach().clone()
        lm_step(model, torch.optim.SGD(model.parameters(), lr=0.5))
        assert off_subspace(params[name].detach() - start, lock.bases[name]) > 0.1


def test_subspace_lock_edge_cases():
    model = tiny_qwen2()
    lock = SubspaceLock(dict(model.named_parameters()), rank=4, include=lambda name: name.endswith("q_proj.weight"))
    with pytest.raises(RuntimeError, match="capture"):
        lock.attach(model)
    ranks = lock.capture(model)  # nothing trained yet: ΔW = 0, rank 0, the matrices stay frozen
    assert set(ranks.values()) == {0}
    lock.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    q = model.model.layers[0].self_attn.q_proj.weight
    start = q.detach().clone()
    lm_step(model, optimizer)
    assert torch.equal(q.detach(), start)
    lock.detach()
    with pytest.raises(ValueError, match="no 2-D"):
        SubspaceLock(model, include="nothing_matches")
    with pytest.raises(ValueError, match="rank"):
        SubspaceLock(model, rank=0)
