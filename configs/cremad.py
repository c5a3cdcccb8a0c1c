"""CREMA-D (audio + video, 6 emotions).

    python -m data_prep.cremad --raw_dir /data/CREMA-D --out_dir data/cremad --workers 8
    python -m scripts.train --config configs/cremad.py:ours_lb --workdir runs/cremad_ours_lb

Compare with Table 1 (Ours-LB: ACC 83.62, mAP 90.06), Table A2 (ablation) and Table A3 (strategies).
"""
from configs import _av


def get_config(arg: str = "ours_lb"):
    return _av.audio_video("cremad", 6, arg)
