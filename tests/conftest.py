"""Session fixtures: real digits shards (scikit-learn's 8x8 digits, upscaled to 16 px), a tiny
experiment YAML, and one short reference training run several test files inspect."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from helpers import cli, train_overrides  # noqa: E402


# Files that take longest (or wait longest on something outside the CPU, like the SLURM queue) run
# first, so that with pytest-xdist (scripts/test.sh: -n 2 --dist loadfile) the other worker fills
# the gaps instead of idling at the end. Tests inside a file keep their order.
LONG_FIRST = ("test_slurm.py", "test_deepspeed.py", "test_faults.py", "test_generative.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))


_SESSION_DIRS = set()   # base-temp entries of the session fixtures below: kept for the whole run


def _session_dir(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    _SESSION_DIRS.add(d)
    return d


@pytest.fixture(scope="module", autouse=True)
def _module_scratch(request, tmp_path_factory):
    """Delete what a test module wrote under the base temp dir (its module fixtures' runs; pytest.ini's
    tmp_path_retention_policy removes passing tests' own tmp_path) once the module is done, unless one of
    its tests failed. Without this one suite run leaves ~16 GB of checkpoints behind, more than a CI
    machine may have free (CI failed with a torch.save write error that way)."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for p in set(base.iterdir()) - before - _SESSION_DIRS:
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_run_logs():
    """An in-process `train()` leaves its run_dir/log.txt handler on the "pretrain" logger; a passing test's
    tmp_path is deleted when it ends, and the next test's first log line would then fail to reopen that file."""
    yield
    import logging

    log = logging.getLogger("pretrain")
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        h.close()
        log.removeHandler(h)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """<dir>/{train,val}/shard-*.tar + index.json: 1797 real digits, 100 per shard, 10% val."""
    from pretrain.data import write_shards
    from pretrain.data.sources import digits

    out = _session_dir(tmp_path_factory, "digits16")
    classes, samples = digits(size=16)
    write_shards(samples, classes, out, shard_size=100, val_fraction=0.1, seed=0)
    return out


@pytest.fixture(scope="session")
def experiment(tmp_path_factory) -> Path:
    """An experiment YAML as a user would write one (the CLI needs one)."""
    p = _session_dir(tmp_path_factory, "exp") / "tiny.yaml"
    p.write_text("method:\n  name: simclr\n  temperature: 0.2\nmodel:\n  name: resnet10t\noptim:\n  name: lars\n  lr: 0.3\n")
    return p


REF_STEPS, REF_EVERY = 6, 3


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory, digits_shards, experiment):
    """`pretrain train` for 6 steps, checkpoints at 3 and 6, loss logged every step, kNN monitor at the end.

    Returns (run_dir, overrides, stdout metrics dict)."""
    run_dir = _session_dir(tmp_path_factory, "ref") / "run"
    ov = train_overrides(digits_shards, run_dir, train__max_steps=REF_STEPS, checkpoint__every_steps=REF_EVERY,
                         checkpoint__keep_last=10, data__val=f"{digits_shards}/val")
    p = cli("train", experiment, *ov, check=True)
    metrics = json.loads(p.stdout.strip().splitlines()[-1])
    return run_dir, ov, metrics
