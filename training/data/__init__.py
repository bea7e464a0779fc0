"""Drafter training data: sources (ShareGPT, reasoning-gym, mathematics-dataset), the held-out
split, chat-template tokenization with assistant loss masks, and the jsonl builder.
See docs/data.md."""

from training.data.regenerate import regenerate_responses
from training.data.format import tokenize_conversation

__all__ = ["regenerate_responses", "tokenize_conversation"]
