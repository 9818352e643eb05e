"""``--list`` for the commands that take a recipe: the recipes shipped with a stage, by name."""

from __future__ import annotations

import typer

__all__ = ["list_option"]


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
