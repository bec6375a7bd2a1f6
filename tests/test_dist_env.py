"""The distributed environment module: torchrun and SLURM variables, hostlist expansion."""
import pytest

from pretrain.dist import env_from, expand_nodelist


@pytest.mark.parametrize("nodelist,expected", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("node[009-011]", ["node009", "node010", "node011"]),
])
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


def test_single_process_without_launcher():
    env = env_from({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_torchrun_variables():
    env = env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 8, 1, "head", 1234, "torchrun")


def test_slurm_variables_give_ranks_and_first_host_as_master():
    env = env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 16, 5, "gpu07", "slurm")
    assert env.master_port == 20000 + 4242 % 20000
    # the same job gives the same port on every task, and an explicit MASTER_PORT wins
    assert env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a",
                     "SLURM_JOB_ID": "4242", "MASTER_PORT": "999"}).master_port == 999


def test_torchrun_wins_over_slurm():
    # torchrun inside an sbatch allocation: the torchrun ranks are the real ones
    env = env_from({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
                    "SLURM_JOB_NODELIST": "n1"})
    assert (env.rank, env.world_size, env.source) == (1, 2, "torchrun")


def test_single_slurm_task_is_single_process():
    assert env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}).world_size == 1


def test_rank_and_world_size_are_asked_in_one_place():
    """pretrain.comm is the one module that asks torch.distributed who this process is; everything else (library
    and app) asks it, so a new backend has one place to fit."""
    import re

    from helpers import REPO

    asks = re.compile(r"\b(?:dist|torch\.distributed)\.(get_rank|get_world_size|is_initialized)\(")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "pretrain").rglob("*.py")) if p.name != "comm.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if asks.search(line)]
    assert not offenders, offenders
    helpers = re.compile(r"^def (world_info|get_rank|get_world_size|barrier|all_reduce_mean|broadcast_object)\(", re.M)
    twins = [str(p.relative_to(REPO)) for p in (REPO / "pretrain").rglob("*.py") if p.name != "comm.py"
             and helpers.search(p.read_text())]
    assert not twins, twins


def test_comm_in_one_process():
    import torch

    from pretrain import comm

    assert comm.world_info() == (0, 1) and comm.is_main() and not comm.initialized()
    x = torch.arange(3.0)
    assert comm.all_reduce_mean(x) is x and comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.all_gather_object(5) == [5]
    comm.barrier()
