"""The ``--visual`` live terminal view of a block being denoised or drafted (rich).

Like llama.cpp's ``--diffusion-visual``: committed text, then the current block with masks
as placeholders, tokens appearing as they are unmasked, drafted or accepted. Driven by the
``on_step`` hook of ``LLM.generate`` / ``LLM.chat``; knows nothing else about decoding.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

MASK_GLYPH = "░"


class LiveView:
    """``on_step`` callback drawing committed text, then the current block: masks as
    ``░``, unmasked or drafted tokens in cyan (special tokens by name, dim), tokens committed
    by the last forward in green."""

    def __init__(self, llm, console: Console):
        self.decode = llm.tokenizer.decode
        self.hf = llm.tokenizer.hf
        self.console = console
        self.live = Live(console=console, transient=True, auto_refresh=False)
        self.seen = 0

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()

    def __call__(self, index: int, seq) -> None:
        self.live.update(self.render(seq), refresh=True)

    def render(self, seq) -> Group:
        strategy, generated = seq.strategy, seq.generated
        fresh = max(0, min(self.seen, len(generated)))
        self.seen = len(generated)
        block = self.pending(seq)
        phase = "done" if seq.finished or strategy is None else strategy.phase
        header = Text(f"{seq.params.mode} · {phase} · nfe {seq.metrics.nfe} · "
                      f"{len(generated)} tokens committed", style="dim")
        old, new = self.decode(generated[:fresh]), self.decode(generated)
        body = Text(self.tail(old if new.startswith(old) else new), style="default")
        if new.startswith(old):
            body.append(new[len(old):], style="bold green")
        prev = generated[-1] if generated else None
        for tok in block:
            if tok == seq.mask_token_id:
                body.append(MASK_GLYPH, style="dim")
                continue
            piece = self.piece(prev, tok)  # "" for special tokens: show their name
            body.append(piece or self.name(tok), style="cyan" if piece else "dim cyan")
            prev = tok
        return Group(header, body)

    @staticmethod
    def pending(seq) -> list[int]:
        """Block tokens not yet committed, as the request's strategy names them."""
        if seq.finished or seq.strategy is None:
            return []
        return seq.strategy.pending(seq)

    def piece(self, prev: int | None, tok: int) -> str:
        """Text of ``tok`` after ``prev`` (keeps the leading space SentencePiece drops alone)."""
        if prev is None:
            return self.decode([tok])
        left, both = self.decode([prev]), self.decode([prev, tok])
        return both[len(left):] if both.startswith(left) else self.decode([tok])

    def name(self, tok: int) -> str:
        return str(self.hf.convert_ids_to_tokens(tok) or f"<{tok}>")

    def tail(self, text: str) -> str:
        width, height = self.console.size
        room = max(width * max(height - 4, 1), 80)
        return text if len(text) <= room else "…" + text[-room:]
