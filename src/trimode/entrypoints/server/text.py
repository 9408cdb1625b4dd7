"""Committed token ids in, text safe to send out: incremental detokenization and stop strings.

``TextStream`` turns a request's committed tokens (one at a time, in order) into text that is
final: a multi-byte character split over several tokens is held until it is complete, and a
suffix that could still become a stop string is held until it cannot (so a stop string never
leaks, even partly, across token or step boundaries). On a match the text is cut before the
stop string and no later token counts. The concatenation of everything ``take`` returns equals
``tokenizer.decode(token_ids)`` cut at the first stop string. ``ReasoningStream`` does the
same for a reply that thinks: ids inside ``<think> ... </think>`` become reasoning text, the
rest the answer (stop strings apply to the answer). Knows nothing about HTTP or the engine.

The incremental decode follows vLLM's ``detokenize_incrementally`` (prefix / read offsets):
the text of new tokens is decoded together with the tokens before them, so tokenizers whose
pieces depend on their left neighbour (leading spaces, byte fallback) give the same text as
one decode of the whole sequence.
"""

from __future__ import annotations

from ...decoding.thinking import Splitter

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas; ``decode(ids) -> str``."""

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens whose text has been returned

    def push(self, token_id: int) -> str:
        """Append one token; return the text that became final (may be "")."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held (an incomplete character at the very end decodes as U+FFFD,
        exactly as a decode of the whole sequence does)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]


class TextStream:
    """One choice's output text.

    decode: ``list[int] -> str`` (the tokenizer's decode, special tokens skipped).
    stop: stop strings (non-empty); the output ends before the first one found.
    """

    def __init__(self, decode, stop: list[str] | tuple[str, ...] = ()):
        self._detok = IncrementalDetokenizer(decode)
        self.stop = tuple(stop)
        self.text = ""  # final text so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already handed out by ``take``
        self.n_tokens = 0  # tokens consumed (those after a stop string are not)
        self.stopped = False  # a stop string matched
        self.closed = False  # no more tokens will come

    def add(self, token_id: int) -> bool:
        """Consume one committed token; True when a stop string has now matched (stop
        adding: later tokens are not part of the output)."""
        if self.stopped or self.closed:
            raise RuntimeError("TextStream.add after the stream ended")
        self.n_tokens += 1
        self.text += self._detok.push(token_id)
        return self._match()

    def close(self) -> None:
        """The request ended without a stop string: release the held text."""
        if not self.stopped and not self.closed:
            self.text += self._detok.flush()
            self._match()
        self.closed = True

    def take(self) -> str:
        """Text that is final and not yet handed out."""
        end = len(self.text)
        if not (self.stopped or self.closed):
            end -= self._held(self.text[self.sent :])
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _match(self) -> bool:
        # A stop string cannot start before ``sent``: take() holds back every suffix that
        # is a prefix of a stop string.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _held(self, tail: str) -> int:
        """Length of the longest suffix of ``tail`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


class ReasoningStream:
    """A ``TextStream`` for a reply that thinks: its ids are routed by a ``Splitter`` (tags
    dropped, a tag split over several ids or steps held back until known) to a reasoning
    stream (no stop strings) and an answer stream (``stop``). ``take`` gives the answer's new
    text, ``take_reasoning`` the reasoning's; the concatenations equal one split of the whole
    output, however the ids arrive."""

    def __init__(self, decode, stop, tags, prompt_ids: list[int]):
        self._split = Splitter(tags, prompt_ids)
        self._reasoning = TextStream(decode)
        self._answer = TextStream(decode, stop)
        self.n_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._answer.stopped

    def add(self, token_id: int) -> bool:
        if self.stopped:
            raise RuntimeError("ReasoningStream.add after the stream ended")
        self.n_tokens += 1
        return self._route(self._split.push(token_id))

    def _route(self, released) -> bool:
        for reasoning, tok in released:
            if reasoning:
                self._reasoning.add(tok)
            elif self._answer.add(tok):
                return True
        return False

    def close(self) -> None:
        if not self.stopped:
            self._route(self._split.flush())
        self._reasoning.close()
        self._answer.close()

    def take(self) -> str:
        return self._answer.take()

    def take_reasoning(self) -> str:
        if self.stopped:
            self._reasoning.close()
        return self._reasoning.take()
