"""UCI Multiple Features (the embedded default): six views of 2,000 handwritten digits, MLP encoders.

    python -m data_prep.mfeat --out_dir data/mfeat
    python -m scripts.train --config configs/mfeat.py:ours_lb --workdir runs/mfeat_ours_lb
    python -m scripts.train --config configs/mfeat.py:ours_lb/all --workdir runs/mfeat_all   # all six views

``arg`` is ``<method>[/<views>]`` with views ``fou+pix`` (default: a strong and a weak view), any
``+``-joined subset of fou, fac, kar, pix, zer, mor, or ``all``. Not in the paper: compare with
the paper's qualitative claims (Tables 3 and 4: dynamic integration narrows the per-modality gap
and lifts the fused score; the learned alpha falls over training like Figure 3).
"""
from configs import _base

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def get_config(arg: str = "ours_lb"):
    method, _, views = (arg or "ours_lb").partition("/")
    views = list(VIEWS) if views == "all" else (views.split("+") if views else ["fou", "pix"])
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"configs/mfeat.py: unknown views {unknown}; known: {list(VIEWS)}")
    c = _base.base("mfeat", "data/mfeat")
    c.model = {
        "num_classes": 10,
        "modalities": views,
        "projection_dim": None,
        "encoders": {v: {"name": "mlp", "hidden": [256], "out_features": 128, "dropout": 0.1, "in_features": VIEWS[v],
                         "norm": "layer"}
                     for v in views},
        "fusion": {"name": "concat"},
    }
    c.data.standardize = True
    c.train.update({"num_epochs": 30, "batch_size": 64, "eval_batch_size": 256, "optimizer": "sgd", "learning_rate": 0.05,
                    "momentum": 0.9, "weight_decay": 1e-4, "schedule": "plateau", "plateau_patience": 5,
                    "plateau_factor": 0.1, "checkpoint_every_steps": 0, "keep_checkpoints": 2, "select_metric": "acc"})
    c = _base.apply_method(c, method)
    if c.alpha.strategy == "learned" and c.alpha.when == "after_steps":
        c.alpha.inner_iters = 7  # an alpha step every 7 of the epoch's 21 train steps
    return c
