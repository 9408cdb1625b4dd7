"""The ``trimode_events`` stream extension: a ``decoding.events.ForwardEvent`` as JSON.

Sent only to streams that ask for it (``stream_options: {"trimode_events": true}``), as
an ordinary SSE chunk with ``object: "trimode.forward"``, empty ``choices`` and the event
under ``trimode_event`` (README "Live events" gives the shape). Token texts are the pieces
the tokenizer gives after the previous token (so SentencePiece's leading spaces survive);
a special token's piece is its name. Knows nothing about decoding beyond the event.
"""

from __future__ import annotations


def event_json(index: int, ev, tokenizer) -> dict:
    """``trimode_event`` for choice ``index``: the forward, its block's slots, what it
    drafted / accepted / rejected / committed, and the running metrics."""
    pieces = Pieces(tokenizer)
    slots, prev = [], None
    for s in ev.slots:
        slot = {"position": s.position, "state": s.state, "token": s.token,
                "text": None if s.token is None else pieces(prev, s.token), "forward": s.forward}
        if s.rejected is not None:
            slot["rejected"] = {"token": s.rejected, "text": pieces(prev, s.rejected)}
        prev = s.token
        slots.append(slot)
    return {"index": index, "forward": ev.forward, "kind": ev.kind, "mode": ev.mode,
            "block": {"start": ev.block_start, "slots": slots},
            "drafted": list(ev.drafted), "accepted": list(ev.accepted),
            "rejected": list(ev.rejected), "committed": list(ev.committed),
            "nfe": ev.nfe, "generated_tokens": ev.generated_tokens,
            "tokens_per_forward": round(ev.tokens_per_forward, 4),
            "acceptance_length": None if ev.acceptance_length is None
            else round(ev.acceptance_length, 4)}


class Pieces:
    """``(prev, token) -> text`` of ``token`` following ``prev`` (None: alone)."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode
        self.hf = getattr(tokenizer, "hf", None)

    def __call__(self, prev: int | None, token: int) -> str:
        text = self.decode([token])
        if prev is not None and text:
            left, both = self.decode([prev]), self.decode([prev, token])
            if left and both.startswith(left):
                text = both[len(left):]
        if not text and self.hf is not None:  # a special token: show its name
            text = str(self.hf.convert_ids_to_tokens(token) or "")
        return text or f"<{token}>"
