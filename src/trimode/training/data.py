"""Training data: text files, jsonl (``{"text"}`` or ``{"messages"}``) and chat datasets.

An example is token ids plus a loss mask: all tokens for text; for chat, the conversation is
rendered with the checkpoint's chat template and only assistant turns carry loss (NLD's SFT,
docs/spec.md 2.3). Examples become fixed-length rows ``[N, L]`` either packed (concatenated and cut)
or one per row (truncated, right-padded). Errors name the file and line. Knows nothing
about models beyond the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    ids: list[int]
    loss: list[bool]  # token j is a training target

    @property
    def prompt(self) -> list[int]:
        """Tokens before the first target (a chat prompt), at least one token."""
        first = next((i for i, x in enumerate(self.loss) if x), len(self.ids))
        return self.ids[: max(first, 1)]


@dataclass(frozen=True)
class Rows:
    """``tokens``, ``valid`` (not padding) and ``loss`` (target), each ``[N, L]``."""

    tokens: torch.Tensor
    valid: torch.Tensor
    loss: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def load_examples(paths: list[str | Path], tokenizer: Tokenizer) -> list[Example]:
    """Read every file; raises ValueError for missing files, bad lines, chats without an
    assistant turn, or no training tokens at all."""
    if not paths:
        raise ValueError("data: at least one file is required")
    out: list[Example] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"data: {path} does not exist or is not a file")
        if path.suffix == ".jsonl":
            out += _jsonl(path, tokenizer)
        else:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                ids = tokenizer.encode(text)
                out.append(Example(ids, [True] * len(ids)))
    if sum(sum(e.loss) for e in out) == 0:
        raise ValueError(f"data: {', '.join(map(str, paths))} holds no training tokens "
                         "(empty dataset)")
    return out


def _jsonl(path: Path, tokenizer: Tokenizer) -> list[Example]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {path}:{n}: not valid JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            out.append(chat_example(record["messages"], tokenizer, f"{path}:{n}"))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            ids = tokenizer.encode(record["text"])
            out.append(Example(ids, [True] * len(ids)))
        else:
            raise ValueError(f"data: {path}:{n}: expected an object with 'text' (string) or "
                             "'messages' (list of {role, content})")
    return out


def chat_example(messages: list[dict], tokenizer: Tokenizer, where: str = "chat") -> Example:
    """Render ``messages`` with the chat template; loss on assistant turns only.

    Each assistant turn's tokens are the difference between the conversation rendered up to
    and including it and the conversation before it with the generation prompt added.
    """
    if not tokenizer.has_chat_template:
        raise ValueError(f"data: {where}: the checkpoint has no chat template for chat data")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError(f"data: {where}: conversation has no assistant turn (loss is on "
                         "assistant turns only)")
    ids: list[int] = []
    loss: list[bool] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if upto[: len(before)] != before:
            raise ValueError(f"data: {where}: the chat template does not render turns as a "
                             "prefix of the conversation; cannot locate assistant tokens")
        loss += [False] * (len(before) - len(ids)) + [True] * (len(upto) - len(before))
        ids = upto
    return Example(ids, loss)


def _render(tokenizer: Tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.hf.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def make_rows(examples: list[Example], seq_length: int, pack: bool, pad_id: int) -> Rows:
    """Examples -> rows ``[N, seq_length]``; rows without targets are dropped.

    pack: concatenate all examples and cut into ``seq_length`` windows (a last partial
    window is padded). Otherwise one example per row, truncated and right-padded.
    """
    if pack:
        ids = [x for e in examples for x in e.ids]
        loss = [x for e in examples for x in e.loss]
        chunks = [(ids[k : k + seq_length], loss[k : k + seq_length])
                  for k in range(0, len(ids), seq_length)]
    else:
        chunks = [(e.ids[:seq_length], e.loss[:seq_length]) for e in examples]
    chunks = [(i, m) for i, m in chunks if any(m[1:])]
    if not chunks:
        raise ValueError("data: no row has a training target after cutting to seq_length "
                         f"{seq_length} (empty dataset)")
    n = len(chunks)
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    valid = torch.zeros(n, seq_length, dtype=torch.bool)
    target = torch.zeros(n, seq_length, dtype=torch.bool)
    for r, (i, m) in enumerate(chunks):
        tokens[r, : len(i)] = torch.tensor(i)
        valid[r, : len(i)] = True
        target[r, : len(m)] = torch.tensor(m)
    return Rows(tokens, valid, target)
