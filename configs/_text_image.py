"""Text-image data sets (Sarcasm, Twitter2015): ResNet50 for images, BERT for text (128 tokens), Adam 1e-4, batch 128.

Point ``model.encoders.text.checkpoint`` (and optionally ``model.encoders.image.checkpoint``) at
local Hugging Face folders (e.g. bert-base-uncased, microsoft/resnet-50); nothing is downloaded.
The same folder's tokenizer must have been used by the converter (``--tokenizer``).
"""
from configs import _base


def text_image(dataset: str, num_classes: int, arg: str):
    c = _base.base(dataset, f"data/{dataset}")
    c.model = {
        "num_classes": num_classes,
        "modalities": ["image", "text"],
        "projection_dim": 512,  # ResNet50 (2048) and BERT (768) meet in one space for L_MM
        "encoders": {"image": {"name": "resnet50"},
                     "text": {"name": "bert", "checkpoint": "checkpoints/bert-base-uncased", "pooling": "cls",
                              "max_length": 128}},
        "fusion": {"name": "concat"},
    }
    c.data.frames = {"image": {"size": [224, 224], "normalize": True}}
    c.data.masks = ["text"]
    c.train.update({"num_epochs": 20, "batch_size": 128, "eval_batch_size": 256, "optimizer": "adam", "learning_rate": 1e-4,
                    "weight_decay": 0.0, "schedule": "constant", "checkpoint_every_steps": 500, "keep_checkpoints": 2,
                    "select_metric": "acc"})
    return _base.apply_method(c, arg)
