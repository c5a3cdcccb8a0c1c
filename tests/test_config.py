"""The config is validated whole before the first step: every mistake names its field, nothing is written.

Also: hypergradient methods as validated values built from ``config.alpha.hypergrad``, the warnings
about fields a strategy ignores, and the entry points running without path edits.
"""
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_data import make_tiny_records, tiny_config

from dyngap_jax import hypergrad
from dyngap_jax.data.records import RecordError
from dyngap_jax.train import ConfigError, setup, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return make_tiny_records(str(tmp_path_factory.mktemp("tiny") / "rec"))


# (method, {field: value}, the error's field or message)
MISTAKES = [
    ("ours_lb", {"alpha.hypergrad.method": "newton"}, r"config\.alpha\.hypergrad\.method: unknown .*'newton'.*known: cg, minres"),
    ("ours_h", {"alpha.hypergrad.method": "no_such_method"}, r"config\.alpha\.hypergrad\.method: unknown"),
    ("ours_h", {"alpha.learned.learning_rate": -0.1}, r"config\.alpha\.learned\.learning_rate: .*> 0"),
    ("ours_lb", {"alpha.learned.init": 1.5}, r"config\.alpha\.learned\.init"),
    ("ours_lb", {"alpha.learned.optimizer": "lbfgs"}, r"config\.alpha\.learned\.optimizer"),
    ("ours_lb", {"alpha.learned.schedule": "cosine"}, r"config\.alpha\.learned\.schedule: unknown 'cosine'; known: constant, authors"),
    ("ours_lb", {"alpha.outer": "valdation"}, r"config\.alpha\.outer: unknown 'valdation'; known: validation, train"),
    ("ours_lb", {"alpha.inner_iters": -1}, r"config\.alpha\.inner_iters: must be >= 0"),
    # another method's option: MINRES has no `operator`
    ("ours_lb", {"alpha.hypergrad.method": "minres", "alpha.hypergrad.options.operator": "normal"},
     r"config\.alpha\.hypergrad\.options\.operator: method 'minres' has no option 'operator' \(an option of cg, dense\); "
     r"'minres' takes damping, tol, maxiter"),
    ("ours_lb", {"alpha.hypergrad.options.damping": -1.0}, r"config\.alpha\.hypergrad\.options\.damping: cg: `damping` must be >= 0"),
    ("ours_lb", {"alpha.hypergrad.options.operator": "cholesky"}, r"config\.alpha\.hypergrad\.options\.operator: .*'plain'"),
    ("ours_lb", {"alpha.hypergrad.method": "dense", "alpha.hypergrad.options.max_params": 10},
     r"config\.alpha\.hypergrad\.options\.max_params: dense: the Hessian would be"),
    ("ours_lb", {"alpha.batch_size": 32}, r"config\.alpha\.batch_size=32 must be at most config\.train\.batch_size=16"),
    ("ours_h", {"train.schedule": "step"}, r"config\.train\.step_every_epochs: required with config\.train\.schedule='step'"),
    ("ours_h", {"train.schedule": "cosine"}, r"config\.train\.schedule: unknown 'cosine'; known: plateau, step, constant"),
    ("concat", {"train.optimizer": "lion"}, r"config\.train\.optimizer: unknown 'lion'; known: sgd, adam"),
    ("concat", {"train.batch_size": 0}, r"config\.train\.batch_size: must be >= 1, got 0"),
    ("concat", {"train.batch_size": -8}, r"config\.train\.batch_size: must be >= 1, got -8"),
    ("concat", {"train.batch_size": 100}, r"config\.train\.batch_size=100 is larger than the training split \(48\)"),
    ("concat", {"train.learning_rate": float("nan")}, r"config\.train\.learning_rate: must be a finite number"),
    ("concat", {"train.learning_rate": -0.1}, r"config\.train\.learning_rate: must be > 0"),
    ("concat", {"train.num_epochs": 0}, r"config\.train\.num_epochs: must be >= 1, got 0"),
    ("concat", {"train.select_metric": "loss"}, r"config\.train\.select_metric: unknown 'loss'; known: acc, map, f1"),
    ("concat", {"train.nesterov": True}, r"config\.train\.nesterov: unknown field"),
    ("concat", {"loss.mm": "cka"}, r"config\.loss\.mm: unknown 'cka'; known: infonce, js, none"),
    ("concat", {"loss.temperature": 0.0}, r"config\.loss\.temperature: must be > 0"),
    ("concat", {"alpha.strategy": "cosine"}, r"config\.alpha\.strategy: unknown alpha strategy 'cosine'"),
    ("concat", {"parallel.data": 3}, r"config\.parallel: data=3 x model=1 needs 3 devices"),
    ("concat", {"model.encoders.a.name": "transformer9000"}, r"config\.model"),
    ("ours_lb", {"alpha.when": "epoch_start"}, r"config\.alpha\.inner_iters=1: alpha\.when='epoch_start' takes one alpha step"),
    ("ours_lb", {"alpha.when": "before"}, r"config\.alpha\.when: unknown 'before'; known: after_steps, epoch_start"),
    ("ours_lb", {"alpha.outer": "heldout", "alpha.batch_size": 8, "alpha.heldout": 4},
     r"config\.alpha\.heldout=4: alpha\.outer='heldout' takes its batch of alpha\.batch_size=8"),
    ("ours_lb", {"alpha.outer": "heldout", "alpha.batch_size": 8, "alpha.heldout": 48},
     r"config\.alpha\.heldout=48: the training split has 48 examples"),
    ("ours_lb", {"alpha.inner": "validation"}, r"config\.alpha\.inner: unknown 'validation'; known: train, outer"),
    ("ours_lb", {"alpha.batch_norm": "group"}, r"config\.alpha\.batch_norm: unknown 'group'; known: batch, running, authors"),
    ("ours_lb", {"alpha.learned.precision": "float128"}, r"config\.alpha\.learned\.precision: unknown 'float128'"),
    ("authors_learned", {"alpha.hypergrad.options.tensor": "encoders_a/nope/kernel"},
     r"config\.alpha\.hypergrad\.options\.tensor: 'encoders_a/nope/kernel' is not a parameter of the model"),
    ("concat", {"loss.scale": 0.0}, r"config\.loss\.scale: must be > 0"),
    ("concat", {"train.select_split": "train"}, r"config\.train\.select_split: unknown 'train'; known: validation, test"),
    ("concat", {"train.compute_dtype": "float16"}, r"config\.train\.compute_dtype: unknown 'float16'; known: float32, bfloat16, float64"),
    ("concat", {"train.compute_dtype": "float64"}, r"config\.train\.compute_dtype='float64' needs JAX's 64-bit mode"),
]


