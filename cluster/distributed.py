"""The process edges of a run: the launcher's flags in; a clean exit out (a user's error: `core.errors`), or, when
a node is lost, an exit that names it.

A node lost mid-run (its processes killed, the machine gone, its network down) leaves the other ranks in a
collective. Its peers' sockets are reset when its processes die, and the collective fails at once; a silent peer (a
link down) makes it fail after the process group's timeout, `training.ddp_timeout`. Either way the error reaches
`teardown`, which logs one line naming the node the error names (gloo and NCCL name the peer's address; the host
name comes from a reverse lookup) and what to do, and skips the exit barrier, which would only wait for the lost
ranks until the timeout again. The launcher (torchrun, the DeepSpeed launcher, srun) then ends its other ranks.
It also leaves `<output_dir>/lost_node.json` (`LOST_NODE_MARKER`), on which launch/slurm.sbatch requeues the job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed import distributed_c10d

from core.files import write_atomic
from core.ranks import get_rank

logger = logging.getLogger(__name__)

LOST_NODE_MARKER = "lost_node.json"

# A peer as gloo and NCCL write it in their errors: "[10.231.0.2]:61662" (an IPv4/IPv6 address or a host name).
PEER = re.compile(r"\[([0-9A-Za-z:._-]+)\]:\d+")


def accept_launcher_local_rank() -> None:
    """Move the deepspeed launcher's `--local_rank=N` into `LOCAL_RANK`: Hydra rejects unknown flags."""
    kept = []
    args = iter(sys.argv[1:])
    for arg in args:
        if arg.startswith("--local_rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg == "--local_rank":
            os.environ["LOCAL_RANK"] = next(args)
        else:
            kept.append(arg)
    sys.argv[1:] = kept


def set_collective_timeout(timeout: timedelta) -> None:
    """Make `timeout` (training.ddp_timeout) the timeout of every process group this process makes from now on.

    Call it before `TrainingArguments`: on CPU (`use_cpu`) transformers makes the world group without the timeout
    (training_args.py passes it only on the GPU paths), and DeepSpeed partitions ZeRO over its own clone of the world
    group (deepspeed/utils/groups.py `_clone_world_group`: `dist.new_group(ranks)`), which takes torch's default
    whatever the world group's is. Both were torch's 30 minutes for gloo: with a node's link taken down, the other
    ranks still waited in a collective 100 s later under training.ddp_timeout=30. torch reads these defaults when a
    group is made without a timeout.
    """
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_deepspeed_distributed(timeout: timedelta | None = None) -> None:
    """`deepspeed.init_distributed`, then the name of this rank's shared-memory all-reduce buffer removed.

    With every rank on one machine and CPU tensors, DeepSpeed's all-reduce runs through a 67 MB POSIX shared-memory
    segment per rank, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, which it never
    unlinks (`csrc/cpu/comm/shm.cpp`: nothing calls its `shared_close`), so each run left 67 MB of RAM per rank in
    /dev/shm until a reboot: 19 GB on a test machine after a day of runs, until the kernel killed a job for memory.
    Every rank maps every other's segment inside `init_distributed`; after a barrier each rank unlinks its own name.
    The mappings stay valid, and the memory is freed when the last rank exits, however it exits.
    """
    import deepspeed  # seconds to import: kept out of the commands that import this module for the exit helpers

    if timeout is None:
        deepspeed.init_distributed()  # DeepSpeed's default timeout
    else:
        deepspeed.init_distributed(timeout=timeout)
    if not dist.is_initialized():
        return
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce buffer of `rank` of this launch lives while it is named."""
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_{rank}"


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a failed or timed-out collective or rendezvous: a rank or its node is gone."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "c10d"))
    )


def _node_name(address: str) -> str:
    try:
        host = socket.gethostbyaddr(address)[0]
    except OSError:  # no reverse record: the address is all there is
        return address
    return address if host == address else f"{host} ({address})"


def _lost_peers(error: BaseException) -> list[str]:
    """The nodes a failed collective's error names, as `_node_name` writes them."""
    return [_node_name(peer) for peer in dict.fromkeys(match.group(1) for match in PEER.finditer(str(error)))]


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def lost_node_message(error: BaseException) -> str:
    """One line for a failed collective: the node(s) its error names, why, and what to do."""
    peers, what = _lost_peers(error), _first_line(error)
    if peers:
        lost = f"Lost contact with {', '.join(peers)}"
    else:
        lost = "Lost contact with another rank's node (the error names no peer: look for the node whose log stopped)"
    return (
        f"{lost} on {socket.gethostname()}: a collective failed ({what}). Its processes died or its network went "
        "down; this rank stops (at most training.ddp_timeout after the loss) and the launcher ends the others. "
        "Resume with training.resume_from_checkpoint=auto (the newest checkpoint; a ZeRO one also on fewer or "
        "more nodes)"
    )


def write_lost_node_marker(output_dir: Path, error: BaseException) -> None:
    """`<output_dir>/lost_node.json`: which node(s) this rank lost, seen from which host, and the error's first line.

    Every surviving rank writes it (atomically: the last one stays), so that one survivor killed by its launcher
    first does not lose it. launch/slurm.sbatch requeues the job when it finds the file.
    """
    marker = {
        "lost": _lost_peers(error),
        "seen_on": socket.gethostname(),
        "rank": get_rank(),
        "error": _first_line(error)[:500],
    }
    try:
        write_atomic(output_dir / LOST_NODE_MARKER, json.dumps(marker) + "\n")
    except OSError as failure:  # the shared disk may be what failed: the log line above still names the node
        logger.error("Could not write %s: %s", output_dir / LOST_NODE_MARKER, failure)


def teardown(output_dir: Path | None = None) -> None:
    """Barrier then destroy: exiting without it aborted about one run in twelve (see shared FACTS).

    Called from a `finally` while a failed collective propagates: log which node was lost (`lost_node_message`),
    leave `lost_node.json` in `output_dir` (`write_lost_node_marker`), and destroy the process group without the
    barrier, which would wait for the lost ranks.
    """
    error = sys.exc_info()[1]
    lost = error is not None and is_collective_failure(error)
    if lost:
        logger.error("%s", lost_node_message(error))
        if output_dir is not None:
            write_lost_node_marker(output_dir, error)
    if dist.is_available() and dist.is_initialized():
        if not lost:
            dist.barrier()
        dist.destroy_process_group()
