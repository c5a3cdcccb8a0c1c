"""What every entry point (``scripts/``, ``data_prep/``) sets up once absl has parsed its flags.

orbax, grain and JAX log at INFO through absl (orbax alone writes over a thousand lines in a short
run). :func:`quiet_libraries` sets absl's verbosity to WARNING unless the command line gave
``--verbosity`` (``-v``): ``--verbosity=0`` brings the INFO lines back. The project's own progress
is printed (one line an epoch, the converters' summaries), not logged, so it shows whatever the
verbosity.
"""
from __future__ import annotations

from absl import flags, logging


def quiet_libraries() -> None:
    """absl's verbosity to WARNING, unless ``--verbosity`` / ``-v`` is on the command line."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
