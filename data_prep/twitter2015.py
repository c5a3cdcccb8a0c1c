"""Twitter2015 (Yu and Jiang, IJCAI 2019) -> ArrayRecord: tweet image + text with a target, 3 classes.

Raw layout as distributed with TomBERT::

    <raw_dir>/train.tsv  dev.tsv  test.tsv
        header "index	#1 Label	#2 ImageID	#3 String	#3 String"; rows: index, label (0 negative,
        1 neutral, 2 positive), image file name, the tweet with $T$ where the target was, the target
    <raw_dir>/twitter2015_images/<image file>     (or --image_dir)

3,179 / 1,122 / 1,037 examples. The text is the tokenizer's pair (target, tweet with $T$
replaced by the target), 128 tokens; images 224 x 224.

    python -m data_prep.twitter2015 --raw_dir /data/twitter2015 --tokenizer /models/bert-base-uncased --out_dir data/twitter2015
"""
from __future__ import annotations

import csv
import functools
import os

from absl import flags

from data_prep import common, text_image
from data_prep.common import BadInput, convert, define_io_flags, require_dir

NAME = "twitter2015"
VERSION = "1.0.0"
CLASS_NAMES = ["negative", "neutral", "positive"]
FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
HEADER = ["index", "#1 Label", "#2 ImageID", "#3 String", "#3 String"]

FLAGS = flags.FLAGS


def read_split(path: str, image_dir: str) -> list:
    if not os.path.isfile(path):
        raise BadInput(path, "missing split file")
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != HEADER:
            raise BadInput(f"{path}:1", f"header {header} is not {HEADER}")
        for line_no, row in enumerate(reader, start=2):
            where = f"{path}:{line_no}"
            if len(row) != 5:
                raise BadInput(where, f"expected 5 tab-separated columns, got {len(row)}")
            _, label, image, tweet, target = row
            if label not in ("0", "1", "2"):
                raise BadInput(where, f"label {label!r} is outside the class list 0, 1, 2")
            if "$T$" not in tweet:
                raise BadInput(where, "the tweet has no $T$ placeholder for the target")
            items.append((os.path.join(image_dir, image), tweet.replace("$T$", target), target, int(label)))
    if not items:
        raise BadInput(path, "no examples")
    return items


def run(raw_dir, out_dir, *, tokenizer, image_dir=None, max_length=128, image_size=224, workers=0, skip_bad=False):
    require_dir(raw_dir)
    if not tokenizer:
        raise SystemExit("--tokenizer (a local checkpoint folder) is required")
    image_dir = image_dir or os.path.join(raw_dir, "twitter2015_images")
    if not os.path.isdir(image_dir):
        raise BadInput(image_dir, "missing image folder")
    splits = {s: read_split(os.path.join(raw_dir, f), image_dir) for s, f in FILES.items()}
    # the target is the first segment, the tweet the second
    splits = {s: [(img, target, text, y) for img, text, target, y in items] for s, items in splits.items()}
    return convert(
        name=NAME, version=VERSION, out_dir=out_dir, splits=splits,
        load=functools.partial(text_image.load_example, tokenizer=tokenizer, max_length=max_length, image_size=image_size),
        features=text_image.features(max_length, image_size), class_names=CLASS_NAMES,
        params={"tokenizer": os.path.abspath(tokenizer), "max_length": max_length, "image_size": image_size,
                "text": "pair(target, tweet with $T$ filled)"},
        examples_per_shard=1024, workers=workers, skip_bad=skip_bad,
    )


def main(argv):
    del argv
    run(FLAGS.raw_dir, FLAGS.out_dir, tokenizer=FLAGS.tokenizer, image_dir=FLAGS.image_dir, max_length=FLAGS.max_length,
        image_size=FLAGS.image_size, workers=FLAGS.workers, skip_bad=FLAGS.skip_bad)


def define_flags():
    """The command-line flags (defined only when run as a script, so converters can be imported together)."""
    define_io_flags("Folder with train.tsv, dev.tsv, test.tsv.", "examples")
    flags.DEFINE_string("image_dir", None, "Image folder (default <raw_dir>/twitter2015_images).")
    flags.DEFINE_string("tokenizer", None, "(required) Local Hugging Face checkpoint folder whose tokenizer to use.")
    flags.mark_flag_as_required("tokenizer")
    flags.DEFINE_integer("max_length", 128, "Tokens per text.")
    flags.DEFINE_integer("image_size", 224, "Stored image height and width.")
    flags.adopt_module_key_flags(common)  # --help lists the shared flags too


if __name__ == "__main__":
    define_flags()
    common.run(main)
