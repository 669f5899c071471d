"""The ``embseg`` command line: one sub-command per pipeline stage.

Each sub-command's options are declared here; the work is done by a ``cli_*`` function in the
stage's own module, imported only when that command runs (so ``embseg vocab`` does not import
torch). Fatal input problems surface as one line on stderr and exit code 2.

Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set before torch
loads, as the flows do; export the variable to choose otherwise): spinning threads compete
with the CPU loss kernels' threads and with other work on a shared CPU (the nearest-class
search at 1,284 classes took 0.07-0.13 s instead of 0.07 s).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from embseg.errors import EmbsegError
from embseg.formats import FORMAT_NAMES

SHARDS_FORMS = ("a folder, a brace pattern (DIR/train-{000000..000099}.tar), pipe:COMMAND or a "
                "URL (http(s)://, s3://, gs://); classes.parquet and manifest.parquet are read "
                "from beside them")
"""What every ``--shards`` option accepts (see embseg.data.sources)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default after its help, as ``(default: X)``.

    A required option says ``(required)``. An option whose default is None has no value to
    show: its help says what happens without it, in its own ``(default: ...)`` words.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs in ("+", None):
            return text  # a positional argument: given, never defaulted
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default == []:
            return text
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _command(sub: argparse._SubParsersAction, name: str, *, help: str,
             target: str) -> argparse.ArgumentParser:
    """A sub-command ``name`` whose work is ``target`` (``module:function``), defaults shown."""
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    parser.set_defaults(_target=target)
    return parser


def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (for logs and CI; the summary lines still print)")


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model runs; cuda uses bf16 autocast")


def _add_bad_sample_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--on-bad-sample", choices=["skip", "fail"], default=default,
                        help="an undecodable sample or truncated shard: skip it (counted and "
                             "logged with its shard and key) or stop with a one-line error")


