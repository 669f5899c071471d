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


def _command(parser: argparse.ArgumentParser, target: str) -> None:
    parser.set_defaults(_target=target)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="embseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vocab", help="merge LVIS and COCO-Stuff categories into one vocabulary")
    p.add_argument("--lvis", type=Path, required=True, help="LVIS v1 annotation file")
    p.add_argument("--coco-stuff", type=Path, action="append", required=True,
                   help="COCO-Stuff annotation file (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output classes.parquet")
    _command(p, "embseg.vocab:cli_vocab")

    p = sub.add_parser("build", help="build WebDataset shards (label maps painted on Ray)")
    p.add_argument("--lvis", type=Path, required=True)
    p.add_argument("--coco-stuff", type=Path, action="append", required=True)
    p.add_argument("--images", type=Path, required=True, help="images root (holds train2017/ ...)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="local Ray CPUs (default: all)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster to run on")
    p.add_argument("--overlap", choices=["first", "smaller"], default="first")
    p.add_argument("--allow-failures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    _command(p, "embseg.build:cli_build")

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (real LVIS/COCO layout)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=50)
    p.add_argument("--lvis-classes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", type=Path, default=None,
                   help="LVIS file to borrow real category names and frequencies from")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    _command(p, "embseg.synth:cli_synth")

    p = sub.add_parser("train", help="train DeepLabV3+ with the embedding (ESS) or softmax head")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--val-shards", type=Path, default=None)
    p.add_argument("--head", choices=["embedding", "softmax"], default="embedding")
    p.add_argument("--backbone", default="tiny",
                   choices=["tiny", "mobilenetv2", "resnet50", "resnet101"])
    p.add_argument("--backbone-weights", type=Path, default=None)
    p.add_argument("--output-stride", type=int, choices=[8, 16], default=16)
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--embed-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="parameter-free BatchNorm on the embedding head's last conv "
                        "(keeps pixel embeddings from collapsing onto one direction)")
    p.add_argument("--dropout", type=float, default=0.5,
                   help="dropout of the ASPP projection (0.5 as in torchvision; 0 learns "
                        "faster in runs of a few hundred steps)")
    p.add_argument("--backbone-lr-mult", type=float, default=0.1,
                   help="backbone learning rate / --lr (0.1 for pretrained weights; 1.0 "
                        "suits a backbone trained from scratch)")
    p.add_argument("--class-lr-mult", type=float, default=30.0,
                   help="class-table learning rate / --lr (the table is used L2-normalised, "
                        "which slows its rows down by ~||row||^2)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="start a new run from this checkpoint's weights (fine-tuning)")
    p.add_argument("--on-bad-sample", choices=["skip", "fail"], default="skip")
    p.add_argument("--no-progress", action="store_true")
    _command(p, "embseg.train:cli_train")

    p = sub.add_parser("eval", help="mIoU and per-class IoU of a checkpoint on shards")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--on-bad-sample", choices=["skip", "fail"], default="fail")
    _command(p, "embseg.evaluate:cli_eval")

    p = sub.add_parser("predict", help="colourised label maps, overlays and legends for images")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _command(p, "embseg.predict:cli_predict")

    p = sub.add_parser("bench", help="memory/speed of ESS vs softmax; build and loader throughput")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu-sizes", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--parts", default="memory,loss,build,loader",
                   help="comma-separated parts to run (default: all four)")
    p.add_argument("--shards", type=Path, default=None,
                   help="the loader part reads these shards (your own data) instead of the "
                        "build part's synthetic ones")
    _command(p, "embseg.bench:cli_bench")

    p = sub.add_parser("study", help="ESS vs softmax val mIoU as the class count grows, at "
                                     "equal steps and at equal memory (synthetic data)")
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
                        "(default 150,1289)")
    p.add_argument("--ess-only-classes", default=None,
                   help="comma-separated class counts trained with ESS alone, where softmax "
                        "does not fit ESS's memory (default 10000; '' for none)")
    p.add_argument("--rfs-classes", default=None,
                   help="class counts at which ESS also trains with repeat-factor sampling "
                        "(default 1289)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per point (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the runs and memory probes run")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="reference batch (ESS, equal steps; default: the preset's)")
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
                        "(repeatable; names as in TrainConfig)")
    _command(p, "embseg.study:cli_study")

    p = sub.add_parser("gpu-check", help="train on a CUDA device: the demo configuration and "
                                         "the paper's setting, checked against the CPU")
    p.add_argument("action", choices=["prepare", "run"],
                   help="prepare: write the synthetic shards (needs Ray); run: the check")
    p.add_argument("--data", type=Path, default=Path(".gpucheck"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu-check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default="demo,paper", help="comma-separated: demo, paper")
    _command(p, "embseg.gpucheck:cli_gpu_check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embseg`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
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
