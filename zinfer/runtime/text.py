"""Text of tokens as they are generated, without decoding everything so far at every step.

Decoding the whole continuation per token costs host time that grows with the text (0.35 ms for 2,000
tokens with SmolLM2's tokenizer, per sequence per step: at batch 64 more than a GPU decode step), so stop
strings and streaming decode a window of recent tokens instead.
"""

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


def tail_text(decode: Decode, tokens: list[int], chars: int) -> str:
    """The end of decode(tokens): the last token's text and at least `chars` characters before it (all of the text
    when it is shorter), so a stop string of up to `chars` characters that the last token completes lies inside.
    Decodes a window of the last tokens, doubled until its text is long enough."""
    need = chars + len(decode(tokens[-1:])) + 4  # + 4: the window's first token may decode differently alone
    window = need + 4
    while window < len(tokens):
        text = decode(tokens[-window:])
        if len(text) >= need:
            return text
        window *= 2
    return decode(tokens)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether one was found."""
    at = min((text.index(s) for s in stops if s in text), default=None)
    return (text, False) if at is None else (text[:at], True)


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins a stop string: text a stream must hold back, since the
    next tokens may complete the stop string (which is never shown)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class TextReader:
    """The new text of a growing continuation at each step, decoding only the tokens since the last piece plus
    the piece before (a few prompt tokens at first: a token that starts a word keeps its leading space). A
    piece ending inside a multi-byte character waits for the next token, unless `final`."""

    CONTEXT = 5  # prompt tokens decoded with the first new ones

    def __init__(self, decode: Decode, prompt: list[int]):
        self.decode = decode
        self.ids = list(prompt[-self.CONTEXT:])
        self.start = len(self.ids)  # where the continuation begins in self.ids
        self.prefix = 0  # self.ids[prefix:read] is the window already turned into text
        self.read = self.start

    def feed(self, tokens: list[int], final: bool = False) -> str:
        """`tokens`: the whole continuation so far (it only grows); returns its text not returned before."""
        self.ids.extend(tokens[len(self.ids) - self.start:])
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
