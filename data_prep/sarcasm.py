"""Sarcasm (Cai et al., ACL 2019) -> ArrayRecord: tweet image + text, 2 classes.

Raw layout as distributed (github.com/headacheboy/data-of-multimodal-sarcasm-detection)::

    <raw_dir>/text/train.txt  valid2.txt  test2.txt    one Python list literal per line
    <raw_dir>/dataset_image/<tweet id>.jpg

train lines are ``[id, text, label]``; validation and test lines ``[id, text, hashtag_label,
human_label]`` (the data set's README): ``--eval_label`` picks which (default the hashtag label,
the same source as the training labels). 19,816 / 2,410 / 2,409 examples. Text is tokenised with
the ``transformers`` tokenizer of ``--tokenizer`` (a local checkpoint folder) to 128 tokens;
images are resized to 224 x 224.

    python -m data_prep.sarcasm --raw_dir /data/sarcasm --tokenizer /models/bert-base-uncased --out_dir data/sarcasm
"""
from __future__ import annotations

import ast
import functools
import os

from absl import flags

from data_prep import common, text_image
from data_prep.common import BadInput, convert, define_io_flags, require_dir

NAME = "sarcasm"
VERSION = "1.0.0"
CLASS_NAMES = ["not_sarcastic", "sarcastic"]
FILES = {"train": "train.txt", "validation": "valid2.txt", "test": "test2.txt"}

FLAGS = flags.FLAGS


def read_split(path: str, image_dir: str, split: str, eval_label: str) -> list:
    if not os.path.isfile(path):
        raise BadInput(path, "missing (Sarcasm's layout is <raw_dir>/text/{train,valid2,test2}.txt)")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError):
                raise BadInput(where, "not a Python list literal") from None
            width = 3 if split == "train" else 4
            if not isinstance(row, list) or len(row) != width:
                raise BadInput(where, f"expected a list of {width} elements, got {row!r:.80}")
            label = row[2] if split == "train" or eval_label == "hashtag" else row[3]
            if label not in (0, 1):
                raise BadInput(where, f"label {label!r} is outside the class list {{0, 1}}")
            items.append((os.path.join(image_dir, f"{row[0]}.jpg"), str(row[1]), None, int(label)))
    if not items:
        raise BadInput(path, "no examples")
    return items


def run(raw_dir, out_dir, *, tokenizer, max_length=128, image_size=224, eval_label="hashtag", workers=0, skip_bad=False):
    require_dir(raw_dir)
    if not tokenizer:
        raise SystemExit("--tokenizer (a local checkpoint folder) is required")
    image_dir = os.path.join(raw_dir, "dataset_image")
    if not os.path.isdir(image_dir):
        raise BadInput(image_dir, "missing image folder")
    splits = {s: read_split(os.path.join(raw_dir, "text", f), image_dir, s, eval_label) for s, f in FILES.items()}
    return convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=splits,
        load=functools.partial(text_image.load_example, tokenizer=tokenizer, max_length=max_length, image_size=image_size),
        features=text_image.features(max_length, image_size), class_names=CLASS_NAMES,
        params={"tokenizer": os.path.abspath(tokenizer), "max_length": max_length, "image_size": image_size,
                "eval_label": eval_label},
        examples_per_shard=2048, workers=workers, skip_bad=skip_bad,
    )


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.out_dir, tokenizer=FLAGS.tokenizer, max_length=FLAGS.max_length,
        image_size=FLAGS.image_size, eval_label=FLAGS.eval_label, workers=FLAGS.workers, skip_bad=FLAGS.skip_bad)


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("Folder with text/ and dataset_image/.", "examples")
    flags.DEFINE_string("tokenizer", None, "(required) Local Hugging Face checkpoint folder whose tokenizer to use.")
    flags.mark_flag_as_required("tokenizer")
    flags.DEFINE_integer("max_length", 128, "Tokens per text.")
    flags.DEFINE_integer("image_size", 224, "Stored image height and width.")
    flags.DEFINE_enum("eval_label", "hashtag", ["hashtag", "human"], "Which label of valid2/test2 to use.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
