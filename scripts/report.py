"""The paper's comparison grid over seeds, as tables and figures: one command per data set.

    python scripts/report.py --config configs/mfeat.py --seeds 0,1,2 --workdir runs/report_mfeat \\
        --out_dir reports/mfeat_fou_pix
    python scripts/report.py --config configs/mfeat.py --config_arg '{method}/all' --seeds 0,1,2 \\
        --workdir runs/report_mfeat_all --out_dir reports/mfeat_all

Runs (or collects from finished workdirs, or resumes) each modality alone, concat, constant 0 /
0.5 / 1, stepwise h(0), h(1), h(0.05), h(0.95), Ours-H and Ours-LB for every seed, then writes
report.md (Tables 1, 3, 4 in the paper's forms, mean ± std over seeds), results.json, alpha.png
(Figure 3) and modality_gap.png (Figure 2) into --out_dir. ``--set key=value`` overrides a config
field in every run (e.g. ``--set train.num_epochs=10``).
"""
import ast
import importlib.util
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from dyngap_jax.train import report  # noqa: E402

flags.DEFINE_string("config", None, "A config file, e.g. configs/mfeat.py (its get_config(arg) builds each run).")
flags.DEFINE_string("config_arg", "{method}", "The get_config argument, {method} replaced by each method "
                    "(mfeat: '{method}/all' or '{method}/fou+kar+pix' picks the views).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each method runs once per seed.")
flags.DEFINE_string("workdir", None, "Runs go in <workdir>/<method>/seed<k> (finished ones are collected).")
flags.DEFINE_string("out_dir", None, "Where report.md, results.json and the PNGs go.")
flags.DEFINE_list("methods", None, "A subset of the grid (default: all of it).")
flags.DEFINE_multi_string("set", [], "key=value config override for every run, e.g. train.num_epochs=10.")
flags.DEFINE_string("title", None, "Report title (default: from the config).")
flags.DEFINE_integer("gap_seed", 0, "Seed whose concat and ours_lb runs Figure 2 draws.")
flags.mark_flags_as_required(["config", "workdir", "out_dir"])
FLAGS = flags.FLAGS


def load_get_config(path: str):
    if not os.path.isfile(path):
        raise app.UsageError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("report_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise app.UsageError(f"--config: {path} has no get_config()")
    return module.get_config


def parse_overrides(items):
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise app.UsageError(f"--set: expected key=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((key.strip(), value))
    return out


def make_config_factory(get_config, arg_template: str, overrides):
    if "{method}" not in arg_template:
        raise app.UsageError(f"--config_arg must contain {{method}}, got {arg_template!r}")

    def make(method):
        cfg = get_config(arg_template.format(method=method))
        with cfg.unlocked():
            for key, value in overrides:
                node, *path = key.split(".")
                parent = cfg
                for p in [node] + path[:-1]:
                    if p not in parent:
                        raise app.UsageError(f"--set {key}: the config has no field {p!r}")
                    parent = parent[p]
                leaf = path[-1] if path else node
                if path and leaf not in parent:
                    raise app.UsageError(f"--set {key}: the config has no field {leaf!r}")
                if path:
                    parent[leaf] = value
                else:
                    cfg[leaf] = value
        return cfg

    return make


def main(argv):
    del argv
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds: integers, got {FLAGS.seeds}")
    make = make_config_factory(load_get_config(FLAGS.config), FLAGS.config_arg, parse_overrides(FLAGS.set))
    probe = make("concat")
    methods = FLAGS.methods or report.grid(list(probe.model.modalities))
    unknown = [m for m in methods if m not in report.grid(list(probe.model.modalities))]
    if unknown:
        raise app.UsageError(f"--methods: not in the grid: {unknown}; the grid is {report.grid(list(probe.model.modalities))}")
    results = report.run_grid(make, seeds, FLAGS.workdir, methods)
    command = "python scripts/report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    title = FLAGS.title or f"{probe.dataset}: {', '.join(probe.model.modalities)}"
    text = report.write_report(results, make, FLAGS.workdir, FLAGS.out_dir, title=title, command=command,
                               gap_seed=FLAGS.gap_seed if FLAGS.gap_seed in seeds else None)
    logging.info("report written to %s", os.path.join(FLAGS.out_dir, "report.md"))
    print(text)


if __name__ == "__main__":
    app.run(main)
