"""Run by tests/test_parallel.py: one training run as one of several JAX processes on this machine, or alone.

    python multiprocess_run.py RECORDS WORKDIR                      # one process (its devices from XLA_FLAGS)
    python multiprocess_run.py RECORDS WORKDIR PORT NUM_PROCESSES ID  # process ID of NUM_PROCESSES, coordinator 127.0.0.1:PORT

Prints ``RESULT <json>``: the summary's history and final alpha, and the test-split metrics that
``evaluate_checkpoint`` gives for the best checkpoint; or, preempted, ``PREEMPTED <step>`` and exits 75.
"""
import json
import os
import sys

import jax

if len(sys.argv) > 3:  # before anything else touches JAX
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from dyngap_jax import parallel

    parallel.initialize({"coordinator_address": f"127.0.0.1:{sys.argv[3]}", "num_processes": int(sys.argv[4]),
                         "process_id": int(sys.argv[5]),
                         # the kill test shortens it: the others' wait for the lost process is most of its time
                         "heartbeat_timeout": int(os.environ.get("DYNGAP_TEST_HEARTBEAT", "30"))})

from tiny_data import tiny_config  # noqa: E402  (this file's folder is on sys.path: it runs as a script)

from dyngap_jax.train import PREEMPTED_EXIT_STATUS, Preempted, evaluate_checkpoint, train  # noqa: E402


def main(records, workdir):
    cfg = tiny_config(records, "ours_lb", epochs=2)
    with cfg.unlocked():
        cfg.train.eval_batch_size = 10  # uneven last batches, and parts of unequal size on the 21-example test split
        cfg.alpha.hypergrad.options.update({"operator": "damped", "damping_mode": "absolute", "damping": 10.0,
                                            "tol": 1e-6, "maxiter": 100})
        cfg.alpha.learned.learning_rate = 0.05
    try:
        summary = train(cfg, workdir)
    except Preempted as e:  # SIGTERM (DYNGAP_FAULT=...:SIGTERM): every process stops at the same step
        print(f"PREEMPTED {e.step}", flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)
    step, test = evaluate_checkpoint(cfg, workdir, "test", "best")
    print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                                  "history": summary["history"], "final_alpha": summary["final_alpha"],
                                  "best_step": step, "test": test}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
