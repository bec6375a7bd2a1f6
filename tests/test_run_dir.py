"""Reusing a run dir (issue 11, item 2): a run dir holds one run. A run that would not continue the
newest checkpoint of run_dir (resume=never, a checkpoint elsewhere, an older step of this run dir)
while checkpoints/ holds checkpoints it does not continue is refused before anything is built;
overwrite=archive moves those aside, overwrite=delete deletes them. Pruning keeps the newest
keep_last checkpoints up to the step just saved, never the later ones of another run. Real
`pretrain train` runs under DDP and DeepSpeed (fp32 ZeRO-2), plus a unit test of the pruning."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import cli, inproc_error_line, tb_scalars, tmp_debris, torchrun, train_overrides
from pretrain.engine.checkpoint import Checkpointer, list_checkpoints

BACKENDS = {"ddp": {}, "deepspeed": dict(train__backend="deepspeed", optim__name="adamw", optim__lr=1e-3)}


def _names(d: Path):
    return [p.name.removesuffix(".pt") for p in list_checkpoints(d)]


def _archives(run_dir: Path):
    return sorted(run_dir.glob("checkpoints.old-*"))


def _ov(shards, run_dir, backend, **kv):
    return train_overrides(shards, run_dir, **{**BACKENDS[backend], **kv})


def _train(experiment, shards, run_dir, backend, **kv):
    return cli("train", experiment, *_ov(shards, run_dir, backend, **kv), timeout=200, check=True)


def _resumed_from(run_dir: Path):
    import re

    return [int(s) for s in re.findall(r"resumed from step (\d+)", (run_dir / "log.txt").read_text())]


@pytest.fixture(scope="module", params=list(BACKENDS))
def old_run(request, tmp_path_factory, digits_shards, experiment):
    """A finished 4-step run with checkpoints at steps 2 and 4 (the 'older run' of a reused dir)."""
    run_dir = tmp_path_factory.mktemp(f"old_{request.param}") / "run"
    _train(experiment, digits_shards, run_dir, request.param, train__max_steps=4, checkpoint__every_steps=2,
           checkpoint__keep_last=10)
    assert _names(run_dir / "checkpoints") == ["step_00000002", "step_00000004"]
    return request.param, run_dir


@pytest.fixture
def reused(old_run, tmp_path):
    """A copy of old_run's run dir to reuse: (backend, run_dir)."""
    backend, src = old_run
    shutil.copytree(src, tmp_path / "run")
    return backend, tmp_path / "run"


# ------------------------------------------------------------------------------------------------ 1. the rule
@pytest.mark.slow
def test_fresh_start_in_a_used_run_dir_is_refused_before_the_model_is_built(reused, digits_shards, experiment,
                                                                            capsys, monkeypatch, tmp_path):
    backend, run_dir = reused
    monkeypatch.setattr("pretrain.engine.trainer.create_method",
                        lambda cfg: pytest.fail("the run dir must be checked before the model is built"))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    other = tmp_path / "other"   # resume= a checkpoint of another run is a fresh start of this run dir too
    shutil.copytree(run_dir / "checkpoints", other / "checkpoints")
    for resume in ("never", other / "checkpoints" / list_checkpoints(other / "checkpoints")[0].name):
        line = inproc_error_line(capsys, "train", experiment,
                                 *_ov(digits_shards, run_dir, backend, resume=resume, train__max_steps=2))
        assert str(run_dir) in line and "step_00000004" in line, line
        assert "overwrite=archive" in line and "overwrite=delete" in line and "resume=auto" in line, line
        assert line.index("overwrite=archive") < line.index("overwrite=delete")   # the safe remedy first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before and not _archives(run_dir)


def test_bad_overwrite_value(tmp_path, digits_shards, experiment, capsys):
    """Checked on every run, not only when it would act (HF's overwrite_output_dir=true means neither)."""
    line = inproc_error_line(capsys, "train", experiment, *train_overrides(digits_shards, tmp_path, overwrite="true"))
    assert "overwrite must be null, archive or delete" in line and "True" in line


@pytest.mark.slow
def test_overwrite_archive_keeps_old_checkpoints_and_prunes_only_the_new_runs(reused, digits_shards, experiment):
    """resume=never overwrite=archive: the old steps 2 and 4 move to checkpoints.old-<UTC time>/; the new
    run keeps its own newest 2 (steps 2, 3: today's pruning kept the old run's later step 4 and deleted
    the new run's); resume=auto then continues the new run (step 3), not the old one (step 4)."""
    backend, run_dir = reused
    old = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in list_checkpoints(run_dir / "checkpoints")}
    _train(experiment, digits_shards, run_dir, backend, resume="never", overwrite="archive", train__max_steps=3,
           checkpoint__every_steps=1, checkpoint__keep_last=2)
    (archive,) = _archives(run_dir)
    assert _names(archive) == ["step_00000002", "step_00000004"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in list_checkpoints(archive)} == old   # moved, intact
    assert _names(run_dir / "checkpoints") == ["step_00000002", "step_00000003"]
    assert not _resumed_from(run_dir)

    _train(experiment, digits_shards, run_dir, backend, train__max_steps=4, checkpoint__every_steps=1,
           checkpoint__keep_last=2)   # resume=auto
    assert _resumed_from(run_dir) == [3]
    assert _names(run_dir / "checkpoints") == ["step_00000003", "step_00000004"]
    assert _archives(run_dir) == [archive] and tmp_debris(run_dir) == []


