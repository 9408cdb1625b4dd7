"""Thinking: where ``<think> ... </think>`` starts and ends in token ids, the thinking budget,
and the split of an output into its reasoning and its answer.

NLD instruct models think between ``<think>`` and ``</think>`` (the chat template may put
``<think>`` in the prompt, or ``<think></think>`` when thinking is off). Tags are recognised by
their token ids (``ThinkTags``: the tokenizer's encoding of each tag, one or more ids), so a
tag split over several tokens, steps or stream deltas is found the same way everywhere.

``Thinking`` follows one request's committed tokens. With a budget ``max_thinking_tokens`` =
B, once B tokens have been generated inside ``<think>`` the next tokens are forced to the
ids of ``</think>`` (spec 3.5's injection, for every mode): ``forced`` says which ids the
next positions must take, given the tokens drafted or denoised ahead of the committed text,
and the batched selection (``batch.select_rows``) makes them the only candidates, so ar,
linear_spec and quadratic_spec stay equal at temperature 0. ``split`` divides generated ids
into reasoning and answer (tags dropped); with ``final=False`` it holds back a trailing
partial tag, so the parts of a prefix are prefixes of the parts of the whole (streams equal
one-shot responses). Knows nothing about tensors, and about text only in ``ThinkTags.of``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

UNKNOWN = -1  # a slot whose token is not chosen yet (a mask ahead of the committed text)

OPEN_TEXT, CLOSE_TEXT = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkTags:
    """Token ids of ``<think>`` (``open``) and ``</think>`` (``close``), each non-empty."""

    open: tuple[int, ...]
    close: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(len(self.open), len(self.close))

    @classmethod
    def of(cls, tokenizer) -> ThinkTags | None:
        """The tags of a trimode ``Tokenizer``, or None when its vocabulary cannot spell
        them exactly (an unknown-token id, the mask id, or a decode that differs)."""
        ids = []
        for text in (OPEN_TEXT, CLOSE_TEXT):
            got = tokenizer.hf(text, add_special_tokens=False).input_ids
            bad = {tokenizer.hf.unk_token_id, tokenizer.mask_token_id} - {None}
            if not got or bad & set(got) or \
                    tokenizer.hf.decode(got, skip_special_tokens=False) != text:
                return None
            ids.append(tuple(got))
        return cls(*ids)


@dataclass(frozen=True)
class _State:
    inside: bool = False  # after an open tag, before its close
    spent: int = 0  # generated tokens inside the tags so far (all spans)
    forcing: int = -1  # index into close of the next forced id; -1: free
    tail: tuple[int, ...] = ()  # the last ``tags.width`` tokens (tag matching)


def _ends(tail: tuple[int, ...], tag: tuple[int, ...]) -> bool:
    return len(tail) >= len(tag) and tail[len(tail) - len(tag):] == tag


class Thinking:
    """One request's thinking state over its prompt and committed tokens.

    ``budget``: max_thinking_tokens (None: never force), over all the request's thinking
    spans. A prompt without an open tag starts outside (the model may still open one).
    """

    def __init__(self, tags: ThinkTags, budget: int | None, prompt_ids: list[int]):
        self.tags, self.budget = tags, budget
        state = _State()
        for tok in prompt_ids:  # prompt tokens are never forced nor counted
            state = self._advance(state, tok, arm=False)
        self.state = self._arm(replace(state, spent=0))

    def _arm(self, s: _State) -> _State:
        """Start forcing ``close`` once the budget is spent, continuing a partial close."""
        if self.budget is None or not s.inside or s.forcing >= 0 or s.spent < self.budget:
            return s
        close = self.tags.close
        done = max(j for j in range(len(close)) if j == 0 or _ends(s.tail, close[:j]))
        return replace(s, forcing=done)

    def _advance(self, s: _State, tok: int, arm: bool = True) -> _State:
        tail = (s.tail + (tok,))[-self.tags.width:]
        close = self.tags.close
        closed = replace(s, inside=False, forcing=-1, tail=tail)
        if s.inside and s.forcing >= 0 and tok == close[s.forcing]:
            if s.forcing + 1 == len(close):
                return closed
            return replace(s, forcing=s.forcing + 1, tail=tail)
        if not s.inside:
            if _ends(tail, self.tags.open):  # the budget counts every span of the request
                opened = replace(closed, inside=True)
                return self._arm(opened) if arm else opened
            return closed
        if _ends(tail, close):
            return closed
        nxt = replace(s, spent=s.spent + 1, forcing=-1, tail=tail)
        return self._arm(nxt) if arm else nxt

    def _forced_id(self, s: _State) -> int:
        return self.tags.close[s.forcing] if s.inside and s.forcing >= 0 else UNKNOWN

    def commit(self, tok: int) -> None:
        """A token became output."""
        self.state = self._advance(self.state, tok)

    def forced(self, ahead: list[int], n: int, mask_token_id: int | None) -> list[int]:
        """The id each of the next ``n`` positions must take (UNKNOWN: free). Position i
        follows the committed text plus ``ahead[:i]`` (drafts, or a block with masks: a
        masked slot is assumed to take its forced id if it has one, else a thinking token)."""
        s, out = self.state, []
        if s.forcing < 0 and (self.budget is None or s.spent + n - 1 < self.budget):
            return [UNKNOWN] * n  # spent grows by at most one a position: nothing due yet
        for i in range(n):
            f = self._forced_id(s)
            out.append(f)
            if i < len(ahead):
                tok = ahead[i]
                s = self._advance(s, f if tok == mask_token_id else tok)
        return out

    def enforce(self, tokens: list[int]) -> list[int]:
        """``tokens`` (the next positions, all chosen) with every forced position set to its
        forced id: diffusion's guarantee that no block commits thinking past the budget."""
        s, out = self.state, []
        for tok in tokens:
            f = self._forced_id(s)
            tok = tok if f == UNKNOWN else f
            out.append(tok)
            s = self._advance(s, tok)
        return out


