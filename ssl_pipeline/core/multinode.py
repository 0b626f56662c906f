"""Data-parallel pretraining across Slurm nodes: one srun task per process (config compute.nodes).

A pretraining job on N nodes is one Slurm job of N nodes (the slurm executor's `mpi` kind of job,
workflow/rules/pretrain.smk). Its batch step runs `python -m ssl_pipeline pretrain` once, on the first
node. That process is the launcher:
1. it opens the rendezvous, a torch TCPStore on a port the kernel picks (bound before any rank starts,
   so two jobs on one node cannot collide, and no port is guessed);
2. it runs `srun --nodes N --ntasks-per-node K --kill-on-bad-exit=1 python -m ssl_pipeline pretrain ...`,
   which starts every rank as a Slurm task; each takes its rank from SLURM_PROCID and joins the store;
3. it waits for srun. A SIGTERM (scancel, or Slurm at the time limit) reaches every task through
   Slurm, and the ranks agree on the step to stop at (ssl_pipeline/core/resume.py); the launcher keeps
   the store until they are done.

Why srun tasks rather than `srun torchrun --nnodes N`: Slurm then knows every process. A dead process
is a dead task: --kill-on-bad-exit ends the step at once and srun's log line names the task (the rank)
and the node. Signals, accounting and CPU binding apply per rank. And there is no second agent layer
with its own rendezvous (c10d) and restart policy. torchrun stays the launcher on one node.
"""
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

from ssl_pipeline.core.resume import STOPPED_EXIT_STATUS, STOPPED_MARK

log = logging.getLogger(__name__)

# Set by the launcher for its tasks: "host:port" of the TCPStore, and when the launcher started srun.
RENDEZVOUS = "SSL_PIPELINE_RENDEZVOUS"
LAUNCHED_AT = "SSL_PIPELINE_LAUNCHED_AT"


# srun's line for a task that ended badly, e.g. "srun: error: n2: task 1: Killed".
TASK_ENDED = re.compile(r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<how>.+)$")


# A rank's last word in the log, e.g. "... ERROR ssl_pipeline: pretrain simclr stopped by SIGTERM at ...".
RANK_ERROR = re.compile(r" ERROR ssl_pipeline[\w.]*: (?P<message>.+)$")


class RanksFailed(RuntimeError):
    """A rank of a multi-node job died or failed; the message names it (main() logs it as the last line)."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def lost_rank(lines: list, last_word=None) -> str:
    """From srun's error lines, in the order srun saw them, the rank that ended first: the others end
    because it went (a collective fails, or srun kills them). last_word: the first error a rank logged."""
    ended = [match for match in map(TASK_ENDED.match, lines) if match]
    if not ended:
        return last_word or "srun reported no rank's end"
    first = ended[0]
    if first["how"].startswith("Exited with exit code") and last_word:
        return f"rank {first['tasks']} on node {first['node']} failed ({first['how']}): {last_word}"
    return f"rank {first['tasks']} on node {first['node']} was lost ({first['how']})"


def under_srun_launcher() -> bool:
    """Whether this process is one of the launcher's srun tasks."""
    return RENDEZVOUS in os.environ and "SLURM_PROCID" in os.environ


def check_nodes(nodes: int) -> None:
    """More than one node needs a Slurm job to spread over (the slurm executor's mpi job)."""
    if nodes > 1 and "SLURM_JOB_ID" not in os.environ:
        raise ValueError(f"config key compute.nodes is {nodes}, but this job does not run under Slurm (no "
                         "SLURM_JOB_ID): pretraining on several nodes runs through the slurm executor "
                         "(snakemake --workflow-profile profiles/slurm); set compute.nodes: 1 to run here")


def srun_command(launcher: str, nodes: int, per_node: int, cpus_per_rank: int, argv: list) -> list:
    """The step that runs `python -m ssl_pipeline <argv>` as nodes x per_node ranks."""
    return [launcher, f"--nodes={nodes}", f"--ntasks={nodes * per_node}", f"--ntasks-per-node={per_node}",
            f"--cpus-per-task={cpus_per_rank}", "--kill-on-bad-exit=1", "--distribution=block",
            sys.executable, "-m", "ssl_pipeline", *argv]


