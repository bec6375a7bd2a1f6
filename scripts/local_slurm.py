#!/usr/bin/env python
"""A real SLURM cluster on this one machine: slurmctld plus N slurmd "nodes" (n1, n2, ...), with a
munge daemon of its own, for the tests (tests/test_slurm.py) and for trying `pretrain slurm` out.

    sudo python scripts/local_slurm.py install            # Debian/Ubuntu packages (slurmctld, slurmd, munge)
    sudo python scripts/local_slurm.py up /tmp/slurm      # prints `export SLURM_CONF=/tmp/slurm/slurm.conf`
    export SLURM_CONF=/tmp/slurm/slurm.conf; sinfo; pretrain slurm ...
    sudo python scripts/local_slurm.py down /tmp/slurm    # stops what `up` started, by PID

Everything lives under the one directory: slurm.conf (clients find it through SLURM_CONF, so
/etc/slurm is never touched), munge's key and socket, state, spool, logs and PID files. Ports are
picked free at start, so it does not clash with a cluster that already runs here. Needs root
(slurmd launches jobs as their owner) and no systemd.

What a fake cluster on one host needs, found with Debian's Slurm 22.05:
* ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups to manage);
* SlurmdParameters=config_overrides: the nodes declare more CPUs than this machine has;
* EnforcePartLimits=ALL, or a job that can never run (more nodes than exist) pends forever
  instead of being refused at submission;
* NodeAddr=127.0.0.1 for every node: the node names (n1, n2) need not resolve. Inside a job
  `hostname` is the real host's name; SLURMD_NODENAME says which fake node a task is on.
* There is no accounting daemon, so no `sacct`: ask `scontrol show job` (until MinJobAge).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "munged", "sbatch", "scontrol"]


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]


def install() -> None:
    """apt-get the packages, without letting their install scripts start any daemon."""
    if not missing_binaries():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")   # exit 101: "do not start services" for invoke-rc.d
    added = not policy.exists()
    if added:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    finally:
        if added:
            policy.unlink()


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def slurm_conf(base: Path, nodes: int, cpus: int, memory_mb: int) -> str:
    ctld_port, *node_ports = _free_ports(1 + nodes)
    host = socket.gethostname()
    lines = [
        "ClusterName=local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={base}/munge/munge.socket",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SwitchType=switch/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "EnforcePartLimits=ALL",
        "MinJobAge=600",            # keep finished jobs visible to `scontrol show job` (no sacct here)
        "KillWait=10",
        f"StateSaveLocation={base}/ctld",
        f"SlurmdSpoolDir={base}/spool/%n",
        f"SlurmctldPidFile={base}/run/slurmctld.pid",
        f"SlurmdPidFile={base}/run/slurmd_%n.pid",
        f"SlurmctldLogFile={base}/log/slurmctld.log",
        f"SlurmdLogFile={base}/log/slurmd_%n.log",
    ]
    for i, port in enumerate(node_ports, 1):
        lines.append(f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                     f"RealMemory={memory_mb} State=UNKNOWN")
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def client_env(base) -> Dict[str, str]:
    """What a client (sbatch, squeue, pretrain slurm) needs to talk to this cluster."""
    return {"SLURM_CONF": str(Path(base) / "slurm.conf")}


def _wait(predicate, timeout: float, what: str, base: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-1500:] for p in sorted((base / "log").glob("*.log")))
    raise RuntimeError(f"local SLURM cluster: timed out after {timeout:.0f} s waiting for {what}{logs}")


def up(base, nodes: int = 2, cpus: int = 4, memory_mb: int = 4000) -> Dict[str, str]:
    """Start munged, slurmctld and `nodes` slurmd under `base` (wiped first); wait until every node
    is idle. Returns the client environment (SLURM_CONF)."""
    if os.geteuid() != 0:
        raise RuntimeError("the local SLURM cluster needs root (slurmd starts jobs as their owner)")
    if missing_binaries():
        raise RuntimeError(f"missing {', '.join(missing_binaries())}: run `python {__file__} install` (as root)")
    base = Path(base).resolve()
    if (base / "run").is_dir():
        down(base)
    shutil.rmtree(base, ignore_errors=True)
    for d in ["ctld", "log", "run", "munge", *[f"spool/n{i}" for i in range(1, nodes + 1)]]:
        (base / d).mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    (base / "munge").chmod(0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    subprocess.run([_sbin("munged"), "--force", f"--socket={base}/munge/munge.socket", f"--key-file={key}",
                    f"--pid-file={base}/run/munged.pid", f"--log-file={base}/log/munged.log",
                    f"--seed-file={base}/munge/munged.seed"], check=True)
    conf = base / "slurm.conf"
    conf.write_text(slurm_conf(base, nodes, cpus, memory_mb))
    subprocess.run([_sbin("slurmctld"), "-f", str(conf), "-i"], check=True)
    for i in range(1, nodes + 1):
        subprocess.run([_sbin("slurmd"), "-f", str(conf), "-N", f"n{i}"], check=True)
    env = dict(os.environ, **client_env(base))

    def idle() -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=env, capture_output=True, text=True)
        return p.returncode == 0 and len(p.stdout.split()) >= nodes

    _wait(idle, 60, f"{nodes} idle nodes", base)
    return client_env(base)


def _pids(base: Path) -> List[int]:
    out = []
    for f in sorted((base / "run").glob("*.pid")):
        try:
            out.append(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def down(base) -> None:
    """Cancel every job, then stop the daemons `up` started (by their PID files)."""
    base = Path(base).resolve()
    env = dict(os.environ, **client_env(base))
    if (base / "run" / "slurmctld.pid").exists():
        subprocess.run(["scancel", "--full", "--quiet", "--user", str(os.getuid())], env=env, capture_output=True)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.2)
    pids = _pids(base)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="apt-get install the Slurm and munge packages")
    u = sub.add_parser("up", help="start a cluster under DIR")
    u.add_argument("dir")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--cpus", type=int, default=4, help="CPUs each node declares (may exceed the real cores)")
    d = sub.add_parser("down", help="stop the cluster under DIR")
    d.add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "install":
        install()
    elif a.cmd == "up":
        env = up(a.dir, a.nodes, a.cpus)
        print(" ".join(f"export {k}={v}" for k, v in env.items()))
    else:
        down(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
