"""Reusable neural-network layers shared by model families."""
