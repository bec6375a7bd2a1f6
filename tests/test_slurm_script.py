"""`pretrain slurm --dry-run`: the batch script it writes, and the errors it gives before SLURM is
asked anything. (Submitting to a real cluster: tests/test_slurm.py.)"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import REPO, train_overrides
from launch.slurm import BODY_MARK, TEMPLATE, split_values, sweep_points
from pretrain.cli import main


def _dry(capsys, experiment, overrides, *opts):
    rc = main(["slurm", str(experiment), *overrides, *opts, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _sbatch_lines(script):
    return [l for l in script.splitlines() if l.startswith("#SBATCH")]


def test_dry_run_script_asks_for_what_the_options_say(capsys, tmp_path, digits_shards, experiment):
    run_dir = tmp_path / "run"
    script = _dry(capsys, experiment, train_overrides(digits_shards, run_dir), "--nodes", "2", "--gpus-per-node", "8",
                  "--cpus-per-task", "64", "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj",
                  "--qos", "high", "--job-name", "simclr", "--dependency", "afterok:12", "--signal-seconds", "120",
                  "--sbatch-arg=--exclusive")
    want = ["--job-name=simclr", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
            "--partition=gpu", "--time=1-00:00:00", "--account=proj", "--qos=high", "--dependency=afterok:12",
            "--signal=USR1@120", "--requeue", "--open-mode=append", f"--output={run_dir}/slurm-%j.out", "--exclusive"]
    got = [l.split(None, 1)[1] for l in _sbatch_lines(script)]
    assert [g for g in got if not g.startswith("--chdir=")] == want
    assert "NPROC_PER_NODE=8\n" in script and "MAX_RESTARTS=3\n" in script
    # the config by absolute path, and every override, with run_dir made absolute
    args = re.search(r"^ARGS=\((.*)\)$", script, re.M).group(1).split()
    assert args[0] == str(experiment.resolve()) and args[-1] == f"run_dir={run_dir}"
    assert "data.image_size=16" in args
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)   # valid bash


def test_script_body_is_the_template_body(capsys, tmp_path, digits_shards, experiment):
    """One body serves both the hand-editable template and the generated script."""
    script = _dry(capsys, experiment, train_overrides(digits_shards, tmp_path / "r"), "--nodes", "2")
    template = TEMPLATE.read_text()
    assert script.split(BODY_MARK, 1)[1] == template.split(BODY_MARK, 1)[1]
    assert "--gpus-per-node" not in "".join(_sbatch_lines(script))   # CPU nodes: no GPUs asked for
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
    for f in (REPO / "launch").glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(f)], check=True)


def test_array_sweep_is_the_grid_with_a_run_dir_per_point(capsys, tmp_path, digits_shards, experiment):
    sweep = tmp_path / "sweep"
    script = _dry(capsys, experiment, train_overrides(digits_shards, sweep), "--array", "optim.lr=0.1,0.3",
                  "--array", "method.temperature=0.1,0.2", "--array-parallel", "2")
    assert "#SBATCH --array=0-3%2" in script and f"#SBATCH --output={sweep}/slurm-%A_%a.out" in script
    cases = dict(re.findall(r"^  (\d)\) ARGS=\((.*)\) ;;$", script, re.M))
    assert sorted(cases) == ["0", "1", "2", "3"]
    assert cases["3"].split()[-3:] == ["optim.lr=0.3", "method.temperature=0.2",
                                       f"run_dir={sweep}/3-optim.lr=0.3-method.temperature=0.2"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sweep_values_split_outside_brackets():
    assert split_values("0.1,0.3") == ["0.1", "0.3"]
    assert split_values("[0.2,1.0],[0.5,1.0]") == ["[0.2,1.0]", "[0.5,1.0]"]
    assert sweep_points(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]


@pytest.mark.parametrize("opts,msg", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--array", "optim.lr"], "is not KEY=V1,V2"),
    (["--array", "optim.lr=0.1,"], "is not KEY=V1,V2"),
    (["--array", "optim.lrr=0.1,0.2"], "unknown config key 'optim.lrr'"),
    (["--nodes", "3"], "not divisible by world size 3"),          # global batch 32 over 3 ranks
    (["tran.epochs=1"], "unknown config key 'tran'"),
])
def test_bad_submission_is_one_error_line(capsys, tmp_path, digits_shards, experiment, opts, msg):
    rc = main(["slurm", str(experiment), *train_overrides(digits_shards, tmp_path / "r"), *opts, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err


def test_without_sbatch_says_where_to_run(capsys, tmp_path, digits_shards, experiment, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    rc = main(["slurm", str(experiment), *train_overrides(digits_shards, tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "sbatch not found" in err and "--dry-run" in err
    assert not (tmp_path / "r").exists()   # nothing written for a job that was never submitted
