"""The ``RECIPE.yaml [key=value ...]`` arguments shared by the training commands."""

from __future__ import annotations

from pathlib import Path

__all__ = ["recipe_and_overrides"]


def recipe_and_overrides(recipe: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """``(recipe file or None, overrides)``: a first argument holding ``=`` is an override
    (the command was given no recipe file)."""
    items = list(overrides or [])
    if recipe is not None and "=" in str(recipe):
        return None, [str(recipe), *items]
    return recipe, items
