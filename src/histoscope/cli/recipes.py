"""Recipe arguments shared by the training commands: ``RECIPE [key=value ...]`` and ``--list``
(the recipes shipped with a stage, by name)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["list_option", "recipe_and_overrides"]


def recipe_and_overrides(recipe: str | Path | None, overrides: list[str] | None
                         ) -> tuple[str | Path | None, list[str]]:
    """``(recipe name or file, or None; overrides)``: a first argument holding ``=`` is an
    override (the command was given no recipe)."""
    items = list(overrides or [])
    if recipe is not None and "=" in str(recipe):
        return None, [str(recipe), *items]
    return recipe, items


def list_option(package: str, command: str):
    """An eager ``--list`` option callback printing ``package``'s recipes, then ending the command."""

    def show(value: bool) -> bool:
        if not value:
            return value
        from histoscope.utils.recipe import list_recipes

        for name, summary in list_recipes(package).items():
            typer.echo(f"{name:24s} {summary}")
        typer.echo(f"(`histoscope {command} NAME key=value ...`; a path to a YAML file works too)")
        raise typer.Exit()

    return show
