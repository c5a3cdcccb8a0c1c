"""Shared pieces of the two text-image converters (Sarcasm, Twitter2015)."""
from __future__ import annotations

import numpy as np

from data_prep.media import load_image, tokenize
from dyngap_jax.data.records import FeatureSpec


def features(max_length: int, image_size: int) -> dict:
    return {"image": FeatureSpec("uint8", [image_size, image_size, 3]), "text": FeatureSpec("int32", [max_length]),
            "text_mask": FeatureSpec("int32", [max_length]), "label": FeatureSpec("int32", [])}


def load_example(item, *, tokenizer: str, max_length: int, image_size: int):
    image_path, text, pair, label = item
    ids, mask = tokenize(text, tokenizer, max_length, pair)
    return {"image": load_image(image_path, image_size), "text": ids, "text_mask": mask, "label": np.int32(label)}