def _apply(cfg, overrides):
    with cfg.unlocked():
        cfg.update_from_flattened_dict(overrides)
    return cfg


@pytest.mark.parametrize("method,overrides,message", MISTAKES, ids=[",".join(m[1]) for m in MISTAKES])
def test_config_mistake_fails_before_training_naming_the_field(tiny_records, tmp_path, method, overrides, message):
    cfg = _apply(tiny_config(tiny_records, method), overrides)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(cfg, str(workdir))
    assert not workdir.exists(), "a refused config wrote to the workdir"


def test_records_of_another_data_set_are_refused_before_anything_is_written(tiny_records, tmp_path):
    cfg = _apply(tiny_config(tiny_records, "concat"), {"dataset": "cremad"})
    with pytest.raises(RecordError, match="records are of data set 'tiny', the config says 'cremad'"):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_method_alone_takes_its_own_defaults(tiny_records):
    run = setup(_apply(tiny_config(tiny_records, "ours_lb"), {"alpha.hypergrad.method": "minres"}))
    assert run.method.estimator == run.cfg.alpha.hypergrad.estimator == hypergrad.MINRES()
    run = setup(_apply(tiny_config(tiny_records, "ours_lb"), {"alpha.hypergrad.method": "neumann",
                                                              "alpha.hypergrad.options.num_terms": 7}))
    assert run.method.estimator == hypergrad.Neumann(num_terms=7)
    # the training default: CG's own defaults (the damped normal equations), one value in one place
    run = setup(tiny_config(tiny_records, "ours_lb"))
    assert run.method.estimator == hypergrad.CG() and run.method.estimator.operator == "normal"
    assert run.method.learned.learning_rate == hypergrad_default_lr()
    lfm = setup(tiny_config(tiny_records, "lfm_code"))
    assert lfm.cfg.alpha.hypergrad.estimator == hypergrad.LFMCode(reduction="first_tensor_mean", tensor="first")
    # "first" is the model's first-created parameter, as PyTorch's model.parameters()[0]: resolved by setup
    assert lfm.method.estimator.tensor == lfm.info.parameter_order[0] == "encoders_a/dense_0/kernel"
    assert jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(lfm.create_train_state().params)[0][0][0]) \
        == "['encoders_a']['dense_0']['bias']"  # where jax's sorted leaves would have looked


