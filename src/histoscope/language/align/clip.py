"""``clip``: CLIP (or CoCa) composed from any image tower and any text tower.

The image tower is a registered tile encoder (``image_encoder``, loaded by
:func:`~histoscope.encoders.load_tile_encoder`) or precomputed features
(``features_dim``); the text tower is CoCa's causal transformer built from sizes
(``text_model="coca"``) or any Hugging Face encoder (``text_model="hf"``: a local folder
``text_path``, or ``text_config`` with a ``model_type`` to build from); with
``decoder_layers > 0`` CoCa's captioning decoder is added.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from histoscope.language.align.coca import CoCaTextTower, MultimodalDecoder
from histoscope.language.align.model import AlignModel
from histoscope.language.align.towers import EncoderImageTower, HFTextTower

__all__ = ["TEXT_MODELS", "clip", "hf_text_model"]

TEXT_MODELS = ("coca", "hf")


def hf_text_model(*, path: str | None, config: dict[str, Any] | None, vocab_size: int | None = None,
                  pad_id: int | None = None) -> nn.Module:
    """A Hugging Face ``AutoModel``: from a local folder (never the Hub), or built from a config dict
    (its ``vocab_size`` and ``pad_token_id`` default to the tokenizer's)."""
    from transformers import AutoConfig, AutoModel  # heavy, only when a model is built

    if path is not None:
        return AutoModel.from_pretrained(path, local_files_only=True)
    if not config or "model_type" not in config:
        raise ValueError("text_model='hf' needs text_path (a local model folder) or text_config with a model_type "
                         "(e.g. {model_type: bert, hidden_size: 64, num_hidden_layers: 2, ...})")
    config = {"vocab_size": vocab_size, "pad_token_id": pad_id, **config}
    return AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def clip(*, embed_dim: int, context_length: int, text_width: int, text_heads: int, text_layers: int,
         decoder_layers: int, vocab_size: int | None = None, pad_id: int = 0,
         image_encoder: str | None = None, image_weights: str | None = None, image_arch: dict | None = None,
         features_dim: int | None = None, freeze_image: bool = True, image_proj: str = "linear",
         text_model: str = "coca", text_path: str | None = None, text_config: dict | None = None,
         text_pooling: str = "cls") -> AlignModel:
    """CLIP (or CoCa with ``decoder_layers``) from any image and text towers.

    ``image_weights`` is passed to ``load_tile_encoder`` (None: the published weights
    from the Hugging Face cache; ``"random"``; a path). ``vocab_size`` and ``pad_id``
    come from the tokenizer; ``text_width/heads/layers`` size the CoCa text tower and the
    decoder (the decoder's width is the text tower's).
    """
    if text_model not in TEXT_MODELS:
        raise ValueError(f"text_model must be one of {TEXT_MODELS}, got {text_model!r}")
    if image_encoder is not None:
        from histoscope.encoders import load_tile_encoder

        encoder = load_tile_encoder(image_encoder, weights=image_weights, **(image_arch or {}))
        in_dim = encoder.embed_dim
    elif features_dim is not None:
        encoder, in_dim = None, int(features_dim)
    else:
        raise ValueError("clip needs an image tower: image_encoder (a tile encoder name) or features_dim "
                         "(the width of precomputed features)")
    if text_model == "coca":
        if vocab_size is None:
            raise ValueError("the CoCa text tower needs vocab_size (the tokenizer's)")
        text = CoCaTextTower(vocab_size=vocab_size, context_length=context_length, width=text_width,
                             heads=text_heads, layers=text_layers, embed_dim=embed_dim, pad_id=pad_id)
    else:
        model = hf_text_model(path=text_path, config=text_config, vocab_size=vocab_size, pad_id=pad_id)
        text = HFTextTower(model=model, embed_dim=embed_dim,
                           pad_id=pad_id, pooling=text_pooling)
    decoder = None
    if decoder_layers:
        decoder = MultimodalDecoder(width=text.width, heads=text_heads, layers=decoder_layers,
                                    context_length=context_length, vocab_size=vocab_size or 0)
    visual = EncoderImageTower(in_dim=in_dim, embed_dim=embed_dim, encoder=encoder, freeze_encoder=freeze_image,
                               proj=image_proj, caption_width=text.width if decoder_layers else None)
    return AlignModel(visual=visual, text=text, text_decoder=decoder)
