"""Tokenizer loading and incremental detokenization into valid UTF-8 text deltas.

A token can end in the middle of a multi-byte character (byte-level BPE) and SentencePiece
tokenizers decode a token differently after a prefix, so a delta is the difference between
decoding a short window of recent tokens with and without the new ones. While the new text
ends in U+FFFD (an incomplete character) nothing is emitted and the window grows.
"""

from __future__ import annotations

from pathlib import Path

# Tokens of context before the first unread token: enough for the decoder to settle spacing.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def load_tokenizer(path: str | Path):
    """AutoTokenizer for the directory, or None when it has no tokenizer files (token-id prompts only)."""
    path = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy, and only needed with a tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # The first encode turns off truncation or padding that tokenizer.json may enable, which mutates
    # the Rust tokenizer; done now, before the service encodes from several threads at once, where
    # it could fail with "Already borrowed".
    tokenizer("")
    return tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0               # window start: context tokens, decoded but not emitted
        self.read_offset = len(self.ids)     # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is partial)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """At the end: whatever is still held (an invalid byte sequence decodes to U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
