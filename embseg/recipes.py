"""Training recipes as files: ``configs/*.yaml`` fill :class:`embseg.train.TrainConfig`.

A recipe is a YAML mapping of ``TrainConfig`` field names (``embed_dim``, ``k``, ``lr``, ...;
the ``embseg train`` options with ``_`` for ``-``) to values. Three layers make a run's
settings, each overriding the one before:

1. the trainer's defaults (``TrainConfig``'s field defaults, then a caller's own defaults,
   e.g. the flows' ``no_progress=True``);
2. the recipe file (``embseg train --config FILE``, the ``config`` flow parameter);
3. what the caller gave explicitly (command-line flags actually typed, flow parameters not
   left at None).

A recipe says how to train, not on what or where: ``shards``, ``out`` and ``resume`` are not
recipe keys. Relative paths in a recipe (``backbone_weights``, ``val_shards``) are relative
to the working directory, like those of the command line. An unknown key, a value of the
wrong type or a file that is not a YAML mapping is a one-line EmbsegError naming the file and
the key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embseg.errors import EmbsegError

if TYPE_CHECKING:
    from embseg.train import TrainConfig

NOT_RECIPE_KEYS = ("shards", "out", "resume")
"""TrainConfig fields a recipe cannot set: the data, the run folder and what to do with it."""


def _train_config_fields() -> dict[str, str]:
    """Recipe key -> the annotation of its TrainConfig field (a string such as ``int | None``)."""
    from embseg.train import TrainConfig

    return {f.name: str(f.type) for f in fields(TrainConfig) if f.name not in NOT_RECIPE_KEYS}


def _coerce(path: Path, key: str, value: Any, annotation: str) -> Any:
    """``value`` as the field's type, or an EmbsegError naming the file and the key."""
    kinds = {part.strip() for part in annotation.split("|")}
    if value is None:
        if "None" in kinds:
            return None
    elif "bool" in kinds:
        if isinstance(value, bool):
            return value
    elif "int" in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif "float" in kinds:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif "Path" in kinds:
        if isinstance(value, str) and value:
            return Path(value)
    elif "str" in kinds:
        if isinstance(value, str):
            return value
    wanted = " or ".join(sorted(kinds - {"None"})) + (" or null" if "None" in kinds else "")
    raise EmbsegError(f"{path}: {key}: expected {wanted}, got {value!r}")


def read_recipe(path: Path) -> dict[str, Any]:
    """The settings of the recipe file ``path``, checked and typed (an empty file: none)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EmbsegError(f"{path}: recipe file unreadable ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise EmbsegError(f"{path}: not valid YAML{where} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EmbsegError(f"{path}: a recipe is a mapping of training settings, not a "
                          f"{type(data).__name__}")
    known = _train_config_fields()
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            if key in NOT_RECIPE_KEYS:
                hint = " (give it on the command line or as a flow parameter)"
            else:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EmbsegError(f"{path}: unknown key {key!r}{hint}")
        settings[key] = _coerce(path, key, value, known[key])
    return settings


def layered_settings(*, given: dict[str, Any], recipe: Path | None = None,
                     defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``defaults``, overridden by the recipe file's settings, overridden by ``given``."""
    return {**(defaults or {}), **(read_recipe(recipe) if recipe is not None else {}),
            **given}


def config_from_args(args: Any) -> TrainConfig:
    """The TrainConfig of parsed ``embseg train`` options: flags the user typed (the
    parser's ``_given`` set) override ``--config``'s file, which overrides the defaults.

    Without ``_given`` (a Namespace built by hand) every attribute counts as given.
    """
    from embseg.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = vars(args)
    given_names = getattr(args, "_given", None)
    if given_names is None:
        given_names = set(values)
    parsed_defaults = {k: v for k, v in values.items() if k in names}
    given = {k: values[k] for k in given_names if k in names}
    return TrainConfig(**layered_settings(given=given, recipe=getattr(args, "config", None),
                                          defaults=parsed_defaults))
