"""CLIP's byte-level BPE: open_clip's over its bundled vocabulary, or over a Hugging Face tokenizer folder's.

open_clip's SimpleTokenizer is loaded from its file without importing the open_clip package
(openclip_files.py says why and how).

Stable Diffusion folders ship their tokenizer as transformers' CLIPTokenizer reads it, and the ids
that tokenizer gives are what the text encoder was run on. open_clip's SimpleTokenizer applies the
same BPE, so this reuses it and changes only what differs: the vocabulary and merges come from the
folder; the special tokens (start, end and pad) are split out of the raw text first, as
transformers splits added tokens, so that SD 2's pad "!" written in a prompt is id 0 as in
diffusers; and text is cleaned as CLIPTokenizer cleans it (Unicode NFC, runs of whitespace to one
space, lowercase). open_clip also runs ftfy and unescapes HTML, which changes the ids of prompts
such as "fish &amp; chips" or "“quoted”".
"""

from __future__ import annotations

import copy
import unicodedata
from typing import TYPE_CHECKING

import regex

from .openclip_files import tokenizer_module

SimpleTokenizer, bytes_to_unicode = tokenizer_module().SimpleTokenizer, tokenizer_module().bytes_to_unicode
DEFAULT_CONTEXT_LENGTH = 77  # SimpleTokenizer()'s, CLIP's

if TYPE_CHECKING:
    from ..io.sd_text import TokenizerFiles

# CLIP's split of cleaned text into words before BPE (the same in open_clip and transformers).
WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
WHITESPACE = regex.compile(r"\s+")


def bundled_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's SimpleTokenizer(context_length=context_length): its bundled vocabulary, cleaning and BPE.

    open_clip's tokenizer module builds one with the defaults when it loads (its `_tokenizer`), and the
    BPE tables take as long again to build (0.1-0.2 s of a cold start), so this shares that one's tables;
    only the context length differs, which only SimpleTokenizer.__call__ reads.
    """
    shared = getattr(tokenizer_module(), "_tokenizer", None)
    if type(shared) is not SimpleTokenizer or shared.context_length != DEFAULT_CONTEXT_LENGTH:
        return SimpleTokenizer(context_length=context_length)
    tok = copy.copy(shared)
    tok.context_length = context_length
    return tok


def clean_like_transformers(text: str) -> str:
    """CLIPTokenizer's normalizer: NFC, whitespace runs to one space, lowercase.

    It lowercases character by character, so a word-final "Σ" becomes "σ" where str.lower() gives "ς".
    """
    return "".join(c.lower() for c in WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)))


class FolderTokenizer(SimpleTokenizer):
    """SimpleTokenizer's BPE over a folder's tables, with transformers' special-token split and cleaning.

    SimpleTokenizer.__init__ reads open_clip's bundled merges, so this sets the same fields from the
    folder instead; `bpe` is inherited unchanged, and so is `encode` for the text between special tokens.
    """

    def __init__(self, files: TokenizerFiles, context_length: int):
        self.files = files
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.encoder = dict(files.vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(files.merges)}
        self.cache = {}
        self.pat = regex.compile(WORDS)
        # Longest first, so that of two special tokens starting at one place the longer is taken.
        specials = sorted({files.bos, files.eos, files.pad}, key=len, reverse=True)
        self.special_split = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self.all_special_ids = [self.encoder[t] for t in specials]
        self.sot_token_id, self.eot_token_id = self.encoder[files.bos], self.encoder[files.eos]
        self.pad_token_id = self.encoder[files.pad]
        self.vocab_size = len(self.encoder)
        self.context_length = context_length
        self.clean_fn = clean_like_transformers
        self.reduction_fn = None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: special tokens as written, the text between them cleaned and BPE-encoded."""
        ids: list[int] = []
        # With one capturing group, split() puts the special tokens at the odd places.
        for i, piece in enumerate(self.special_split.split(text)):
            ids.extend([self.encoder[piece]] if i % 2 else super().encode(piece))
        return ids
