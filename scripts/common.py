"""What the entry points share: ``run(main)``, which checks ``--config.<field>`` overrides before absl parses them.

ml_collections reports an override of a field the config does not have as a bare ``KeyError: 'foo'``
traceback; :func:`run` names the flag and the fields that exist instead, and exits with status 2.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

from absl import app, flags

from dyngap_jax import cli, compilation

flags.DEFINE_bool("compilation_cache", True, "Keep compiled XLA executables in --compilation_cache_dir and reuse "
                  "them in later runs (--nocompilation_cache: compile everything afresh).")
flags.DEFINE_string("compilation_cache_dir", os.environ.get("DYNGAP_COMPILATION_CACHE", compilation.DEFAULT_CACHE_DIR),
                    "Where the persistent compilation cache lives (default: $DYNGAP_COMPILATION_CACHE, else "
                    "~/.cache/dyngap_jax/xla).")


def _config_argument(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return None  # the config flag reports it
    module_spec = importlib.util.spec_from_file_location("_checked_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def override_errors(argv: Sequence[str], name: str = "config") -> list[str]:
    """A message per ``--<name>.<path>`` in ``argv`` whose path the config has no field for."""
    overrides = [a[len(name) + 3:].split("=", 1)[0] for a in argv if a.startswith(f"--{name}.")]
    spec = _config_argument(argv, name)
    if not overrides or spec is None:
        return []
    try:
        config = _load(spec)
    except Exception:  # noqa: BLE001 - a config that fails to load is reported by the flag itself
        return []
    errors = []
    for path in overrides:
        node, walked = config, name
        for key in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else None
            if keys is None or key not in keys:
                has = f"it has {', '.join(sorted(map(str, keys)))}" if keys else "it is not a group of fields"
                errors.append(f"--{name}.{path}: {walked} has no field {key!r} ({has})")
                break
            node, walked = node[key], f"{walked}.{key}"
    return errors


def _user_errors() -> tuple[type, ...]:
    """The library's errors that describe bad input or a refused start; their message says it all."""
    from dyngap_jax.data.records import RecordError
    from dyngap_jax.train import CheckpointError, ConfigError, TrainingDiverged, WorkdirBusy

    return ConfigError, RecordError, CheckpointError, TrainingDiverged, WorkdirBusy


def _stop(status: int, message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.exit(status)


def run(main: Callable, config_flag: str = "config") -> None:
    """``absl.app.run(main)`` after :func:`override_errors` (exit status 2 naming the flag on a bad field),
    with the libraries' INFO logging off (:func:`dyngap_jax.cli.quiet_libraries`) and the persistent
    compilation cache on (``--compilation_cache_dir``; ``--nocompilation_cache`` turns it off).

    A bad config value (:class:`~dyngap_jax.train.ConfigError`) exits with status 2, bad or damaged
    records and checkpoints, a diverged run and a busy workdir with status 1, each as one line
    ``error: <message>`` (the message names the file, field or step) instead of a traceback; a
    preempted run (:class:`~dyngap_jax.train.Preempted`: its checkpoint written) with status 75.
    """
    errors = override_errors(sys.argv[1:], config_flag)
    if errors:
        sys.stderr.write("\n".join(f"FATAL Flags parsing error: {e}" for e in errors) + "\n")
        sys.exit(2)

    def guarded(argv):
        cli.quiet_libraries()  # orbax's, grain's and JAX's INFO logging off unless --verbosity is given
        if flags.FLAGS.compilation_cache and flags.FLAGS.compilation_cache_dir:
            compilation.enable_persistent_cache(flags.FLAGS.compilation_cache_dir)
        from dyngap_jax.train import PREEMPTED_EXIT_STATUS, Preempted

        known = _user_errors()
        try:
            return main(argv)
        except Preempted as e:  # a checkpoint is written: the same command resumes
            _stop(PREEMPTED_EXIT_STATUS, f"preempted: {e}")
        except known as e:
            _stop(2 if isinstance(e, known[0]) else 1, f"error: {e}")

    app.run(guarded)
