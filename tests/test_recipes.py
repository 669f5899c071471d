"""Recipe files (configs/*.yaml): parsing, the override order (defaults < file < flags the
user typed), one-line errors, and the shipped recipes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from embseg.cli import build_parser, given_options, main
from embseg.errors import EmbsegError
from embseg.recipes import NOT_RECIPE_KEYS, config_from_args, read_recipe
from embseg.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _train_config(*argv: str) -> TrainConfig:
    """The TrainConfig ``embseg train ARGV`` would run with (parsed as main() parses it)."""
    argv = ("train", "--shards", "s", "--out", "o", *argv)
    args = build_parser().parse_args(argv)
    args._given = given_options(argv)
    return config_from_args(args)


def test_reading_types_and_empty_files(tmp_path):
    path = _recipe(tmp_path, "k: 11\nlr: 1e-3\ntemperature: 15\nembed_bn: false\n"
                             "backbone_weights: w/r101.pth\neval_every: null\nhead: softmax\n")
    assert read_recipe(path) == {"k": 11, "lr": 0.001, "temperature": 15.0, "embed_bn": False,
                                 "backbone_weights": Path("w/r101.pth"), "eval_every": None,
                                 "head": "softmax"}
    assert isinstance(read_recipe(path)["temperature"], float)  # an int where a float goes
    assert read_recipe(_recipe(tmp_path, "# nothing set\n", "empty.yaml")) == {}


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    recipe = _recipe(tmp_path, "k: 11\nlr: 0.002\nsteps: 5\nembed_bn: false\n"
                               "repeat_threshold: 0.001\n")
    defaults = TrainConfig(shards=Path("s"), out=Path("o"))
    plain = _train_config()
    assert plain == defaults  # no file: the defaults
    from_file = _train_config("--config", str(recipe))
    assert (from_file.k, from_file.lr, from_file.steps, from_file.embed_bn,
            from_file.repeat_threshold) == (11, 0.002, 5, False, 0.001)
    assert from_file.batch_size == defaults.batch_size  # not in the file: the default
    # a flag given overrides the file, also when it repeats the parser's default value
    flagged = _train_config("--config", str(recipe), "--k", "13", "--steps",
                            str(defaults.steps), "--embed-bn")
    assert (flagged.k, flagged.steps, flagged.embed_bn, flagged.lr) == (
        13, defaults.steps, True, 0.002)
    # the flag's position does not matter; only whether it was typed
    assert _train_config("--k", "13", "--config", str(recipe)).k == 13


def test_given_options_are_exactly_the_typed_ones():
    argv = ["train", "--shards", "s", "--out", "o", "--no-embed-bn", "--lr", "0.01"]
    assert given_options(argv) == {"command", "shards", "out", "embed_bn", "lr"}


def test_main_applies_the_order_and_reports_bad_recipes_in_one_line(tmp_path, capsys):
    # steps=0 is refused by the trainer's check before anything runs: which value reached
    # the config shows in the error
    recipe = _recipe(tmp_path, "steps: 0\n")
    base = ["train", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o")]
    assert main([*base, "--config", str(recipe)]) == 2
    assert "steps=0 is out of range" in capsys.readouterr().err
    other = _recipe(tmp_path, "steps: 5\n", "five.yaml")
    assert main([*base, "--config", str(other), "--steps", "0"]) == 2
    assert "steps=0 is out of range" in capsys.readouterr().err
    unknown = _recipe(tmp_path, "k: 3\nembed-dim: 16\n", "unknown.yaml")
    assert main([*base, "--config", str(unknown)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.fullmatch(r"embseg: error: .*unknown\.yaml: unknown key 'embed-dim' "
                        r"\(did you mean 'embed_dim'\?\)\n", err), err


@pytest.mark.parametrize(("text", "message"), [
    ("dimension: 16\n", r"unknown key 'dimension'"),
    ("shards: data/train\n", r"unknown key 'shards' \(give it on the command line"),
    ("k: seven\n", r"k: expected int, got 'seven'"),
    ("k: 7.5\n", r"k: expected int, got 7\.5"),
    ("embed_bn: 1\n", r"embed_bn: expected bool, got 1"),
    ("lr: fast\n", r"lr: expected float, got 'fast'"),
    ("steps: null\n", r"steps: expected int, got None"),
    ("- k: 3\n", r"a recipe is a mapping of training settings, not a list"),
    ("k: [1\n", r"not valid YAML at line 2"),
])
def test_bad_recipes_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = _recipe(tmp_path, text)
    with pytest.raises(EmbsegError, match=re.escape(str(path)) + ": " + message) as error:
        read_recipe(path)
    assert "\n" not in str(error.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(EmbsegError, match=r"nope\.yaml: recipe file unreadable"):
        read_recipe(tmp_path / "nope.yaml")


def test_every_train_setting_is_a_recipe_key_except_the_run_ones(tmp_path):
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_RECIPE_KEYS]
    defaults = TrainConfig(shards=Path("s"), out=Path("o"))
    # the defaults written out as a recipe read back as the defaults
    record = {k: v for k, v in defaults.to_record().items() if k in names}
    assert read_recipe(_recipe(tmp_path, yaml.safe_dump(record))) == {
        k: getattr(defaults, k) for k in names}


def test_the_paper_recipe(tmp_path):
    recipe = CONFIGS / "paper-lvis-coco.yaml"
    settings = read_recipe(recipe)
    assert (settings["backbone"], settings["output_stride"], settings["batch_size"],
            settings["crop_size"], settings["head"]) == ("resnet101", 16, 16, 513, "embedding")
    assert {"embed_dim", "k", "temperature", "lr", "steps"} <= set(settings)
    # every value says where it comes from: a comment on each key's line
    for line in recipe.read_text().splitlines():
        if re.match(r"[a-z_]+:", line):
            assert "#" in line, line
    config = TrainConfig(shards=Path("s"), out=Path("o"), **settings)
    config.check()


def test_the_demo_recipe_is_the_pipeline_demo():
    pipeline = pytest.importorskip("flows.pipeline")
    assert read_recipe(CONFIGS / "demo.yaml") == pipeline.demo_training_defaults()


def test_deployment_recipes_exist_and_read():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    recipes = [d["parameters"]["config"] for d in config["deployments"]
               if "config" in d.get("parameters", {})]
    assert recipes  # the train and retrain deployments name one
    for name in recipes:
        read_recipe(REPO / name)


def test_flow_parameters_left_at_none_come_from_the_recipe(tmp_path):
    train_flows = pytest.importorskip("flows.train")
    recipe = _recipe(tmp_path, "k: 11\nsteps: 5\nno_progress: false\n")
    base = {"shards": Path("s"), "out": Path("o")}
    none = {name: None for name in train_flows.train_config_fields() if name not in base}
    assert train_flows.flow_train_config({**base, **none}) == TrainConfig(
        **base, no_progress=True)  # the flow's own default
    config = train_flows.flow_train_config({**base, **none, "steps": 9}, recipe=recipe)
    assert (config.k, config.steps, config.no_progress) == (11, 9, False)


def test_pipeline_with_a_recipe_refuses_demo_parameters_before_any_work(tmp_path):
    pipeline = pytest.importorskip("flows.pipeline")
    recipe = _recipe(tmp_path, "steps: 5\n")
    with pytest.raises(EmbsegError, match=r"give steps, lr in train_options"):
        pipeline.pipeline.fn(config=recipe, steps=3, lr=0.1, synthetic_dir=tmp_path / "d")
    with pytest.raises(EmbsegError, match=r"unknown key 'step'"):
        pipeline.pipeline.fn(config=_recipe(tmp_path, "step: 5\n", "typo.yaml"),
                             synthetic_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()
