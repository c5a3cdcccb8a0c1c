"""The paper's comparison grid over seeds, as tables and figures: one command per data set.

    python -m scripts.report --config configs/mfeat.py --seeds 0,1,2 --workdir runs/report_mfeat \\
        --out_dir reports/mfeat_fou_pix
    python -m scripts.report --config configs/mfeat.py --config_arg '{method}/all' --seeds 0,1,2 \\
        --workdir runs/report_mfeat_all --out_dir reports/mfeat_all --config.train.num_epochs=10

Runs (or collects from finished workdirs, or resumes) each modality alone, concat, constant 0 /
0.5 / 1, stepwise h(0), h(1), h(0.05), h(0.95), Ours-H and Ours-LB for every seed, then writes
report.md (Tables 1, 3, 4 in the paper's forms, mean ± std over seeds), results.json, alpha.png
(Figure 3) and modality_gap.png (Figure 2) into --out_dir. ``--config.<field>=<value>`` overrides a
config field in every run, as in the other scripts.
"""
import importlib.util
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dyngap_jax.studies import report
from scripts import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "(required) A config file, e.g. configs/mfeat.py: its get_config(arg) builds each run; "
    "--config.<field>=<value> overrides a field in every run.", lock_config=False)
flags.DEFINE_string("config_arg", "{method}", "The get_config argument, {method} replaced by each method "
                    "(mfeat: '{method}/all' or '{method}/fou+kar+pix' picks the views).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each method runs once per seed.")
flags.DEFINE_string("workdir", None, "(required) Runs go in <workdir>/<method>/seed<k> (finished ones are collected).")
flags.DEFINE_string("out_dir", None, "(required) Where report.md, results.json and the PNGs go.")
flags.DEFINE_list("methods", None, "A subset of the grid (default: all of it).")
flags.DEFINE_string("title", None, "Report title (default: from the config).")
flags.DEFINE_integer("gap_seed", 0, "Seed whose concat and ours_lb runs Figure 2 draws.")
flags.mark_flags_as_required(["config", "workdir", "out_dir"])
FLAGS = flags.FLAGS


def load_get_config(path: str):
    spec = importlib.util.spec_from_file_location("report_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise app.UsageError(f"--config: {path} has no get_config()")
    return module.get_config


def make_config_factory(get_config, arg_template: str, overrides: dict):
    """``method -> ConfigDict``: ``get_config`` of the method's argument with the command line's overrides."""
    if "{method}" not in arg_template:
        raise app.UsageError(f"--config_arg must contain {{method}}, got {arg_template!r}")

    def make(method):
        cfg = get_config(arg_template.format(method=method))
        cfg.update_from_flattened_dict(overrides)
        return cfg

    return make


def main(argv):
    del argv
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds: integers, got {FLAGS.seeds}")
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    overrides = config_flags.get_override_values(FLAGS["config"])
    make = make_config_factory(load_get_config(path), FLAGS.config_arg, overrides)
    probe = make("concat")
    grid = report.grid(list(probe.model.modalities))
    methods = FLAGS.methods or grid
    unknown = [m for m in methods if m not in report.allowed(list(probe.model.modalities))]
    if unknown:
        raise app.UsageError(f"--methods: not in the grid: {unknown}; the grid is {grid}, and {list(report.EXTRA)} "
                             "may be added")
    results = report.run_grid(make, seeds, FLAGS.workdir, methods)
    command = "python -m scripts.report " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    title = FLAGS.title or f"{probe.dataset}: {', '.join(probe.model.modalities)}"
    text = report.write_report(results, make, FLAGS.workdir, FLAGS.out_dir, title=title, command=command,
                               gap_seed=FLAGS.gap_seed if FLAGS.gap_seed in seeds else None)
    logging.info("report written to %s", os.path.join(FLAGS.out_dir, "report.md"))
    print(text)


if __name__ == "__main__":
    common.run(main)
