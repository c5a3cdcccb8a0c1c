"""The run config's fields, from their table (``dyngap_jax.train.sections``): print them, or write README.md's list.

    python -m scripts.config_fields                     # the Markdown table
    python -m scripts.config_fields --write README.md   # replace the list between its markers
"""
from absl import app, flags

from dyngap_jax.io import atomic_write_text
from dyngap_jax.train.config import fields_markdown
from scripts import common

flags.DEFINE_string("write", None, "A Markdown file whose list of config fields (between the markers "
                    "`<!-- config fields: begin -->` and `<!-- config fields: end -->`) is replaced.")
FLAGS = flags.FLAGS
BEGIN, END = "<!-- config fields: begin -->", "<!-- config fields: end -->"


def main(argv):
    del argv
    table = fields_markdown()
    if not FLAGS.write:
        print(table)
        return
    with open(FLAGS.write) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise app.UsageError(f"--write: {FLAGS.write} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(FLAGS.write, f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the {table.count(chr(10)) - 1} fields to {FLAGS.write}")


if __name__ == "__main__":
    common.run(main)
