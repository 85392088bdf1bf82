"""A real Slurm on this one machine, for the `slurm` tests: munge, slurmctld and one slurmd per fake node.

    python -m slurm.local_cluster start [--nodes 2] [--state-dir /tmp/layergraft-slurm]
    python -m slurm.local_cluster stop
    python -m slurm.local_cluster status

`start` installs Debian's packages when they are missing (needs root and a package mirror), writes
/etc/slurm/slurm.conf for nodes n1..nN (all 127.0.0.1, each its own slurmd port, the host's CPUs and
memory), adds the node names to /etc/hosts, starts the daemons with their files under the state
directory and waits until every node is idle. `stop` cancels what is left in the queue, waits for it to
drain (a slurmstepd would outlive slurmd), stops the daemons (TERM, then KILL) and removes the hosts
lines. Both are idempotent. /etc/slurm, /etc/hosts and the ports 6817 and 17001+ are machine-wide: one
such cluster per machine at a time.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
HOSTS_MARK = "# layergraft local slurm"
DEFAULT_STATE = Path("/tmp/layergraft-slurm")
CONF = Path("/etc/slurm/slurm.conf")


def run(*command, check=True, timeout=120, **kwargs):
    return subprocess.run(command, check=check, timeout=timeout, capture_output=True, text=True, **kwargs)


def installed():
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def install():
    if installed():
        return
    if os.geteuid() != 0:
        raise SystemExit(
            "local_cluster: Slurm is not installed and installing it needs root "
            f"(apt-get install {' '.join(PACKAGES)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("local_cluster: installing", " ".join(PACKAGES), flush=True)
    run("apt-get", "update", "-qq", env=env, timeout=600)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env, timeout=600)


def slurm_conf(nodes, state):
    cpus, memory_mb = os.cpu_count(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    per_node_mb = max(1024, memory_mb // (2 * nodes))  # leave half the memory to the machine itself
    last = 17000 + nodes
    # one line in slurm.conf (a node definition cannot continue on the next)
    nodes_line = (
        f"NodeName=n[1-{nodes}] NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port=[17001-{last}] "
        f"CPUs={cpus} RealMemory={per_node_mb} State=UNKNOWN"
    )
    return f"""# Written by slurm/local_cluster.py: {nodes} fake nodes on this host.
ClusterName=layergraft
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
{nodes_line}
PartitionName=debug Nodes=n[1-{nodes}] Default=YES MaxTime=INFINITE State=UP
"""


def spawn(*command):
    """Start a daemon detached, with no inherited descriptors beyond 0-2 (or a caller's pipe never closes)."""
    subprocess.run(
        command,
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def set_hosts(nodes):
    lines = [line for line in Path("/etc/hosts").read_text().splitlines() if not line.endswith(HOSTS_MARK)]
    lines += [f"127.0.0.1 n{i} {HOSTS_MARK}" for i in range(1, nodes + 1)]
    Path("/etc/hosts").write_text("\n".join(lines) + "\n")


def idle_nodes():
    result = run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False, timeout=10)
    return set(result.stdout.split()) if result.returncode == 0 else set()


def start(nodes, state):
    install()
    if idle_nodes() >= {f"n{i}" for i in range(1, nodes + 1)}:
        print(f"local_cluster: already up ({nodes} nodes)")
        return
    state.mkdir(parents=True, exist_ok=True)
    for name in ["ctld", *(f"d-n{i}" for i in range(1, nodes + 1))]:
        (state / name).mkdir(exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(nodes, state))
    set_hosts(nodes)
    munge_dir = Path("/run/munge")
    munge_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        run("mungekey", "--create")
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    if run("pgrep", "-x", "munged", check=False).returncode != 0:
        spawn("runuser", "-u", "munge", "--", "munged")
    spawn("slurmctld", "-i")
    for i in range(1, nodes + 1):
        spawn("slurmd", "-N", f"n{i}")
    deadline = time.monotonic() + 60
    wanted = {f"n{i}" for i in range(1, nodes + 1)}
    while idle_nodes() < wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"local_cluster: nodes not idle after 60 s; see {state}/slurmctld.log")
        time.sleep(0.5)
    print(f"local_cluster: up, nodes n1-n{nodes}, state in {state}")


def stop(state):
    if shutil.which("scancel") and CONF.exists():
        run("scancel", "--full", "-u", "root", check=False, timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queue = run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
    for name in ("slurmd", "slurmctld"):
        kill(name)
    if Path("/etc/hosts").exists():
        set_hosts(0)
    print("local_cluster: stopped")


def kill(name, grace=10):
    """TERM every process called `name`, KILL what is left after `grace` seconds."""
    pids = [int(p) for p in run("pgrep", "-x", name, check=False).stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)
    if args.action == "start":
        start(args.nodes, args.state_dir)
    elif args.action == "stop":
        stop(args.state_dir)
    else:
        print(run("sinfo", check=False).stdout if installed() else "Slurm is not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
