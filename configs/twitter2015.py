"""Twitter2015 (image + text with a target, 3 classes).

    python -m data_prep.twitter2015 --raw_dir /data/twitter2015 --tokenizer checkpoints/bert-base-uncased --out_dir data/twitter2015
    python -m scripts.train --config configs/twitter2015.py:ours_lb --workdir runs/twitter2015_ours_lb

Compare with Table 1 (Ours-LB: ACC 75.01, macro-F1 70.57) and Table A2.
"""
from configs import _text_image


def get_config(arg: str = "ours_lb"):
    return _text_image.text_image("twitter2015", 3, arg)
