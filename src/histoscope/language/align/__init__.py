"""Image–text alignment: CLIP/CoCa models, CONCH as published, zero-shot classification.

``load_align_model(name, weights=..., **arch)`` builds a registered model and loads a
checkpoint strictly (CONCH's ``pytorch_model.bin`` in its published key layout);
``model.encode_image`` / ``model.encode_text`` give L2-normalised embeddings (B, E);
:func:`zero_shot_classifier` turns class prompts into class weights (E, C);
:func:`clip_loss` and :func:`caption_loss` are the training losses;
:func:`load_align_run` reopens a ``histoscope train-align`` run folder.

The registry names import without torch; everything else is imported on first use.

Notation: B samples, E joint embedding dim, C classes.
"""

from histoscope.language.align.registry import (
    AlignModelSpec,
    AlignWeightsError,
    get_align_model_spec,
    list_align_models,
    load_align_model,
    register_align_model,
)

__all__ = [
    "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "AlignModel", "AlignModelSpec", "AlignOutput", "AlignWeightsError",
    "ClassPrompts", "TextTokenizer", "TrainedAlignModel", "caption_loss", "clip_loss", "encode_texts",
    "get_align_model_spec", "list_align_models", "load_align_model", "load_align_run", "register_align_model",
    "save_align_model", "train_bpe_tokenizer", "zero_shot_classifier",
]

_LAZY = {"INIT_LOGIT_SCALE": "model", "MAX_LOGIT_SCALE": "model", "AlignModel": "model", "AlignOutput": "model",
         "caption_loss": "losses", "clip_loss": "losses", "TextTokenizer": "tokenizer",
         "train_bpe_tokenizer": "tokenizer", "TrainedAlignModel": "trained", "load_align_run": "trained",
         "save_align_model": "trained", "ClassPrompts": "zeroshot", "encode_texts": "zeroshot",
         "zero_shot_classifier": "zeroshot"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
