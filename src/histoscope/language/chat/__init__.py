"""The assistant: PathChat/LLaVA-style chat about a tile or a slide on any Hugging Face causal LM.

``Assistant.load(run).ask(image, [question, …])`` answers a multi-turn conversation
(image: a features file, a tile image or None); :class:`ChatModel` is the model
(compressor → projector → LM), :class:`ChatTemplate` the conversation format,
:func:`load_chat_model` / :func:`save_chat_model` the run folder's ``model.pt``.

Notation: B conversations, N image tokens in, K image tokens in the LM, E LM width, T tokens.
"""

from histoscope.language.chat.assistant import Assistant, Conversation, image_tokens_of
from histoscope.language.chat.lora import apply_lora, lora_state, merge_lora, save_adapter
from histoscope.language.chat.model import ChatModel, build_causal_lm, build_chat_model, build_projector
from histoscope.language.chat.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ChatTemplate, get_template
from histoscope.language.chat.tokenizer import ChatTokenizer, train_chat_tokenizer
from histoscope.language.chat.trained import load_chat_model, save_chat_model

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "Assistant", "ChatModel", "ChatTemplate", "ChatTokenizer",
           "Conversation", "apply_lora", "build_causal_lm", "build_chat_model", "build_projector", "get_template",
           "image_tokens_of", "load_chat_model", "lora_state", "merge_lora", "save_adapter", "save_chat_model",
           "train_chat_tokenizer"]
