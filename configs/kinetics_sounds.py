"""Kinetics-Sounds (audio + video, 31 classes; spectrograms 257 x 1004).

    python -m data_prep.kinetics_sounds --raw_dir /data/ks --out_dir data/kinetics_sounds --workers 8
    python -m scripts.train --config configs/kinetics_sounds.py:ours_lb --workdir runs/ks_ours_lb

Compare with Table 1 (Ours-LB: ACC 72.53, mAP 78.38), Table 3 (ablation) and Table 4 (strategies).
"""
from configs import _av


def get_config(arg: str = "ours_lb"):
    return _av.audio_video("kinetics_sounds", 31, arg)