def hypergrad_default_lr():
    from dyngap_jax.alpha import LearnedAlpha

    return LearnedAlpha().learning_rate


def test_every_method_builds_from_a_config_and_refuses_bad_values():
    for name, cls in hypergrad.METHOD_CLASSES.items():
        assert hypergrad.method_from_config({"method": name, "options": {}}) == cls()
        # every option of every method has a config placeholder of its type
        types = hypergrad.option_types()
        assert set(cls.option_names()) <= set(types)
    assert hypergrad.method_from_config({"method": "cg", "options": {"maxiter": 5, "tol": None}}) == hypergrad.CG(maxiter=5)
    with pytest.raises(ValueError, match=r"config\.alpha\.hypergrad\.options\.maxiter: cg: `maxiter` must be an integer"):
        hypergrad.method_from_config({"method": "cg", "options": {"maxiter": 2.5}})
    with pytest.raises(ValueError, match=r"options\.bogus: method 'cg' has no option 'bogus' \(no method's option\)"):
        hypergrad.method_from_config({"method": "cg", "options": {"bogus": 1}})
    # the same objects are what notebooks may pass; keywords keep working and are checked alike
    with pytest.raises(TypeError, match=r"unknown: \['operator'\]"):
        hypergrad.make_method("minres", operator="normal")
    with pytest.raises(ValueError, match="`num_terms` must be >= 1"):
        hypergrad.GhadimiWang(num_terms=0)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        hypergrad.LFMCode(reduction="median")
    assert hypergrad.CG(operator="plain").damping_value == 0.0 and hypergrad.CG().damping_value == 0.1
    assert hypergrad.CG().relative and hypergrad.CG(damping_mode="absolute").damping_value == 1e-4


def test_fields_a_fixed_strategy_ignores_are_warned_about(tiny_records, caplog):
    run = setup(_apply(tiny_config(tiny_records, "ours_h"), {"alpha.hypergrad.method": "minres",
                                                             "alpha.learned.learning_rate": 1.0}))
    assert run.warnings == [
        "config.alpha.hypergrad.method='minres' is ignored with the fixed alpha strategy 'heuristic'",
        "config.alpha.learned.learning_rate=1.0 is ignored with the fixed alpha strategy 'heuristic'"]
    assert sum("is ignored" in r.getMessage() for r in caplog.records) == 2
    assert setup(tiny_config(tiny_records, "ours_lb")).warnings == []
    adam = setup(_apply(tiny_config(tiny_records, "ours_h"), {"train.optimizer": "adam", "train.momentum": 0.5}))
    assert adam.warnings == ["config.train.momentum=0.5 is ignored with config.train.optimizer='adam'"]


def test_batch_sizes_are_global(tiny_records):
    run = setup(_apply(tiny_config(tiny_records, "ours_lb"), {"alpha.batch_size": 8, "train.eval_batch_size": 10}))
    b = run.batch
    assert (b.train, b.local_train, b.alpha, b.local_alpha, b.eval, b.local_eval) == (16, 16, 8, 8, 10, 10)
    assert run.steps_per_epoch == 48 // 16
    assert len(next(iter(run.loader("validation", train=False, batch_size=b.eval)))["label"]) == 10


def test_an_override_of_a_field_the_config_lacks_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.train", "--config", os.path.join(ROOT, "configs", "mfeat.py"),
                           "--config.alpha.hypergrad.options.foo=1", "--workdir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("--config.alpha.hypergrad.options.foo: config.alpha.hypergrad.options has no field 'foo' (it has atol, "
            "damping, damping_mode, eps") in proc.stderr


