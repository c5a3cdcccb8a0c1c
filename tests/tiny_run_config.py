"""A config file for the entry points in tests (``--config tests/tiny_run_config.py:<method>[/<epochs>]``): the tiny
records at ``$DYNGAP_TINY_RECORDS`` with ``tiny_data.tiny_config``'s model (``tests/`` on ``PYTHONPATH``)."""
import os

from tiny_data import tiny_config


def get_config(arg: str = "ours_h/3"):
    method, _, epochs = arg.partition("/")
    return tiny_config(os.environ["DYNGAP_TINY_RECORDS"], method, epochs=int(epochs or 3))
