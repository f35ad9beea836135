"""launch/slurm.sbatch with --nodes=2 on a Slurm cluster of 2 namespace nodes: one rank per node, trained as 2 ranks
on one node.

The nodes are network (and UTS) namespaces (`netns_nodes`, as in tests/launch/test_two_nodes.py); on them
scripts/slurm_two_nodes.sh starts munged and slurmctld on node0 and a slurmd on each node, with its own NodeName,
address and hostname, all from a temp dir (config, key, state, logs): the machine's own configuration and network
are not touched. The clients (sbatch, scontrol) run on node0, as on a login node; the machine itself has no route to
the nodes. The job gets what a cluster gives: SLURM_JOB_NODELIST=node[0-1], from which slurm.sbatch takes
MASTER_ADDR (node0, resolved by the nodes' /etc/hosts), and srun starts launch/multi_node.sh on each node with its
SLURM_NODEID as NODE_RANK; torchrun's ranks then meet over the nodes' network.

The bound is 0, for the reason tests/launch/test_two_nodes.py gives: with 2 ranks each reduced element is one float32
addition of two values, commutative in IEEE arithmetic, and the rest (data order, micro-batches, each rank's thread
count) is the same as in the one-node reference (`zero3_deepspeed_run`, 2 ranks on one node), so only the transport
differs and it cannot change a bit.

The cluster is stopped, and the nodes destroyed with every process left in them, however the module ends; the
test fails if a daemon, a namespace or a shared-memory buffer is left. Skips without root, ip/unshare (netns) or
Slurm and munge (scripts/ci_slurm.sh installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    LaunchedRun,
    NetnsNode,
    assert_prepared_once,
    assert_same_training,
    check_saved_run,
    cores_per_node,
    describe_run,
    netns_missing,
    netns_nodes,
    tail,
)

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(bool(netns_missing()), reason=netns_missing())]

SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm_two_nodes.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "srun")
NODES = 2
PARTITION = "nodes"  # scripts/slurm_two_nodes.sh's default
START_TIMEOUT_S = 60
TIME_LIMIT_MIN = 60  # far beyond slurm.sbatch's 600 s preemption warning (#SBATCH --signal=B:USR1@600)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
RUN = ("deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT)
# Each node's rank gets this machine's cores split between the nodes, as launch/env.sh splits them between the 2
# ranks of the one-node reference.
THREADS = str(cores_per_node(NODES))


@dataclass
class TwoNodeCluster:
    root: Path
    nodes: list[NetnsNode]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def client(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30):
        """A Slurm client command on node0 (the machine has no route to the nodes' addresses)."""
        return subprocess.run(
            self.nodes[0].command(argv), env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts += [f"--- {path} ---", tail(path.read_text(errors="replace"), 15)]
        return "\n".join(parts)

    def daemons(self) -> list[str]:
        """The daemons of this cluster still running, by their pid files."""
        alive = []
        for pid_file in self.root.glob("*.pid"):
            pid = pid_file.read_text().strip()
            if pid and Path(f"/proc/{pid}").exists():
                alive.append(f"{pid_file.stem} (pid {pid})")
        return alive


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)} on PATH): run scripts/ci_slurm.sh")
    root = tmp_path_factory.mktemp("slurm_two_nodes")
    with netns_nodes(NODES) as nodes:
        cluster = TwoNodeCluster(root, nodes)
        env = {**os.environ, "NETNS_PREFIX": nodes[0].prefix, "NETNS_SUBNET": nodes[0].address.rsplit(".", 1)[0]}
        try:
            started = subprocess.run([str(SLURM_SCRIPT), "start", str(root)], env=env, capture_output=True, text=True)
            assert started.returncode == 0, f"slurm_two_nodes.sh start failed:\n{started.stderr}\n{cluster.logs()}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while (states := _node_states(cluster)) != {f"node{i}": "idle" for i in range(NODES)}:
                if time.monotonic() > deadline:
                    pytest.fail(f"the nodes are {states} after {START_TIMEOUT_S} s, not idle\n{cluster.logs()}")
                time.sleep(0.5)
            yield cluster
        finally:
            stopped = subprocess.run([str(SLURM_SCRIPT), "stop", str(root)], env=env, capture_output=True, text=True)
            left = cluster.daemons()
            assert stopped.returncode == 0 and not left, f"the cluster left {left}:\n{stopped.stderr}"
    # netns_nodes has destroyed the nodes with anything left in them (job steps included) and checked that no
    # namespace or shared-memory buffer of theirs is left.


def _node_states(cluster: TwoNodeCluster) -> dict[str, str]:
    result = cluster.client(["sinfo", "--noheader", "--Node", "--format=%N %T"], timeout=10)
    return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)


