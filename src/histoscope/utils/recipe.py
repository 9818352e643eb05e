"""YAML recipes plus ``key=value`` overrides, checked against (nested) dataclasses.

Overrides use dotted keys for nested sections (``survival.loss=discrete``,
``optim.base_lr=1e-3``) and their values are parsed as YAML scalars (``epochs=20``,
``tiny=true``, ``max_steps=null``, ``crops.global_crops_scale=[0.4,1]``). Any key the
dataclasses do not have is an error that lists the valid ones. Stages build their
config classes with :func:`build_config`; nothing here knows a particular recipe.

Recipes ship inside the package, in a ``recipes/`` folder of the stage that reads them
(``histoscope/train/recipes/abmil_classification.yaml``), so a recipe is given by name from
any directory; a path to a YAML file works too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "apply_overrides", "build_config", "list_recipes", "read_recipe", "record_recipe",
           "resolve_recipe", "valid_keys"]


class ConfigError(ValueError):
    """A recipe has an unknown key, a value of the wrong type or an invalid setting."""


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every settable dotted key of dataclass ``cls``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown recipe key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's annotation, converting only where it is lossless."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            items = typing.get_args(option)
            if origin is tuple and items and items[-1] is not Ellipsis:
                if len(items) != len(value):
                    continue
                return tuple(_coerce(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items)))
            item = items[0] if items else Any
            values = [v if item is Any else _coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
            return tuple(values) if origin is tuple else values
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        if option is str and isinstance(value, (str, Path)):
            return str(value)
        if option is dict and isinstance(value, dict):
            return dict(value)
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise ConfigError(f"recipe key {name!r} must be {names}, got {value!r}")


def build_config(cls, data: dict[str, Any], *, prefix: str = "", valid: list[str] | None = None):
    """An instance of dataclass ``cls`` from a (nested) mapping; ``valid`` lists the keys
    named in an unknown-key error (default: ``cls``'s own)."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise unknown_key_error(prefix + str(key), valid if valid is not None else valid_keys(cls, prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build_config(hint, value or {}, prefix=f"{prefix}{key}.", valid=valid)
        else:
            values[key] = _coerce(prefix + key, value, hint)
    return cls(**values)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` set (value parsed as a YAML scalar)."""
    import yaml

    data = _deep_copy(data)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: the value is not valid YAML; quote it, e.g. "
                              f"{key.strip()}='\"{text}\"'") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {error.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the recipe (a mapping of key: value "
                          "lines)") from None


def _recipe_folder(package: str):
    from importlib.resources import files

    # Resolved from the top-level package: importing the stage itself would import torch.
    top, *rest = package.split(".")
    return files(top).joinpath(*rest, "recipes")


def list_recipes(package: str) -> dict[str, str]:
    """``{name: first comment line}`` of the recipes shipped with ``package`` (e.g. ``histoscope.train``)."""
    folder = _recipe_folder(package)
    entries = sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else []
    recipes = {}
    for entry in entries:
        if entry.name.endswith(".yaml"):
            lines = entry.read_text(encoding="utf-8").splitlines()
            summary = lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""
            if summary and not summary.endswith("."):
                summary += " …"  # the description goes on in the file
            recipes[entry.name[: -len(".yaml")]] = summary
    return recipes


def resolve_recipe(recipe: str | Path, package: str | None = None) -> Path:
    """The YAML file a recipe argument names: an existing path, else (with ``package``) the
    recipe of that name shipped with the package (``abmil_classification`` or
    ``abmil_classification.yaml``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    if package is not None and path.name == str(recipe):  # a bare name, not a path into a folder
        shipped = _recipe_folder(package) / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
        if shipped.is_file():
            return Path(str(shipped))
        names = ", ".join(list_recipes(package)) or "none"
        raise FileNotFoundError(f"{recipe}: no such recipe file or shipped recipe; give a YAML path or one of: "
                                f"{names}")
    raise FileNotFoundError(f"{path}: no such recipe file")


def read_recipe(path: str | Path | None = None, overrides: list[str] | None = None, *,
                package: str | None = None) -> dict[str, Any]:
    """The mapping of a YAML recipe (optional; a file, or with ``package`` a shipped recipe's
    name, see :func:`resolve_recipe`) with ``overrides`` applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path, package)
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a YAML mapping of keys to values")
    return apply_overrides(data, list(overrides or []))


def record_recipe(out: str | Path, config, *, resume: bool, resume_free: set[str]) -> None:
    """Write ``OUT/config.yaml``. With ``resume`` (a rerun building on earlier work in ``out``),
    first refuse a recipe that differs from the recorded one in anything but ``resume_free``."""
    import yaml

    from histoscope.io.atomic import atomic_path

    path = Path(out) / "config.yaml"
    current = config.to_dict()
    if resume and path.exists():
        previous = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(previous) | set(current)
                         if k not in resume_free and previous.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{out} holds a run with a different recipe (differs in {', '.join(changed)}); "
                              "use another out_dir, or --overwrite to start afresh")
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(current, sort_keys=False))
