"""Qwen2.5 facts that several rooms depend on, written once.

The student is Qwen2.5-7B-Instruct; training targets, soft-label rows, stop tokens and the tiny
test model all have to agree with its tokenizer and output layer.
"""
from __future__ import annotations

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IM_END_ID, END_OF_TEXT_ID = 151645, 151643
NEWLINE_ID = 198                # "\n": the last token of every ChatML turn
FIRST_ADDED_ID = 151643         # <|endoftext|>; the 22 added tokens follow it
VOCAB_ROWS = 152064             # rows of Qwen2.5-7B/72B's embedding and lm_head (151,665 of them are tokens)
# The name recipes use for the locally built random-weight fixture (prep.testing.tiny_model resolves it).
TINY_MODEL_NAME = "medkd/tiny-qwen2.5"
