"""Kill a training run again and again, then check that it ends exactly as an uninterrupted run.

    python -m scripts.chaos --kills=6 --out_dir=runs/chaos -- \\
        python -m scripts.train --config configs/mfeat.py:ours_lb --config.progress=False

The command after ``--`` is a training run; this script appends ``--workdir <dir>`` to it (its output
goes to ``<dir>.log``). It runs the command once uninterrupted (``<out_dir>/reference``), then in
``<out_dir>/chaos`` starts it ``--kills`` times and stops each start, in turn: with SIGKILL at a
random moment between 1/4 and 1/2 of the reference run's duration; with SIGKILL at a random named
place of :mod:`dyngap_jax.faults` (mid-epoch after a train step, during a checkpoint write, between
the best and the latest checkpoint, between the metrics and the checkpoint, after the checkpoint;
the 1st to 3rd time it is reached); with SIGTERM, a scheduler's preemption (at a random moment or
at a named place; the run checkpoints and exits 75). Each start resumes what the previous ones left
(a start that finishes before its signal is counted as not stopped). A last start runs to the end.
The final ``summary.json`` must equal the reference's (every number within ``--rtol``) and
``metrics.jsonl`` must hold the same records; exits 1 otherwise. Prints a line per start and the tally.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags, logging

from dyngap_jax import faults
from dyngap_jax.io import json_differences as differences
from scripts import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("kills", 6, "How many starts to kill before the one that runs to the end.")
flags.DEFINE_string("out_dir", None, "(required) Where the reference and the killed run go (emptied first).")
flags.DEFINE_integer("seed", 0, "Seed of the kill moments and places.")
flags.DEFINE_float("rtol", 1e-6, "Relative tolerance of the summaries' numbers.")
flags.DEFINE_integer("timeout", 3600, "Seconds one start may take.")
flags.mark_flag_as_required("out_dir")


PREEMPTED = 75  # dyngap_jax.train.PREEMPTED_EXIT_STATUS: checkpointed on SIGTERM, resumable


def run(command: list[str], workdir: str, fault: str | None = None, kill_after: float | None = None,
        sig: int = signal.SIGKILL) -> tuple[int, float]:
    """Run ``command --workdir workdir``, sending ``sig`` after ``kill_after`` seconds; ``(exit status, seconds)``;
    negative status: killed by that signal, 75: preempted (checkpointed)."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if fault:
        env[faults.ENV] = fault
    t0 = time.time()
    log = workdir.rstrip("/") + ".log"  # beside the run folder, appended to by every start (a pipe would fill)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command + ["--workdir", workdir], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=kill_after if kill_after is not None else FLAGS.timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.wait()
    # -SIGTERM: a SIGTERM that came before the run's handler was set or after it was done (nothing written then)
    if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM, PREEMPTED):
        with open(log, "rb") as f:
            sys.stderr.write(f.read()[-4000:].decode(errors="replace"))
        raise SystemExit(f"{' '.join(command)} --workdir {workdir} failed with status {proc.returncode} (log: {log})")
    return proc.returncode, time.time() - t0


def records(workdir: str) -> list[tuple]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["epoch"], r["split"], r["step"]) for r in map(json.loads, f)]


def main(argv):
    command = argv[1:]
    if not command:
        raise app.UsageError("give the training command after `--`")
    shutil.rmtree(FLAGS.out_dir, ignore_errors=True)
    reference, chaos = os.path.join(FLAGS.out_dir, "reference"), os.path.join(FLAGS.out_dir, "chaos")
    _, duration = run(command, reference)
    print(f"reference: {duration:.1f} s", flush=True)
    rng = random.Random(FLAGS.seed)
    stopped = 0
    for k in range(FLAGS.kills):
        after = rng.uniform(0.25, 0.5) * duration  # inside the run: each start resumes what is left
        fault = f"{rng.choice(faults.POINTS)}@{rng.randint(1, 3)}"
        if k % 3 == 0:
            status, took = run(command, chaos, kill_after=after)
            how = f"SIGKILL at {after:.1f} s"
        elif k % 3 == 1:
            status, took = run(command, chaos, fault=fault)
            how = f"SIGKILL at {fault}"
        elif rng.random() < 0.5:
            status, took = run(command, chaos, kill_after=after, sig=signal.SIGTERM)
            how = f"SIGTERM at {after:.1f} s"
        else:
            status, took = run(command, chaos, fault=f"{fault}:SIGTERM")
            how = f"SIGTERM at {fault}"
        stopped += status != 0
        word = {0: "finished before", -signal.SIGKILL: "killed", -signal.SIGTERM: "terminated outside the run",
                PREEMPTED: "preempted"}[status]
        print(f"start {k + 1}: {word} ({how}, {took:.1f} s)", flush=True)
        logging.info("start %d: status %d (%s)", k + 1, status, how)
    status, took = run(command, chaos)
    with open(os.path.join(reference, "summary.json")) as f:
        want = json.load(f)
    with open(os.path.join(chaos, "summary.json")) as f:
        got = json.load(f)
    # what a process compiled is its own (a resumed run compiles again, or, from the persistent cache, not at all)
    for s in (got, want):  # and the wall time it measured
        s.pop("compilations", None), s.pop("timing", None)
    diff = differences(got, want, FLAGS.rtol)
    if records(chaos) != records(reference):
        diff.append(f"metrics.jsonl: {records(chaos)} against {records(reference)}")
    print(f"last start: finished ({took:.1f} s); {stopped} of {FLAGS.kills} starts stopped; "
          f"{'summary equal to the uninterrupted run' if not diff else 'DIFFERS: ' + '; '.join(diff[:10])}")
    if diff:
        raise SystemExit(1)


if __name__ == "__main__":
    common.run(main)
