"""Trainer faults: SIGKILL at every moment of a checkpoint write and mid-step, corrupted and foreign
checkpoints, pickles that carry code, model directories that carry code. Nothing is lost, nothing runs
that the user did not ask for, and every error names the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASK, TINY_RUN, tiny_config

from opd_fast.trainer import Trainer, TrainingInterrupted, run
from opd_fast.trainer import checkpoint as ckpt

WORKER = Path(__file__).with_name("fault_worker.py")
# keep_checkpoints=1: the tightest setting, where a wrong deletion would leave nothing to resume from.
RUN = ["train.steps=6", "train.save_every=2", "train.keep_checkpoints=1"]


def _losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def straight(models, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    run(tiny_config(models, out, *RUN))
    return out


@pytest.mark.parametrize(
    ("moment", "step", "latest_after_kill"),
    [
        ("model-file", 4, 2),
        ("optimizer-file", 4, 2),
        ("before-rename", 4, 2),
        ("before-pointer", 4, 2),
        ("mid-step", 4, 4),
    ],
)
def test_sigkill_keeps_the_latest_checkpoint_and_resume_reproduces_the_run(
    models, straight, tmp_path, moment, step, latest_after_kill
):
    student, teacher = models
    overrides = [*TINY_RUN, f"student.path={student}", f"teacher.path={teacher}", *RUN]
    killed = subprocess.run(
        [sys.executable, str(WORKER), moment, str(step), str(tmp_path), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(checkpoints).name == f"step-{latest_after_kill:08d}"

    run(tiny_config(models, tmp_path, *RUN), resume=True)
    assert _losses(tmp_path) == _losses(straight)  # bit for bit: only the steps after the checkpoint were redone
    # What the kill left behind (a staging directory, an unpointed checkpoint) is gone; keep_checkpoints=1.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000006"]


def test_a_signal_on_a_save_step_saves_it_once(models, tmp_path, monkeypatch):
    original = Trainer.train_step

    def train_step(self, step, diagnostics):
        if step == 1:  # the second step, which is also a scheduled save (save_every=2)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, diagnostics)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted) as info:
        run(tiny_config(models, tmp_path, *RUN))
    assert info.value.step == 2 and info.value.path.name == "step-00000002"
    with pytest.raises(ckpt.CheckpointError, match="is the latest checkpoint already"):
        trainer = Trainer(tiny_config(models, tmp_path, *RUN), task=TASK, progress=False)
        trainer.save(2)


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    """A finished 2-step run whose checkpoint the corruption tests copy and damage."""
    out = tmp_path_factory.mktemp("two_steps")
    run(tiny_config(models, out, "train.steps=2"))
    return out


def _damaged_copy(checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(checkpoint, out)
    return out, out / "checkpoints" / "step-00000002"


@pytest.fixture(scope="module")
def loader(models, tmp_path_factory):
    """Loads a checkpoint into a fresh trainer, as ``--resume`` does (end to end: tests/trainer/test_trainer.py)."""
    trainer = Trainer(tiny_config(models, tmp_path_factory.mktemp("loader")), task=TASK, progress=False)

    def load(out: Path):
        path = ckpt.latest_checkpoint(out / "checkpoints")
        return ckpt.load_checkpoint(path, trainer.student, trainer.optimizer, trainer.scheduler, trainer.device)

    return load


FILES = [
    ckpt.MODEL_FILE,
    ckpt.OPTIMIZER_FILE,
    ckpt.RNG_FILE,
    ckpt.ROLLOUT_FILE,
    ckpt.SUBSPACE_FILE,
    ckpt.STATE_FILE,
]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
@pytest.mark.parametrize("name", FILES)
def test_every_damaged_checkpoint_file_is_named(loader, checkpoint, tmp_path, name, damage):
    out, step_dir = _damaged_copy(checkpoint, tmp_path)
    file = step_dir / name
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[: max(1, file.stat().st_size // 3)])
    elif damage == "garbage":
        file.write_bytes(os.urandom(300))
    else:
        file.unlink()
    with pytest.raises(ckpt.CheckpointError, match=str(file).replace(".", r"\.")):
        loader(out)


def test_latest_pointing_nowhere_is_named(loader, checkpoint, tmp_path):
    out, step_dir = _damaged_copy(checkpoint, tmp_path)
    shutil.rmtree(step_dir)
    with pytest.raises(ckpt.CheckpointError, match=r"latest points to .*step-00000002, which does not exist"):
        loader(out)


def test_a_checkpoint_of_another_model_is_named(models, checkpoint, tmp_path):
    out, step_dir = _damaged_copy(checkpoint, tmp_path)
    _, teacher = models
    with pytest.raises(ckpt.CheckpointError, match=rf"{step_dir / ckpt.MODEL_FILE}.*(does not fit|do not match)"):
        run(tiny_config(models, out, "train.steps=3", f"student.path={teacher}"), resume=True)


class _RunsCode:
    """A pickle payload that would create a file when unpickled by a plain torch.load / pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_optimizer_pickle_that_carries_code_is_refused(loader, checkpoint, tmp_path):
    out, step_dir = _damaged_copy(checkpoint, tmp_path)
    marker = tmp_path / "code-ran"
    (step_dir / ckpt.OPTIMIZER_FILE).write_bytes(pickle.dumps({"state": _RunsCode(marker)}))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt.*(Weights only load failed|weights_only)"):
        loader(out)
    assert not marker.exists()  # weights_only=True: the payload never ran


def _model_with_code(models, tmp_path) -> tuple[Path, Path]:
    """A copy of the student whose config.json asks transformers to run the directory's own Python."""
    student, _ = models
    directory = tmp_path / "student_with_code"
    shutil.copytree(student, directory)
    marker = tmp_path / "remote-code-ran"
    (directory / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaForCausalLM as CustomForCausalLM\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


def _load_in_subprocess(directory: Path, trust: bool, modules: Path) -> subprocess.CompletedProcess:
    """Load the model as the trainer does, in a fresh process: transformers registers trusted classes
    globally, which must not leak into the other tests."""
    code = (
        "import sys, torch; from opd_fast.trainer.config import ConfigError, ModelConfig; "
        "from opd_fast.trainer.modeling import load_causal_lm\n"
        "try: load_causal_lm(ModelConfig(path=sys.argv[1], trust_remote_code=sys.argv[2] == 'True'), "
        "'student.path', torch.device('cpu'))\n"
        "except ConfigError as exc: print('refused:', exc)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(modules)}
    return subprocess.run(
        [sys.executable, "-c", code, str(directory), str(trust)], capture_output=True, text=True, env=env, timeout=300
    )


def test_model_code_runs_only_when_trusted(models, tmp_path):
    directory, marker = _model_with_code(models, tmp_path)
    assert tiny_config(models, tmp_path / "out", f"student.path={directory}").student.trust_remote_code is False
    untrusted = _load_in_subprocess(directory, False, tmp_path / "modules")
    assert untrusted.returncode == 0, untrusted.stderr[-2000:]  # loaded as plain Llama, or refused: both safe
    assert not marker.exists()
    trusted = _load_in_subprocess(directory, True, tmp_path / "modules")
    assert trusted.returncode == 0 and "refused" not in trusted.stdout, trusted.stderr[-2000:]
    assert marker.exists()  # the switch is real: the directory's code ran because the user asked