def test_train_script_refuses_a_bad_field_before_anything(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scripts.train", "--config", os.path.join(ROOT, "configs", "mfeat.py") + ":ours_h",
                           "--config.alpha.hypergrad.method=no_such_method", "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "config.alpha.hypergrad.method: unknown hypergradient method 'no_such_method'" in proc.stderr
    assert not workdir.exists()


def test_no_path_edits_and_entry_points_import_from_anywhere(tmp_path):
    sources = [p for pattern in ("dyngap_jax/**/*.py", "scripts/*.py", "data_prep/*.py", "configs/*.py", "tests/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    offenders = [os.path.relpath(p, ROOT) for p in sources if "sys.path." + "insert" in open(p).read()]
    assert offenders == []
    library = [p for p in sources if "/dyngap_jax/" in p]
    assert [p for p in library if "matplotlib." + "use(" in open(p).read() or "import matplotlib." + "pyplot" in open(p).read()] == []
    # every script's --help from another folder: importable as installed, no path edits (run side by side)
    modules = sorted(f"scripts.{os.path.basename(p)[:-3]}" for p in glob.glob(os.path.join(ROOT, "scripts", "[a-z]*.py"))
                     if not p.endswith("common.py"))
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=tmp_path) for m in modules}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        # absl's --help exits with status 1 after printing the help
        assert "flags:" in out and "Traceback" not in err, (m, err[-2000:])


@pytest.mark.parametrize("converter,required", [
    ("mfeat", ["--out_dir"]), ("cremad", ["--raw_dir", "--out_dir"]), ("kinetics_sounds", ["--raw_dir", "--out_dir"]),
    ("nvgesture", ["--raw_dir", "--out_dir"]), ("sarcasm", ["--raw_dir", "--out_dir", "--tokenizer"]),
    ("twitter2015", ["--raw_dir", "--out_dir", "--tokenizer"])])
def test_converter_help_shows_its_required_flags(tmp_path, converter, required):
    proc = subprocess.run([sys.executable, "-m", f"data_prep.{converter}", "--help"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for flag in required:
        line = next((l for l in proc.stdout.splitlines() if l.strip().startswith(flag + ":")), None)
        assert line is not None and "(required)" in line, (flag, proc.stdout[-2000:])
    # and a run without them stops naming one, before any work
    proc = subprocess.run([sys.executable, "-m", f"data_prep.{converter}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and required[-1].lstrip("-") in proc.stderr


def test_recorded_config_round_trips(tiny_records, tmp_path):
    from dyngap_jax.train import recorded_config, validate

    cfg = tiny_config(tiny_records, "lfm_code", epochs=1)
    train(cfg, str(tmp_path))
    again = recorded_config(str(tmp_path))
    assert validate(again)[0] == validate(cfg)[0]
    np.testing.assert_allclose(again.alpha.learned.clip, (0.05, 0.95))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_low_data_run_trains_on_a_fixed_subset_of_the_training_split(tiny_records):
    run = setup(_apply(tiny_config(tiny_records, "ours_lb"), {"data.train_fraction": 0.5}))
    assert run.steps_per_epoch == 24 // 16
    full = setup(tiny_config(tiny_records, "ours_lb"))
    every = lambda r: np.concatenate([b["a"] for b in r.loader("train", train=False, batch_size=8)])
    subset, whole = every(run), every(full)
    assert len(subset) == 24 and len(whole) == 48
    # the subset's records are the split's, the same in every run; validation and test stay whole
    assert all(any(np.array_equal(x, y) for y in whole) for x in subset)
    np.testing.assert_array_equal(every(setup(_apply(tiny_config(tiny_records, "ours_h"), {"data.train_fraction": 0.5}))),
                                  subset)
    assert sum(len(b["label"]) for b in run.loader("validation", train=False, batch_size=8)) == 24
    with pytest.raises(ValueError, match=r"config\.data\.train_fraction: must be > 0"):
        setup(_apply(tiny_config(tiny_records, "ours_lb"), {"data.train_fraction": 0.0}))


# --------------------------------------------------------------------------- the table of fields


def test_every_field_has_its_row_in_the_table_and_the_table_is_the_config():
    """base_config is made from the table; every section field has a kind, a doc line and a default (or is
    required), every dataclass field is a row or a declared derived value, and the docs come from the table."""
    import dataclasses

    from dyngap_jax.train import config as config_module
    from dyngap_jax.train import sections
    from dyngap_jax.train import validate
    from dyngap_jax.train.config import all_rows, base_config, fields_markdown
    from dyngap_jax.train.fields import REQUIRED, Kind, Spec, lookup, specs

    derived = {("HypergradConfig", "estimator"), ("BalanceConfig", "resolved"), ("Config", "precision")}
    classes = [sections.Config, sections.FrameConfig, *sections.SECTIONS.values(), sections.DistributedConfig,
               sections.LearnedConfig, sections.HypergradConfig]
    for cls in classes:
        rows = specs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in rows:
                assert (cls.__name__, f.name) in derived, f"{cls.__name__}.{f.name} has no row in the table"
        for name, s in rows.items():
            assert isinstance(s, Spec) and isinstance(s.kind, Kind) and s.doc.strip(), (cls.__name__, name)
            assert s.kind.describe(), (cls.__name__, name)
    leaves = {p for p, _ in all_rows()}
    assert {"train.preempt_signal", "balance.method", "parallel.distributed.heartbeat_timeout"} <= leaves
    # every default passes its own row's check, and base_config with the required fields set validates to them
    for path, s in all_rows():
        if s.default is not REQUIRED and s.default is not None:
            s.kind.check(list(s.default) if isinstance(s.default, tuple) else s.default, path)
    cfg = base_config("d", "x")
    cfg.model = {"num_classes": 2, "modalities": ["m"], "encoders": {"m": {"name": "mlp"}}, "fusion": {"name": "concat"}}
    cfg.train.update({"num_epochs": 1, "batch_size": 2, "learning_rate": 0.1})
    cfg.loss.mm = "none"
    checked, _ = validate(cfg)
    want = {p: s.default for p, s in all_rows() if s.default is not REQUIRED and "<m>" not in p and p != "loss.mm"}
    for path, default in want.items():
        got = lookup(checked, path)
        if path.endswith(".options"):  # a slot for every registered method's option, all unset
            assert all(v is None for v in got.values()), path
            continue
        got = got if not isinstance(default, (list, tuple)) else list(got)
        assert got == (list(default) if isinstance(default, tuple) else default), path
    # the README's list of fields and the config module's docstring are the table's
    readme = open(os.path.join(ROOT, "README.md")).read()
    begin, end = "<!-- config fields: begin -->", "<!-- config fields: end -->"
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == fields_markdown(), \
        "README.md's list of config fields is not the table's: python -m scripts.config_fields --write README.md"
    assert all(f"  {p}: " in config_module.__doc__ for p in leaves)


def _all_configs():
    from configs import _base

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "[a-z]*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "hypergrad_demo":
            continue
        module = __import__(f"configs.{name}", fromlist=["get_config"])
        mods = list(module.get_config("concat").model.modalities)
        args = _base.method_args(mods)
        if name == "mfeat":
            args += ["ours_lb/all", "unimodal:kar/kar+zer", "ours_h/fou+fac+mor"]
        if name == "avmnist":
            args += [f"{a}/narrow" for a in args]
        for arg in args:
            yield name, arg, module


@pytest.mark.parametrize("name,arg,module", list(_all_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_method_of_every_data_sets_config_validates(name, arg, module):
    from dyngap_jax.train import validate

    cfg, _ = validate(module.get_config(arg))
    if arg.startswith("unimodal:"):
        m = arg.split(":", 1)[1].split("/", 1)[0]
        assert cfg.model.modalities == (m,) and set(cfg.data.frames) <= {m} and set(cfg.data.masks) <= {m}


# a mistake in each section, refused by validate or setup before anything is written (the cases included)
SECTION_MISTAKES = [
    ("concat", {"data.masks": ["text"]}, r"config\.data\.masks: 'text' is not a modality of config\.model\.modalities"),
    ("concat", {"data.worker_count": -1}, r"config\.data\.worker_count: must be >= 0"),
    ("concat", {"model.num_classes": 1}, r"config\.model\.num_classes: must be >= 2"),
    ("concat", {"train.preempt_signal": "SIGHUP"}, r"config\.train\.preempt_signal: unknown 'SIGHUP'; known: SIGTERM"),
    ("concat", {"loss.scale": -2.0}, r"config\.loss\.scale: must be > 0"),
    ("concat", {"parallel.distributed.heartbeat_timeout": 1}, r"config\.parallel\.distributed\.heartbeat_timeout: "
                                                                r"must be >= 5"),
    ("concat", {"parallel.shard_params": "yes"}, r"config\.parallel\.shard_params: must be True or False"),
    ("ours_lb", {"alpha.hypergrad.remat": "some"}, r"config\.alpha\.hypergrad\.remat: unknown 'some'"),
    ("concat", {"balance.method": "ogm"}, r"config\.balance\.method: unknown training method 'ogm'; known: lfm"),
    ("concat", {"balance.options.alpha": 0.3}, r"config\.balance\.options\.alpha: training method 'lfm' has no "
                                               r"option 'alpha'"),
    # the contradictions of one resolved precision, by name
    ("ours_lb", {"train.compute_dtype": "float64", "alpha.hypergrad.precision": "default"},
     r"config\.alpha\.hypergrad\.precision='default' contradicts config\.train\.compute_dtype='float64'"),
]


@pytest.mark.parametrize("method,overrides,message", SECTION_MISTAKES, ids=[",".join(m[1]) for m in SECTION_MISTAKES])
def test_a_mistake_in_each_section_fails_before_anything_is_written(tiny_records, tmp_path, method, overrides, message):
    cfg = tiny_config(tiny_records, method).to_dict()  # a plain dict: any value can be written, as in a JSON config
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    with pytest.raises(ValueError, match=message):
        with jax.enable_x64(True):
            train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_selecting_on_a_split_the_records_lack_fails_before_anything_is_written(tmp_path):
    records = make_tiny_records(str(tmp_path / "rec"), splits=("train", "validation"))
    cfg = _apply(tiny_config(records, "concat"), {"train.select_split": "test"})
    with pytest.raises(ConfigError, match=r"config\.train\.select_split='test': .* has no test split \(it has train, "
                                          r"validation\)"):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_one_resolved_precision(tiny_records):
    from dyngap_jax.train import validate

    p = validate(tiny_config(tiny_records, "ours_lb"))[0].precision
    assert (p.compute_dtype, p.matmul, p.alpha_float64, p.alpha_matmul, p.alpha_dtype, p.x64) == \
        ("float32", "default", False, "highest", "float32", False)
    p = validate(_apply(tiny_config(tiny_records, "authors_learned"), {"alpha.hypergrad.precision": "float64"}))[0].precision
    assert (p.alpha_float64, p.alpha_matmul, p.alpha_dtype, p.x64) == (True, "highest", "float64", False)
    with jax.enable_x64(True):  # a float64 run: every number float64, the alpha step's and alpha's included
        p = validate(_apply(tiny_config(tiny_records, "ours_lb"), {"train.compute_dtype": "float64"}))[0].precision
        assert (p.compute_dtype, p.alpha_float64, p.alpha_dtype, p.x64) == ("float64", True, "float64", True)
        with pytest.raises(ConfigError, match=r"config\.train\.matmul_precision='BF16_BF16_F32_X3' is a float32 dot "
                                              r"algorithm; it contradicts config\.train\.compute_dtype='float64'"):
            validate(_apply(tiny_config(tiny_records, "ours_lb"), {"train.compute_dtype": "float64",
                                                                    "train.matmul_precision": "BF16_BF16_F32_X3"}))


def test_a_field_the_setup_does_not_read_leaves_a_finished_run_the_same_run():
    """A grid's overrides for the learned alpha do not make its concat runs 'another config' (scripts.report
    collects them); for the learned alpha they do."""
    from configs import mfeat
    from dyngap_jax.train import validate
    from dyngap_jax.train.workdir import config_differences

    def with_budget(method):
        cfg = mfeat.get_config(method)
        cfg.alpha.hypergrad.options.maxiter = 30
        cfg.alpha.batch_size = 8
        return validate(cfg)[0]

    assert config_differences(validate(mfeat.get_config("concat"))[0].to_dict(), with_budget("concat")) == []
    assert config_differences(validate(mfeat.get_config("ours_lb"))[0].to_dict(), with_budget("ours_lb")) == [
        "alpha.batch_size", "alpha.hypergrad.options.maxiter"]
    # a field the run reads still counts
    other = mfeat.get_config("concat")
    other.train.learning_rate = 0.1
    assert config_differences(validate(mfeat.get_config("concat"))[0].to_dict(), validate(other)[0]) == [
        "train.learning_rate"]
