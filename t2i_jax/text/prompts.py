"""What a prompt must be before a run samples it: one clear error naming the prompt and
the character, rather than a grid of the wrong picture.

A prompt is refused when it is empty, longer than `MAX_CHARS` (no caption of any data
set here comes near; the text encoders read `text.max_len` tokens and would cut it), not
valid UTF-8 (bytes the shell passed undecoded reach Python as lone surrogates), holds a
control character (a bell, an escape sequence, a newline the grid cannot show), or, with
the run's tokenizer, a character that tokenizer has never seen (an emoji, another
script): it would become the unknown token, and the model would read a different caption.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from t2i_jax.errors import UserError

MAX_CHARS = 1000


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def check_prompts(prompts: Sequence[str], tokenizer=None) -> None:
    """UserError for the first bad prompt (numbered from 1); `tokenizer` (a
    CaptionTokenizer) adds the check of characters it does not know."""
    for number, prompt in enumerate(prompts, 1):
        where = f"prompt {number}"
        if not prompt.strip():
            raise UserError(f"{where} is empty")
        if len(prompt) > MAX_CHARS:
            raise UserError(
                f"{where} has {len(prompt):,} characters; a prompt has at most {MAX_CHARS:,}"
            )
        for position, ch in enumerate(prompt, 1):
            category = unicodedata.category(ch)
            if category == "Cs":  # a lone surrogate: an undecodable byte
                byte = f" (byte 0x{ord(ch) - 0xDC00:02X})" if ord(ch) >= 0xDC80 else ""
                raise UserError(
                    f"{where} is not valid UTF-8{byte} at character {position}; pass text"
                )
            if category in ("Cc", "Cf", "Co", "Cn"):
                raise UserError(
                    f"{where} has the control character {_describe(ch)} at character {position}"
                )
        if tokenizer is not None:
            unknown = tokenizer.unknown_characters(prompt)
            if unknown:
                raise UserError(
                    f"{where} has {_describe(unknown[0])}, a character the run's tokenizer "
                    "never saw in its training captions (it would read as unknown)"
                )
