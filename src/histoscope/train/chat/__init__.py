"""Training the assistant (LLaVA's two stages) on conversations: ``histoscope train-chat``."""

from histoscope.train.chat.config import ChatConfig, ChatModelConfig, LoraSettings, StageConfig, load_chat_recipe
from histoscope.train.chat.run import train_chat

__all__ = ["ChatConfig", "ChatModelConfig", "LoraSettings", "StageConfig", "load_chat_recipe", "train_chat"]
