"""NVGesture (RGB + depth + optical flow, 25 classes): three modalities, L_MM averaged over the 3 pairs.

    python -m data_prep.nvgesture --raw_dir /data/nvgesture_arch --out_dir data/nvgesture --workers 8
    python -m scripts.train --config configs/nvgesture.py:ours_lb --workdir runs/nvgesture_ours_lb

Compare with Table 2 (Ours-LB: ACC 84.36, macro-F1 84.68). ``ours_lb_vector`` learns one alpha per pair.
"""
from configs import _base


def get_config(arg: str = "ours_lb"):
    c = _base.base("nvgesture", "data/nvgesture")
    c.model = {
        "num_classes": 25,
        "modalities": ["rgb", "depth", "flow"],
        "projection_dim": None,
        "encoders": {m: {"name": "video_resnet18", "num_frames": 8, "num_channels": ch, "temporal": "mean"}
                     for m, ch in (("rgb", 3), ("depth", 1), ("flow", 2))},
        "fusion": {"name": "concat"},
    }
    c.data.frames = {"rgb": {"size": [112, 112], "normalize": True}, "depth": {"size": [112, 112], "normalize": False},
                     "flow": {"size": [112, 112], "normalize": False}}
    c.train.update({"num_epochs": 100, "batch_size": 32, "eval_batch_size": 64, "optimizer": "sgd", "learning_rate": 1e-2,
                    "momentum": 0.9, "weight_decay": 1e-4, "schedule": "plateau", "plateau_patience": 10,
                    "plateau_factor": 0.1, "checkpoint_every_steps": 200, "keep_checkpoints": 2, "select_metric": "acc"})
    return _base.apply_method(c, arg)
