"""BERT's WordPiece tokenizer in plain Python, reading a Hugging Face model folder.

Matches the Hugging Face fast `BertTokenizer` (the `tokenizers` BertNormalizer,
BertPreTokenizer and WordPiece model) without depending on `transformers`:

1. Special tokens written literally in the text ("[MASK]", ...) are kept whole.
2. Normalisation: drop NUL, U+FFFD and control characters, map whitespace to " ", put
   spaces around CJK ideographs, strip accents (NFD, then drop combining marks) and
   lower-case, each as the folder's configuration says.
3. Pre-tokenisation: split on whitespace, and split every punctuation character off.
4. WordPiece: greedy longest-match-first with "##" continuations; a word longer than
   `max_input_chars_per_word` characters, or one that cannot be covered, is "[UNK]".

`encode` gives "[CLS] pieces [SEP]", truncated to `max_len` with "[SEP]" kept last
(Hugging Face's `truncation=True`), then right-padded with "[PAD]".
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from t2i_jax.errors import CheckpointError, DataError

# Most distinct words kept in a tokenizer's cache of word -> piece ids.
_CACHE_MAX = 100_000


def _is_whitespace(ch: str) -> bool:
    return ch in "\t\n\r" or ch.isspace()


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    # ASCII symbols such as "$", "^", "`" are not Unicode punctuation but BERT splits them.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # The CJK Unified Ideographs blocks, as in BERT (not Hangul, Hiragana or Katakana).
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """A BERT tokenizer: vocabulary plus normalisation settings.

    Args:
      vocab: token -> id.
      lowercase: lower-case the text.
      strip_accents: remove combining marks after NFD; None follows `lowercase` (as BERT).
      chinese_chars: put spaces around CJK ideographs so each is its own word.
      clean_text: drop control characters and map any whitespace to a space.
      unk_token, cls_token, sep_token, pad_token: special tokens (must be in `vocab`).
      special_tokens: tokens matched literally in the raw text and never split.
      max_input_chars_per_word: longer words become `unk_token`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        chinese_chars: bool = True,
        clean_text: bool = True,
        unk_token: str = "[UNK]",
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        special_tokens: Sequence[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
        max_input_chars_per_word: int = 100,
    ):
        missing = [t for t in (unk_token, cls_token, sep_token, pad_token) if t not in vocab]
        if missing:
            raise CheckpointError(f"WordPiece vocabulary lacks the special tokens {missing}")
        self.vocab = vocab
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.chinese_chars = chinese_chars
        self.clean_text = clean_text
        self.unk_id = vocab[unk_token]
        self.cls_id = vocab[cls_token]
        self.sep_id = vocab[sep_token]
        self.pad_id = vocab[pad_token]
        # Longest first, so a special token that contains another one wins.
        self.special_tokens = sorted(
            (t for t in special_tokens if t in vocab), key=len, reverse=True
        )
        self.max_input_chars_per_word = max_input_chars_per_word
        self._word_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    # -- text -> pieces ------------------------------------------------------------------

    def _normalize(self, text: str) -> str:
        if self.clean_text:
            text = "".join(
                " " if _is_whitespace(ch) else ch
                for ch in text
                if not (ch == "\x00" or ch == "\ufffd" or _is_control(ch))
            )
        if self.chinese_chars:
            text = "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)
        if self.strip_accents:
            text = "".join(
                ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn"
            )
        if self.lowercase:
            # Per character, as `tokenizers` does (no context-dependent final sigma).
            text = "".join(ch.lower() for ch in text)
        return text

    @staticmethod
    def _split_words(text: str) -> list[str]:
        words: list[str] = []
        current: list[str] = []
        for ch in text:
            if _is_whitespace(ch) or _is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                if not _is_whitespace(ch):
                    words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
        return words

    def _word_ids(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        if len(word) > self.max_input_chars_per_word:
            ids = [self.unk_id]
        else:
            start = 0
            while start < len(word):
                end = len(word)
                found = None
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    found = self.vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:  # One uncovered part makes the whole word unknown.
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        if len(self._word_cache) < _CACHE_MAX:
            self._word_cache[word] = ids
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """Splits the raw text into (chunk, is_special) around literal special tokens."""
        chunks: list[tuple[str, bool]] = []
        start = pos = 0
        while pos < len(text):
            match = next((t for t in self.special_tokens if text.startswith(t, pos)), None)
            if match is None:
                pos += 1
                continue
            if pos > start:
                chunks.append((text[start:pos], False))
            chunks.append((match, True))
            pos = start = pos + len(match)
        if start < len(text):
            chunks.append((text[start:], False))
        return chunks

    def unknown_characters(self, caption: str) -> list[str]:
        """The caption's characters (in order, once each) no piece of the vocabulary covers."""
        seen = dict.fromkeys(ch for ch in caption if not ch.isspace())
        return [ch for ch in seen if self.unk_id in self.tokenize_ids(ch)]

    def tokenize_ids(self, text: str) -> list[int]:
        """The piece ids of one text, without [CLS]/[SEP] and without truncation."""
        if not isinstance(text, str):
            raise DataError(f"caption must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for chunk, special in self._split_special(text):
            if special:
                ids.append(self.vocab[chunk])
                continue
            for word in self._split_words(self._normalize(chunk)):
                ids.extend(self._word_ids(word))
        return ids

    def encode_ids(
        self, texts: Sequence[str], max_len: int, *, allow_empty: bool = False
    ) -> list[list[int]]:
        """[CLS] ids [SEP] per text, truncated to `max_len` ids (no padding).

        An empty (or all-whitespace) caption is a DataError unless `allow_empty`, in which
        case it encodes as "[CLS] [SEP]" (the unconditional caption of guidance).
        """
        if isinstance(texts, str):
            raise DataError("expected a list of captions, got one str")
        if max_len < 2:
            raise DataError(f"max_len must be at least 2 ([CLS] and [SEP]), got {max_len}")
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"caption {i} must be a str, got {type(text).__name__}")
            if not allow_empty and not text.strip():
                raise DataError(f"caption {i} is empty")
            out.append([self.cls_id, *self.tokenize_ids(text)[: max_len - 2], self.sep_id])
        return out

    def encode(
        self, texts: Sequence[str], max_len: int, *, allow_empty: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns int32 ids [N, max_len] and bool mask [N, max_len] (True at valid tokens)."""
        rows = self.encode_ids(texts, max_len, allow_empty=allow_empty)
        ids = np.full((len(rows), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(rows), max_len), bool)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = True
        return ids, mask

    def empty(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """ "[CLS] [SEP]", the unconditional caption of classifier-free guidance."""
        return self.encode([""], max_len, allow_empty=True)

    def digest(self) -> str:
        """sha256 of the vocabulary and the normalisation settings."""
        settings = (self.lowercase, self.strip_accents, self.chinese_chars, self.clean_text)
        text = json.dumps([sorted(self.vocab.items()), settings, self.special_tokens])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str) -> WordPieceTokenizer:
        """Reads vocab.txt (or tokenizer.json's vocabulary) and the normalisation settings."""
        tok_json = _read_json(os.path.join(path, "tokenizer.json"))
        tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        vocab_txt = os.path.join(path, "vocab.txt")
        if os.path.isfile(vocab_txt):
            with open(vocab_txt, encoding="utf-8") as f:
                # One token per line; the id is the line number (duplicates keep the last).
                vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        elif tok_json and tok_json.get("model", {}).get("type") == "WordPiece":
            vocab = {str(k): int(v) for k, v in tok_json["model"]["vocab"].items()}
        else:
            raise CheckpointError(
                f"no WordPiece vocabulary in {path}: expected vocab.txt or a WordPiece "
                "tokenizer.json"
            )

        settings = {
            "lowercase": bool(tok_cfg.get("do_lower_case", True)),
            "strip_accents": tok_cfg.get("strip_accents"),
            "chinese_chars": bool(tok_cfg.get("tokenize_chinese_chars", True)),
            "clean_text": True,
        }
        normalizer = (tok_json or {}).get("normalizer") or {}
        if normalizer.get("type") == "BertNormalizer":  # The fast tokenizer's own settings.
            settings = {
                "lowercase": bool(normalizer.get("lowercase", True)),
                "strip_accents": normalizer.get("strip_accents"),
                "chinese_chars": bool(normalizer.get("handle_chinese_chars", True)),
                "clean_text": bool(normalizer.get("clean_text", True)),
            }
        names = {
            key: tok_cfg.get(key) if isinstance(tok_cfg.get(key), str) else default
            for key, default in (
                ("unk_token", "[UNK]"),
                ("cls_token", "[CLS]"),
                ("sep_token", "[SEP]"),
                ("pad_token", "[PAD]"),
            )
        }
        special = [t["content"] for t in (tok_json or {}).get("added_tokens", [])]
        if not special:
            special = [*names.values(), "[MASK]"]
        model = (tok_json or {}).get("model") or {}
        return cls(
            vocab,
            **settings,
            **names,
            special_tokens=special,
            max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        )


def _read_json(path: str) -> dict | None:
    """The parsed file, None when it does not exist; CheckpointError when unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