def launch_on_nodes(launcher: str, nodes: int, per_node: int, cpus_per_rank: int, argv: list,
                    timeout_seconds: int) -> None:
    """Run the ranks as srun tasks and exit with srun's status. Returns at once (doing nothing) inside
    one of those tasks."""
    if under_srun_launcher():
        return
    check_nodes(nodes)
    from torch.distributed import TCPStore

    host = socket.gethostname()  # the batch step runs on the allocation's first node
    store = TCPStore(host, 0, nodes * per_node + 1, is_master=True, timeout=timedelta(seconds=timeout_seconds),
                     wait_for_workers=False)
    command = srun_command(launcher, nodes, per_node, cpus_per_rank, argv)
    log.info("starting %d data-parallel processes on %d nodes (%d per node), rendezvous at %s:%d: %s",
             nodes * per_node, nodes, per_node, host, store.port, " ".join(command))
    environment = {**os.environ, RENDEZVOUS: f"{host}:{store.port}", LAUNCHED_AT: repr(time.time()),
                   "OMP_NUM_THREADS": str(cpus_per_rank)}
    # SIGTERM (scancel, the time limit) goes to every task through Slurm: the launcher waits for them
    # to write their state. A Python handler, not SIG_IGN, which srun would inherit.
    signal.signal(signal.SIGTERM, lambda number, frame: log.info("SIGTERM: waiting for the ranks to stop"))
    sys.stdout.flush()
    sys.stderr.flush()
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True, errors="replace")
    errors, last_word = [], []

    def relay():  # srun's and the ranks' stderr go to the job's log as they come; the errors are kept
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("srun: error:"):
                errors.append(line.strip())
            elif RANK_ERROR.search(line.rstrip()):
                last_word.append(RANK_ERROR.search(line.rstrip())["message"])

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    returncode = process.wait()
    reader.join()
    stopped = [word for word in last_word if STOPPED_MARK in word]
    if stopped:
        # The ranks stopped at one step after rank 0 wrote the state (SIGTERM, the time limit; a rank says so
        # only past the barrier that follows the write): their message is the job's last line too, with
        # their exit status, for Snakemake's retry. srun's own status does not decide: it reports a task
        # that it ended after the others had exited as killed or terminated.
        raise RanksFailed(stopped[-1], STOPPED_EXIT_STATUS)
    if returncode:
        raise RanksFailed(f"pretraining on {nodes} nodes failed: {lost_rank(errors, (last_word or [None])[0])}; "
                          f"srun exited with {returncode}. Each rank's own log is beside this one; a rerun resumes "
                          "from the last resume state")
    sys.exit(0)


def slurm_task_environment() -> None:
    """Inside a launcher's task: the variables torchrun would set, from Slurm's, so that the rest of the
    code (device choice by LOCAL_RANK, launched_ranks) works as under torchrun."""
    host, port = os.environ[RENDEZVOUS].rsplit(":", 1)
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ["SLURM_LOCALID"],
                      LOCAL_WORLD_SIZE=str(int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_NNODES"])),
                      MASTER_ADDR=host, MASTER_PORT=port)


def seconds_since_launch():
    """Seconds since the launcher started srun (None under torchrun): start-up plus rendezvous."""
    launched = os.environ.get(LAUNCHED_AT)
    return None if launched is None else time.time() - float(launched)


def node_name() -> str:
    """This process's node as Slurm names it (several slurmd may share a host name), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def rendezvous_store(rank: int, world_size: int, timeout_seconds: int):
    """The launcher's TCPStore as a client, or None when torchrun (env://) made the rendezvous."""
    if RENDEZVOUS not in os.environ:
        return None
    from torch.distributed import TCPStore

    host, port = os.environ[RENDEZVOUS].rsplit(":", 1)
    return TCPStore(host, int(port), world_size + 1, is_master=False, timeout=timedelta(seconds=timeout_seconds))
