"""Run by tests/test_preempt.py: a grain loader with a worker process, its worker sent SIGTERM and SIGUSR1 (what SLURM
sends every process of a job step); prints whether it is alive and whether the loader still serves batches.

    python loader_workers_run.py RECORDS
"""
import os
import signal
import sys
import time

from dyngap_jax.data import make_loader


def spawned_children() -> list[int]:
    """This process's children started by multiprocessing's spawn (grain's workers)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == os.getpid() and "spawn_main" in cmd:
            out.append(int(pid))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def main(records: str) -> None:
    it = iter(make_loader(records, "train", batch_size=8, train=True, in_memory=False, worker_count=1, num_epochs=None))
    next(it)
    workers = spawned_children()
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    print(f"WORKERS {len(workers)} ALIVE {sum(map(alive, workers))}", flush=True)
    for _ in range(12):
        next(it)
    print("SERVED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