def _job_info(cluster: TwoNodeCluster, job_id: str, env: dict[str, str]) -> dict[str, str]:
    result = cluster.client(["scontrol", "--oneliner", "show", "job", job_id], env=env)
    assert result.returncode == 0, f"scontrol show job {job_id} failed: {result.stderr}\n{cluster.logs()}"
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


@pytest.fixture(scope="module")
def sbatch_on_two_nodes(
    slurm_two_nodes: TwoNodeCluster, tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path
) -> tuple[Path, Path, dict[str, str], str]:
    """`sbatch --nodes=2 launch/slurm.sbatch` of the ZeRO-3 run, one CPU rank per node, submitted on node0 and waited
    for; the output dir, the data cache, the job's final `scontrol show job` fields and its log."""
    run_dir = tmp_path_factory.mktemp("slurm_two_nodes_run")
    submit_dir, output_dir, cache_dir = run_dir / "submit", run_dir / "run", run_dir / "cache"
    (submit_dir / "logs").mkdir(parents=True)  # where the script's #SBATCH --output puts the job log
    env = {
        **slurm_two_nodes.env(),
        "REPO_DIR": str(REPO_ROOT),
        "OUTPUT_DIR": str(output_dir),
        "PYTHON": sys.executable,
        "NUM_GPUS": "1",
        "CPU_THREADS_PER_RANK": THREADS,
    }
    job_name = "two-nodes"
    command = [
        "sbatch", "--parsable", f"--nodes={NODES}", "--gpus-per-node=0", f"--partition={PARTITION}",
        f"--time={TIME_LIMIT_MIN}", f"--job-name={job_name}", str(LAUNCH_DIR / "slurm.sbatch"), *RUN,
        f"data.cache_dir={cache_dir}",
    ]  # fmt: skip
    submitted = slurm_two_nodes.client(command, env=env, cwd=submit_dir)
    assert submitted.returncode == 0, f"sbatch failed:\n{submitted.stdout}{submitted.stderr}\n{slurm_two_nodes.logs()}"
    job_id = submitted.stdout.strip().split(";")[0]
    log = submit_dir / "logs" / f"{job_name}-{job_id}.out"

    def describe() -> str:
        return describe_run("", [log.parent, output_dir / "logs"]) + "\n" + slurm_two_nodes.logs()

    deadline, states = time.monotonic() + DISTRIBUTED_TIMEOUT_S, []
    try:
        while (info := _job_info(slurm_two_nodes, job_id, env))["JobState"] not in FINAL_STATES:
            state = f"{info['JobState']} ({info['Reason']})"
            if not states or states[-1] != state:
                states.append(state)
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {state} after {DISTRIBUTED_TIMEOUT_S} s ({states})\n{describe()}")
            time.sleep(0.5)
    finally:
        slurm_two_nodes.client(["scancel", job_id], env=env)  # a job still there would hold the nodes
    assert info["JobState"] == "COMPLETED", f"job {job_id} {info['JobState']} {info['ExitCode']} after {states}\n" + (
        describe()
    )
    return output_dir, cache_dir, info, log.read_text()


def test_sbatch_on_two_nodes_trains_as_two_ranks_on_one_node(
    slurm_two_nodes: TwoNodeCluster,
    sbatch_on_two_nodes: tuple[Path, Path, dict[str, str], str],
    base_model_dir: Path,
    zero3_deepspeed_run: LaunchedRun,
) -> None:
    output_dir, _, info, log = sbatch_on_two_nodes
    # Slurm gave the job both nodes, and slurm.sbatch took the first as the rendezvous host, by name.
    assert info["NodeList"] == "node[0-1]" and info["NumNodes"] == str(NODES), info
    assert re.search(r"^job \d+ \(restart 0\) on node\[0-1\]: rank 0 at node0:\d+,", log, re.MULTILINE), tail(log)
    # srun started the step's task on node1 through node1's slurmd (its log, by the NodeName in its file name).
    node1_log = (slurm_two_nodes.root / "slurmd-node1.log").read_text(errors="replace")
    assert f"launch task StepId={info['JobId']}.0 " in node1_log, tail(node1_log)
    check_saved_run(output_dir, base_model_dir, ranks=2)
    assert_same_training(output_dir, zero3_deepspeed_run.output_dir, atol=0.0)


def test_sbatch_on_two_nodes_prepares_the_data_once(sbatch_on_two_nodes: tuple[Path, Path, dict[str, str], str]):
    output_dir, cache_dir, _, _ = sbatch_on_two_nodes
    assert_prepared_once(output_dir, cache_dir)
