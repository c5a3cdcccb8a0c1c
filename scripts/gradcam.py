"""Grad-CAM heat maps of a trained run over images or video frames at chosen epochs (the paper's Figure 4).

    python -m scripts.gradcam --config configs/cremad.py:ours_lb --workdir runs/cremad_ours_lb \\
        --modality video --epochs 1,50,100 --num_examples 4 --out gradcam.png

One row per (example, checkpoint); for a video modality one column per frame. The checkpoints:
``--epochs`` (end-of-epoch checkpoints still retained; train with a large
``--config.train.keep_checkpoints`` to keep every epoch's), and/or ``--which best,latest``.
The class explained is the label (``--target label``), the prediction (``predicted``) or a fixed
index; ``--head modality`` explains the modality's own logit instead of the fused one.
"""
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dyngap_jax import gradcam
from dyngap_jax.io import new_figure, save_figure
from dyngap_jax.train import recorded_config, setup
from dyngap_jax.train.evaluation import epoch_checkpoints, load_run_state
from scripts import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/<dataset>.py:<method> (default: the "
                                          "config recorded in --workdir).", lock_config=False)
flags.DEFINE_string("workdir", None, "(required) The run folder.")
flags.DEFINE_string("modality", None, "An image or video modality (default: the first with a ResNet encoder).")
flags.DEFINE_list("epochs", [], "Epochs whose end-of-epoch checkpoints to draw.")
flags.DEFINE_list("which", ["best"], "Also these: best, latest.")
flags.DEFINE_string("split", "test", "Split the examples come from.")
flags.DEFINE_integer("num_examples", 4, "Examples drawn (the split's first ones, in order).")
flags.DEFINE_string("target", "label", "label, predicted, or a class index.")
flags.DEFINE_enum("head", "fused", ["fused", "modality"], "Explain the fused logit or the modality's own.")
flags.DEFINE_string("out", None, "(required) PNG to write.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = _CONFIG.value if _CONFIG.value is not None else recorded_config(FLAGS.workdir)
    run = setup(config)
    cfg = run.cfg
    mods = run.modalities
    encoders = cfg.model.encoders
    modality = FLAGS.modality or next((m for m in mods if "resnet" in encoders[m]["name"]), None)
    if modality not in mods or "resnet" not in encoders[modality]["name"]:
        raise app.UsageError(f"--modality: needs an image or video (ResNet) modality of {mods}, got {modality!r}")
    checkpoints = []
    if FLAGS.epochs:
        available = epoch_checkpoints(FLAGS.workdir)
        for e in FLAGS.epochs:
            if not e.isdigit() or int(e) not in available:
                raise app.UsageError(f"--epochs: no retained end-of-epoch checkpoint for epoch {e!r}; "
                                     f"available epochs: {sorted(available)}")
            checkpoints.append((f"epoch {e}", available[int(e)]))
    for w in FLAGS.which:
        if w not in ("best", "latest"):
            raise app.UsageError(f"--which: best or latest, got {w!r}")
        checkpoints.append((w, w))
    target = FLAGS.target if FLAGS.target in ("label", "predicted") else int(FLAGS.target)
    batch = jax.device_get(run.prepare_batch(next(iter(run.loader(FLAGS.split, train=False,
                                                                    batch_size=FLAGS.num_examples)))))
    rows = []
    for name, which in checkpoints:
        run, state, step = load_run_state(config, FLAGS.workdir, which)
        variables = {"params": state.params, **state.model_state}
        cams = np.asarray(gradcam.grad_cam(run.model, variables, batch, modality, target=target, head=FLAGS.head))
        rows.append((f"{name} (step {step})", cams))
        logging.info("Grad-CAM at %s (step %d)", name, step)

    x = np.asarray(batch[modality])
    frames = x.shape[1] if x.ndim == 5 else 1
    n = len(batch["label"])
    fig, axes = new_figure(n * len(rows), frames + 1, figsize=(2.2 * (frames + 1), 2.2 * n * len(rows)), squeeze=False)
    for i in range(n):
        for r, (name, cams) in enumerate(rows):
            ax_row = axes[i * len(rows) + r]
            img = x[i] if frames == 1 else x[i, 0]
            ax_row[0].imshow(gradcam.overlay(img, np.zeros(img.shape[:2]), strength=0.0))
            ax_row[0].set_title(f"#{i} label {int(batch['label'][i])}\n{name}", fontsize=7)
            for t in range(frames):
                img = x[i] if frames == 1 else x[i, t]
                cam = cams[i] if frames == 1 else cams[i, t]
                ax_row[t + 1].imshow(gradcam.overlay(img, cam))
                ax_row[t + 1].set_title(f"frame {t}" if frames > 1 else "Grad-CAM", fontsize=7)
            for ax in ax_row:
                ax.axis("off")
    fig.suptitle(f"Grad-CAM: {modality}, {FLAGS.head} head, target {FLAGS.target}")
    save_figure(fig, FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    common.run(main)
