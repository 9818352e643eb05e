"""Image–text alignment: CLIP/CoCa models, CONCH as published, zero-shot classification.

``load_align_model(name, weights=..., **arch)`` builds a registered model and loads a
checkpoint strictly (CONCH's ``pytorch_model.bin`` in its published key layout);
``model.encode_image`` / ``model.encode_text`` give L2-normalised embeddings (B, E);
:func:`zero_shot_classifier` turns class prompts into class weights (E, C);
:func:`clip_loss` and :func:`caption_loss` are the training losses;
:func:`load_align_run` reopens a ``histoscope train-align`` run folder.

Notation: B samples, E joint embedding dim, C classes.
"""

from histoscope.language.align.losses import caption_loss, clip_loss
from histoscope.language.align.model import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, AlignModel, AlignOutput
from histoscope.language.align.registry import (
    AlignModelSpec,
    AlignWeightsError,
    get_align_model_spec,
    list_align_models,
    load_align_model,
    register_align_model,
)
from histoscope.language.align.tokenizer import TextTokenizer, train_bpe_tokenizer
from histoscope.language.align.trained import TrainedAlignModel, load_align_run, save_align_model
from histoscope.language.align.zeroshot import ClassPrompts, encode_texts, zero_shot_classifier

__all__ = [
    "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "AlignModel", "AlignModelSpec", "AlignOutput", "AlignWeightsError",
    "ClassPrompts", "TextTokenizer", "TrainedAlignModel", "caption_loss", "clip_loss", "encode_texts",
    "get_align_model_spec", "list_align_models", "load_align_model", "load_align_run", "register_align_model",
    "save_align_model", "train_bpe_tokenizer", "zero_shot_classifier",
]