class Splitter:
    """Routes generated ids, one at a time, to the reasoning or the answer (tags dropped),
    as vLLM's think-tag reasoning parsers do with text: inside the tags is reasoning, the
    rest is the answer, and the prompt decides where generation starts. Ids that could still
    be the start of a tag are held back until they are known not to be (``push``), or the
    output ends (``flush``: they are text of the part they are in)."""

    def __init__(self, tags: ThinkTags, prompt_ids: list[int]):
        self.tags = tags
        self._think = Thinking(tags, None, prompt_ids)
        self.found = self._think.state.inside  # any reasoning (an open tag) seen
        self._held: list[int] = []

    @property
    def inside(self) -> bool:
        return self._think.state.inside

    def push(self, tok: int) -> list[tuple[bool, int]]:
        """(is reasoning, id) of the ids this one releases, in order."""
        was = self.inside
        self._think.commit(tok)
        self._held.append(tok)
        held = self._held
        if was != self.inside:  # a tag completed: its ids are not text
            self.found = True
            tag = self.tags.close if was else self.tags.open
            self._held = []
            return [(was, t) for t in held[: len(held) - len(tag)]]
        tag = self.tags.close if self.inside else self.tags.open
        keep = max((j for j in range(1, min(len(tag), len(held) + 1))
                    if held[len(held) - j:] == list(tag[:j])), default=0)
        self._held = held[len(held) - keep:]
        return [(was, t) for t in held[: len(held) - keep]]

    def flush(self) -> list[tuple[bool, int]]:
        """The held ids, as text of the current part (the output ended)."""
        out = [(self.inside, t) for t in self._held]
        self._held = []
        return out


def split(tags: ThinkTags, prompt_ids: list[int], ids: list[int],
          final: bool = True) -> tuple[list[int], list[int], bool]:
    """(reasoning ids, answer ids, whether any reasoning was found) of generated ``ids``
    (``Splitter``); ``final=False`` keeps a trailing partial tag back."""
    splitter, parts = Splitter(tags, prompt_ids), ([], [])
    released = [x for tok in ids for x in splitter.push(tok)]
    for reasoning, tok in released + (splitter.flush() if final else []):
        parts[0 if reasoning else 1].append(tok)
    return parts[0], parts[1], splitter.found
