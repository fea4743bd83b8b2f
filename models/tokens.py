"""Tokenising captions fast: open_clip's CLIP tokenizer with each distinct word's ids cached.

open_clip's ``SimpleTokenizer`` spends most of its time per word: byte-encoding it, looking up its
BPE merge in a cache and mapping the pieces to ids, then building the output tensor row by row.
Captions of a dataset share a small vocabulary, so :class:`WordCachedTokenizer` keeps the ids of
each word it has seen and fills a numpy array. The text cleaning, the word split and the BPE
itself are open_clip's own, so the output is the same tensor (tested on unicode, HTML entities and
captions past the context). Other tokenizers (Hugging Face, reduction masks) are used as they are.

open_clip cleans each caption with ftfy and HTML unescaping before lower-casing it, which took
about half of the time per caption. Every one of those fixes needs a character outside printable
ASCII, or an ``&``: a caption of only printable ASCII (plus tabs and newlines) without ``&`` comes
out of them unchanged, so for such captions only the whitespace and case steps run.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import open_clip.tokenizer
import torch

# A bound on this cache (distinct words, each a few ids): real caption vocabularies are far
# smaller; input full of unique tokens (hashes, numbers) only clears it now and then. (open_clip's
# own BPE cache inside the tokenizer grows the same way, with or without this one.)
MAX_CACHED_WORDS = 1_000_000

# Captions that ftfy.fix_text and html.unescape return unchanged: printable ASCII, tab, newline, no "&".
_PLAIN = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


class WordCachedTokenizer:
    """open_clip ``SimpleTokenizer`` semantics with a per-word id cache.

    Args:
        inner: the open_clip ``SimpleTokenizer`` (without a reduction mask).
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.context_length = inner.context_length
        self._sot, self._eot = inner.sot_token_id, inner.eot_token_id
        self._words: dict[str, tuple[int, ...]] = {}
        # The shortcut in clean() reproduces only the default "lower" cleaning.
        self._lower = inner.clean_fn is getattr(open_clip.tokenizer, "_clean_lower", None)

    def __getattr__(self, name: str) -> Any:  # everything else is open_clip's
        if name == "inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        inner = self.inner
        unicode_word = "".join(inner.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(inner.encoder[piece] for piece in inner.bpe(unicode_word).split(" "))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the word cache (spawned workers refill their own)."""
        return {**self.__dict__, "_words": {}}

    def clean(self, text: str) -> str:
        """open_clip's cleaning of one caption (ftfy, HTML unescaping, whitespace, lower case).

        Args:
            text: one caption.

        Returns:
            The cleaned caption, as ``inner.clean_fn(text)``.
        """
        if self._lower and _PLAIN.fullmatch(text):
            return " ".join(text.split()).lower()
        return self.inner.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, as ``SimpleTokenizer.encode``.

        Args:
            text: one caption.

        Returns:
            Its token ids, without the start and end tokens.
        """
        words = self._words
        if len(words) > MAX_CACHED_WORDS:
            words.clear()
        ids: list[int] = []
        for word in self.inner.pat.findall(self.clean(text)):
            cached = words.get(word)
            if cached is None:
                cached = words[word] = self._word_ids(word)
            ids.extend(cached)
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids of captions, as ``SimpleTokenizer.__call__``.

        Args:
            texts: one caption or several.
            context_length: the row length (default: the tokenizer's context).

        Returns:
            A (len(texts), context) int64 tensor: start, ids, end, then zeros; a caption longer than
            the context is cut, keeping the end token last.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        context = context_length or self.context_length
        if not context:
            raise ValueError("a context length is needed")
        out = np.zeros((len(texts), context), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self._sot, *self.encode(text), self._eot]
            if len(ids) > context:
                ids = ids[:context]
                ids[-1] = self._eot
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)


def fast_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer to use for a model: cached when it is open_clip's plain CLIP tokenizer.

    Args:
        tokenizer: what ``open_clip.get_tokenizer`` returned.

    Returns:
        A :class:`WordCachedTokenizer` around it, or the tokenizer itself.
    """
    if type(tokenizer) is open_clip.tokenizer.SimpleTokenizer and getattr(tokenizer, "reduction_fn", None) is None:
        return WordCachedTokenizer(tokenizer)
    return tokenizer