@pytest.mark.slow
def test_overwrite_delete(reused, digits_shards, experiment):
    backend, run_dir = reused
    _train(experiment, digits_shards, run_dir, backend, resume="never", overwrite="delete", train__max_steps=1)
    assert _names(run_dir / "checkpoints") == ["step_00000001"] and not _archives(run_dir)
    assert not _resumed_from(run_dir) and tmp_debris(run_dir) == []
    # TensorBoard shows the new run only: the old run's steps 2-4 are purged, as a resume purges the steps after it
    assert sorted(tb_scalars(run_dir)) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("old_run", ["ddp"], indirect=True)   # the rule runs before any backend exists
def test_two_ranks_agree_and_only_rank_0_archives(reused, digits_shards, experiment):
    """Under torchrun every rank refuses with rank 0's error, and with overwrite=archive the old
    checkpoints are moved once (one archive), before any rank saves."""
    backend, run_dir = reused
    ov = _ov(digits_shards, run_dir, backend, resume="never", train__max_steps=2, checkpoint__every_steps=1)
    p = torchrun("-m", "pretrain.cli", "train", experiment, *ov, timeout=200)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert p.returncode != 0 and 1 <= len(errors) <= 2, p.stderr[-3000:]   # torchrun may stop one rank first
    assert all("overwrite=archive" in l for l in errors), p.stderr[-3000:]
    assert "pretrain/engine" not in p.stderr, p.stderr[-3000:]   # no traceback through our code (torchrun's own aside)
    torchrun("-m", "pretrain.cli", "train", experiment, *ov, "overwrite=archive", timeout=200, check=True)
    (archive,) = _archives(run_dir)
    assert _names(archive) == ["step_00000002", "step_00000004"]
    assert _names(run_dir / "checkpoints") == ["step_00000001", "step_00000002"] and tmp_debris(run_dir) == []


# ------------------------------------------------------------------------------------------------ 3. step_N exists
@pytest.mark.slow
def test_resume_from_an_older_step_of_the_same_run_dir(reused, digits_shards, experiment, capsys):
    """Resuming from step 2 of a dir that holds step 4 would write step 4 over the old one (today:
    DeepSpeed's rename fails with "Directory not empty", DDP overwrites silently) and leave the old
    later steps for resume=auto to pick after a crash. It is refused up front; overwrite=archive moves
    the later steps aside (keeping step 2 and all before it in place) and the run continues."""
    backend, run_dir = reused
    step2 = list_checkpoints(run_dir / "checkpoints")[0]
    line = inproc_error_line(capsys, "train", experiment, *_ov(digits_shards, run_dir, backend, resume=step2,
                                                               train__max_steps=4, checkpoint__every_steps=2))
    assert "step_00000004" in line and "overwrite=archive" in line, line
    assert _names(run_dir / "checkpoints") == ["step_00000002", "step_00000004"]

    old4 = list_checkpoints(run_dir / "checkpoints")[1].stat().st_ino
    _train(experiment, digits_shards, run_dir, backend, resume=step2, overwrite="archive", train__max_steps=4,
           checkpoint__every_steps=2, checkpoint__keep_last=10)
    assert _resumed_from(run_dir) == [2]
    (archive,) = _archives(run_dir)
    assert _names(archive) == ["step_00000004"] and list_checkpoints(archive)[0].stat().st_ino == old4
    assert _names(run_dir / "checkpoints") == ["step_00000002", "step_00000004"]
    assert list_checkpoints(run_dir / "checkpoints")[1].stat().st_ino != old4   # written by this run
    assert tmp_debris(run_dir) == []


# ------------------------------------------------------------------------------------------------ 2. pruning
class _FakeBackend:
    """Writes an empty checkpoint of a backend's shape (a .pt file or a directory), under its name."""

    def __init__(self, name):
        self.name = name

    def checkpoint_name(self, step):
        from pretrain.engine.backends import BACKENDS

        return BACKENDS[self.name].checkpoint_name(step)

    def save(self, path, client_state):
        torch.save(client_state, path) if self.name == "ddp" else path.mkdir()


@pytest.mark.parametrize("backend", ["ddp", "deepspeed", "fsdp"])
def test_prune_never_deletes_the_current_runs_checkpoints_for_later_ones(tmp_path, backend):
    """checkpoints/ holds steps 5 and 6 of another run; saving steps 1..3 with keep_last=2 keeps the
    current run's newest two (2, 3) and never touches the later ones. Today's pruning kept the two
    highest step numbers, 5 and 6, deleting each checkpoint right after it was written."""
    ck = Checkpointer(tmp_path, _FakeBackend(backend), keep_last=2)
    ck.dir.mkdir()
    for s in (5, 6):
        _FakeBackend(backend).save(ck._path(s), {"step": s})
    for s in (1, 2, 3):
        ck.save(s, 0, {}, {})
        assert ck._path(s).exists(), f"step {s} was pruned right after it was saved"
    assert _names(ck.dir) == ["step_00000002", "step_00000003", "step_00000005", "step_00000006"]
