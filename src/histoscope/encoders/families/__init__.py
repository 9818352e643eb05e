"""Registered tile-encoder families; importing this package fills the registry."""

from histoscope.encoders.families import conch, ctranspath, phikon, resnet, vit

__all__ = ["conch", "ctranspath", "phikon", "resnet", "vit"]