def _add_annotation_options(parser: argparse.ArgumentParser, *, out_help: str,
                            out_type: type = Path, required: bool = True) -> None:
    when = "" if required else " (default: none; required with --format lvis, unused otherwise)"
    parser.add_argument("--lvis", type=Path, required=required,
                        help="LVIS v1 annotation file (lvis_v1_train.json / lvis_v1_val.json)"
                             + when)
    parser.add_argument("--coco-stuff", type=Path, action="append", required=required,
                        help="COCO-Stuff annotation file (stuff_train2017.json ...); repeat "
                             "the option for several files" + when)
    parser.add_argument("--out", type=out_type, required=True, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (each option with its help and default)."""
    parser = argparse.ArgumentParser(
        prog="embseg", formatter_class=HelpFormatter,
        description="embseg: large-vocabulary semantic segmentation (the embedding head and "
                    "kNN loss of Jain et al., ICCV 2021). One sub-command per pipeline stage.",
        epilog="`embseg COMMAND --help` lists a command's options with their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "vocab", help="merge LVIS and COCO-Stuff categories into one vocabulary",
                 target="embseg.vocab:cli_vocab")
    _add_annotation_options(p, out_help="the vocabulary file to write (classes.parquet)")

    p = _command(sub, "build", help="build WebDataset shards (label maps painted on Ray)",
                 target="embseg.build:cli_build")
    p.add_argument("--format", default="lvis", choices=FORMAT_NAMES,
                   help="the dataset's format: lvis = LVIS v1 + COCO-Stuff annotation files; "
                        "ade20k, cityscapes, voc, coco-stuff-maps = that dataset's own folder "
                        "layout under --images; labelmap = any folder of label PNGs "
                        "(--labels, --classes); see docs/formats.md")
    _add_annotation_options(p, out_type=str, required=False,
                            out_help="shard folder of this split (e.g. shards/train): "
                                     "*-NNNNNN.tar, classes.parquet, manifest.parquet; or an "
                                     "fsspec URL such as s3://bucket/prefix. On a Ray cluster "
                                     "a folder must be on a file system every node shares")
    p.add_argument("--images", type=Path, required=True,
                   help="lvis: the images root, holding train2017/, val2017/ (the "
                        "annotations' coco_url / file_name are resolved under it); ade20k: "
                        "ADEChallengeData2016; cityscapes: the folder of leftImg8bit/ and "
                        "gtFine/; voc: VOCdevkit/VOC2012; coco-stuff-maps: the folder of "
                        "train2017/ and stuffthingmaps_trainval2017/; labelmap: the images")
    p.add_argument("--split", default="train",
                   help="split name: names the shards (<split>-NNNNNN.tar) and their records; "
                        "for the other formats the dataset's own split (ade20k: training, "
                        "validation; cityscapes, voc: train, val; coco-stuff-maps: train2017, "
                        "val2017; labelmap: any name)")
    p.add_argument("--labels", type=Path, default=None,
                   help="--format labelmap: the folder of label PNGs, paired with the images "
                        "by file stem (default: none; required with labelmap)")
    p.add_argument("--classes", type=Path, default=None,
                   help="--format labelmap: the class list, one name per line (the n-th is "
                        "value n) or 'VALUE NAME' lines (default: none; required with "
                        "labelmap)")
    p.add_argument("--unlabelled", type=int, default=None,
                   help="--format labelmap: the label value that is no class (default: 255)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per shard; smaller shards spread a small dataset over more "
                        "loader workers, larger ones mean fewer files")
    p.add_argument("--workers", type=int, default=None,
                   help="CPUs of the local Ray started for the build (default: all CPUs)")
    p.add_argument("--ray-address", default=None,
                   help="address of a running Ray cluster to build on, e.g. HOST:6379 or "
                        "auto; the images root must be at the same path on every node "
                        "(default: start a local Ray)")
    p.add_argument("--overlap", choices=["first", "smaller"], default="first",
                   help="where LVIS instances overlap: the first in the file wins (first) or "
                        "smaller instances are painted over larger ones (smaller)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some images failed (they are recorded in the "
                        "manifest with the reason either way)")
    _add_progress_option(p)

    p = _command(sub, "synth", help="write the built-in synthetic dataset (real LVIS/COCO layout)",
                 target="embseg.synth:cli_synth")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the annotation files and images/")
    p.add_argument("--images", type=int, default=200, help="training images to generate")
    p.add_argument("--val-images", type=int, default=50, help="validation images to generate")
    p.add_argument("--lvis-classes", type=int, default=200,
                   help="LVIS-like classes (the 91 COCO-Stuff stuff classes come on top); "
                        "more classes need more images to learn")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the layout and appearance: same arguments, same bytes")
    p.add_argument("--categories", type=Path, default=None,
                   help="LVIS file to borrow real category names and frequencies from "
                        "(default: generated names)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 128)")

    p = _command(sub, "train", help="train DeepLabV3+ with the embedding (ESS) or softmax head",
                 target="embseg.train:cli_train")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="recipe file (YAML, e.g. configs/paper-lvis-coco.yaml) of training "
                        "settings; options typed on the command line override it "
                        "(default: none, the defaults below)")
    p.add_argument("--shards", required=True,
                   help=f"training shards (from embseg build): {SHARDS_FORMS}")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--val-shards", default=None,
                   help="validation shards, in the forms of --shards: val mIoU at each "
                        "evaluation and best.pt (default: no validation)")
    p.add_argument("--head", choices=["embedding", "softmax"], default="embedding",
                   help="embedding: the paper's pixel embeddings + kNN loss, memory flat in "
                        "the class count; softmax: the usual C-way classifier, the baseline")
    p.add_argument("--backbone", default="tiny",
                   choices=["tiny", "mobilenetv2", "resnet50", "resnet101"],
                   help="feature extractor; tiny is a small CPU-friendly network for the "
                        "demo, resnet101 is the paper's")
    p.add_argument("--backbone-weights", type=Path, default=None,
                   help="local file of pretrained backbone weights (a torchvision-style "
                        "state dict; nothing is downloaded) (default: random init)")
    p.add_argument("--output-stride", type=int, choices=[8, 16], default=16,
                   help="input / feature-map size ratio; 8 is finer and costs ~4x the "
                        "memory of the decoder")
    p.add_argument("--embed-dim", type=int, default=32,
                   help="d, the size of the pixel and class embeddings (embedding head)")
    p.add_argument("--k", type=int, default=25,
                   help="nearest other classes per pixel in the loss besides its target "
                        "(embedding head); more negatives learn faster from scratch (k = 7 "
                        "reached half of k = 25's val mIoU in embseg study's tuning)")
    p.add_argument("--temperature", type=float, default=5.0,
                   help="T, the scale of the pixel-class distances in the loss's logits "
                        "(embedding head); the paper's release uses 20, which learnt slower "
                        "in embseg study's tuning on the tiny backbone")
    p.add_argument("--margin", type=float, default=0.2,
                   help="margin of the class-embedding separation penalty (embedding head)")
    p.add_argument("--embed-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="parameter-free BatchNorm on the embedding head's last conv "
                        "(keeps pixel embeddings from collapsing onto one direction)")
    p.add_argument("--dropout", type=float, default=0.5,
                   help="dropout of the ASPP projection (0.5 as in torchvision; 0 learns "
                        "faster in runs of a few hundred steps)")
    p.add_argument("--backbone-lr-mult", type=float, default=0.1,
                   help="backbone learning rate / --lr (0.1 for pretrained weights; 1.0 "
                        "suits a backbone trained from scratch)")
    p.add_argument("--class-lr-mult", type=float, default=300.0,
                   help="class-table learning rate / --lr (the table is used L2-normalised, "
                        "which slows its rows down by ~||row||^2)")
    p.add_argument("--steps", type=int, default=1000,
                   help="SGD steps of the run (the poly learning-rate schedule spans them)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--crop-size", type=int, default=256,
                   help="side of the square training crops in pixels (the paper: 513)")
    p.add_argument("--lr", type=float, default=0.01,
                   help="base learning rate (SGD, momentum 0.9, poly decay)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="loader processes decoding and augmenting samples (0: in the "
                        "training process); a resume needs the same number")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between saves of last.pt (what a resume loses at most)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validations (default: --checkpoint-every)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation and the data order (same seed on CPU: "
                        "same losses)")
    _add_device_option(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (model, optimizer, "
                        "schedule, data position)")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="start a new run from this checkpoint's weights (fine-tuning) "
                        "(default: from --backbone-weights or scratch)")
    _add_bad_sample_option(p, "skip")
    p.add_argument("--repeat-threshold", type=float, default=None, metavar="T",
                   help="repeat-factor sampling (LVIS): an image whose rarest class is in a "
                        "fraction f < T of the training images appears about sqrt(T / f) "
                        "times per epoch (factors from manifest.parquet; LVIS uses 0.001) "
                        "(default: off)")
    _add_progress_option(p)

    p = _command(sub, "eval", help="mIoU and per-class IoU of a checkpoint on shards",
                 target="embseg.evaluate:cli_eval")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint to score (best.pt or last.pt of a run)")
    p.add_argument("--shards", required=True,
                   help=f"shards to score it on, built with the same vocabulary: {SHARDS_FORMS}")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for per_class.parquet, per_class.csv and summary.json "
                        "(default: print the table only)")
    _add_device_option(p)
    p.add_argument("--batch-size", type=int, default=4,
                   help="images per forward pass (consecutive images of equal size)")
    _add_bad_sample_option(p, "fail")

    p = _command(sub, "predict", help="label maps and triptych pictures (image | ground "
                                      "truth | prediction) with legends",
                 target="embseg.predict:cli_predict")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to predict with")
    p.add_argument("images", type=Path, nargs="*",
                   help="image files (JPEG, PNG, ...); or give --shards instead")
    p.add_argument("--shards", default=None,
                   help="predict on the first --count samples of these shards, with their "
                        f"ground truth in the pictures: {SHARDS_FORMS} (default: the image "
                        "files given)")
    p.add_argument("--count", type=int, default=4, help="samples to predict with --shards")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the pictures and predictions.json")
    _add_device_option(p)

    p = _command(sub, "bench", help="memory/speed of ESS vs softmax; build and loader throughput",
                 target="embseg.bench:cli_bench")
    p.add_argument("--quick", action="store_true",
                   help="the CPU sizes (ResNet-50 at 2 x 128 x 128, ~4 minutes on 2 cores) "
                        "instead of the longer default sweep")
    p.add_argument("--gpu-sizes", action="store_true",
                   help="the paper's sizes (batch 16, 513 x 513, ResNet-50/101); needs CUDA")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON results (default: OUT/bench.json)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"),
                   help="folder for bench.json, bench.md and memory_vs_classes.png")
    p.add_argument("--parts", default="memory,loss,search,build,loader",
                   help="comma-separated parts to run")
    p.add_argument("--shards", default=None,
                   help="the loader part reads these shards (your own data) instead of the "
                        f"build part's synthetic ones: {SHARDS_FORMS} (default: the synthetic "
                        "ones)")
    p.add_argument("--images", type=int, default=None,
                   help="images of the build-scale part's LVIS-train-like set; the annotation "
                        "counts scale with it (default: 100,170, LVIS v1 train)")

    p = _command(sub, "study", help="ESS vs softmax val mIoU as the class count grows, at "
                                    "equal steps and at equal memory (synthetic data)",
                 target="embseg.study:cli_study")
    p.add_argument("--quick", action="store_true",
                   help="CPU sizes (about 25 minutes on 2 cores); without it the GPU sizes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/study"),
                   help="folder of study.json, study.md and study.png (rewritten after "
                        "every run)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the cached synthetic data and the run folders "
                        "(default: OUT/work)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class counts trained with both heads "
                        "(default: 150,1289)")
    p.add_argument("--ess-only-classes", default=None,
                   help="comma-separated class counts trained with ESS alone, where softmax "
                        "does not fit ESS's memory (default: 10000; '' for none)")
    p.add_argument("--rfs-classes", default=None,
                   help="class counts at which ESS also trains with repeat-factor sampling "
                        "(default: 1289)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per point (default: 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the runs and memory probes run")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="reference batch of ESS and equal-steps softmax (default: the preset's)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="reference crop in pixels (default: the preset's)")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic training images per class count (default: the preset's)")
    p.add_argument("--val-images", type=int, default=None,
                   help="synthetic val images per class count (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic image side in pixels (default: the preset's)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader workers per training run (default: the preset's, 1 on CPU; 0 "
                        "decodes in the training process)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the synthetic data (another seed gives a held-out draw for "
                        "tuning)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override a training setting for every run, e.g. --set k=25 "
                        "(repeatable; names as in TrainConfig) (default: the trainer's defaults)")

    p = _command(sub, "gpu-check", help="train on a CUDA device: the demo configuration and "
                                        "the paper's setting, checked against the CPU",
                 target="embseg.gpucheck:cli_gpu_check")
    p.add_argument("action", choices=["prepare", "run"],
                   help="prepare: write the synthetic shards (needs Ray); run: the check")
    p.add_argument("--data", type=Path, default=Path(".gpucheck"),
                   help="folder of the prepared shards (written by prepare, read by run)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu-check"),
                   help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda",
                   help="torch device to check (cpu runs the same check on the CPU)")
    p.add_argument("--parts", default="demo,paper", help="comma-separated: demo, paper")
    return parser


def given_options(argv: Sequence[str]) -> frozenset[str]:
    """Destinations of the options the command line ``argv`` gives itself (not defaults).

    Parsed a second time by a parser whose defaults are all suppressed, so an option left out
    leaves no attribute; ``embseg train --config`` lets exactly these override its file.
    """
    probe = build_parser()
    _suppress_defaults(probe)
    # names set by set_defaults (_target) are the parser's own, never typed
    return frozenset(name for name in vars(probe.parse_args(argv)) if not name.startswith("_"))


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # argparse has no public walk over a parser's options
        choices = action.choices if isinstance(action.choices, dict) else {}
        for subparser in choices.values():
            if isinstance(subparser, argparse.ArgumentParser):
                _suppress_defaults(subparser)
        action.default = argparse.SUPPRESS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embseg`` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args._given = given_options(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the command imports torch
    module_name, func_name = args._target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except EmbsegError as exc:
        print(f"embseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("embseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
