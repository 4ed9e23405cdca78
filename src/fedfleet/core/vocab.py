"""Parties must agree on what each token id means, or averaging their embeddings is meaningless.

Two parties that build a vocabulary from their own data get embedding tables of the same shape whose row
``i`` stands for different words: the param layouts match, the session runs, and the average is noise. So a
party with a tokenizer joins with a hash of its id -> token table (``hf.data.vocab_fingerprint``); the first
such party fixes the session's, and a party whose hash differs is refused by name. A party without a
tokenizer (pre-tokenised data, a vision model) sends none and is not checked.
"""

from __future__ import annotations

import threading


class SessionVocabulary:
    """The session's token-id fingerprint, taken from the first party that joins with one."""

    def __init__(self) -> None:
        self.fingerprint = ""
        self.owner = ""  # the party it came from, for the refusal message
        self._lock = threading.Lock()

    def check(self, name: str, fingerprint: str) -> str:
        """'' when ``name`` may join with ``fingerprint``; otherwise why not."""
        if not fingerprint:
            return ""
        if not isinstance(fingerprint, str) or len(fingerprint) > 128:
            return f"{name} sent an unreadable vocabulary fingerprint"
        with self._lock:
            if not self.fingerprint:  # fixed for the session, as its param layout is
                self.fingerprint, self.owner = fingerprint, name
            if fingerprint == self.fingerprint:
                return ""
            return (
                f"{name}'s tokenizer gives token ids other meanings than {self.owner}'s (vocabulary "
                f"{fingerprint[:12]} vs {self.fingerprint[:12]}): averaging their embeddings would mix different "
                "tokens; every party must use the same tokenizer (one vocabulary, built once and shared)"
            )
