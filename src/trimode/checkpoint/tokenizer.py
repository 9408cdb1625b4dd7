"""The checkpoint's own tokenizer and chat template, through transformers.

Reads ``tokenizer.json`` with ``chat_template.jinja`` or the template in
``tokenizer_config.json`` (or the tokenizer embedded in a GGUF file). Guarantees:
chat prompts carry exactly one BOS; text can never produce the mask token id (a literal
mask string in user text is tokenized as plain characters); raw token-id prompts that
contain the mask id are rejected with ValueError; text that is not valid Unicode (a lone
surrogate: a JSON escape such as ``\\ud800``, or undecodable bytes on the command line) is
rejected with ValueError naming the field before it reaches the tokenizer (``check_text``).
Knows nothing about the model.
"""

from __future__ import annotations

from pathlib import Path

from ..model.config import CheckpointError


class Tokenizer:
    def __init__(self, hf_tokenizer, mask_token_id: int | None, bos_token_id: int | None):
        self.hf = hf_tokenizer
        self.mask_token_id = mask_token_id
        self.bos_token_id = bos_token_id if bos_token_id is not None else hf_tokenizer.bos_token_id
        self.add_bos = bool(getattr(hf_tokenizer, "add_bos_token", False))
        self._mask_text = (hf_tokenizer.convert_ids_to_tokens(mask_token_id)
                           if mask_token_id is not None else None)

    @classmethod
    def load(cls, directory: Path, gguf_file: Path | None, mask_token_id: int | None,
             bos_token_id: int | None) -> "Tokenizer":
        """Raises CheckpointError naming the directory when no tokenizer can be read."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not its own
        try:
            if gguf_file is not None:
                hf = _gguf_tokenizer(directory, gguf_file)
            else:
                hf = AutoTokenizer.from_pretrained(str(directory))
        except Exception as exc:
            raise CheckpointError(f"{directory}: cannot load the tokenizer ({exc})") from None
        return cls(hf, mask_token_id, bos_token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_bos: bool | None = None, field: str = "prompt") -> list[int]:
        """Token ids of ``text``; special-token strings are parsed, except the mask's.
        Raises ValueError naming ``field`` for text that is not valid Unicode."""
        ids = self.hf(check_text(text, field), add_special_tokens=False).input_ids
        if self.mask_token_id is not None and self.mask_token_id in ids:
            literal = self.hf(self._mask_text, add_special_tokens=False,
                              split_special_tokens=True).input_ids
            ids = [x for tok in ids for x in (literal if tok == self.mask_token_id else [tok])]
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def apply_chat_template(self, messages: list[dict],
                            template_kwargs: dict | None = None) -> list[int]:
        """Render with the checkpoint's template (generation prompt added) and tokenize,
        with exactly one leading BOS when the template or tokenizer uses one.
        ``template_kwargs``: extra variables for the template (``chat_template_kwargs``,
        e.g. ``{"enable_thinking": False}``); ValueError naming that field when they are not
        a dict of names or the template fails with them."""
        if not self.has_chat_template:
            raise ValueError("this checkpoint has no chat template; pass a raw prompt instead")
        _check_messages(messages)
        extra = check_template_kwargs(template_kwargs)
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True, **extra)
        except Exception as exc:  # jinja errors, raise_exception in the template
            if not extra:
                raise
            raise ValueError(f"chat_template_kwargs: the chat template failed with them "
                             f"({type(exc).__name__}: {exc})") from None
        ids = self.encode(text, field="messages (after the chat template)")
        bos = self.bos_token_id
        while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def check_ids(self, ids: list[int], vocab_size: int, field: str = "prompt") -> list[int]:
        """Validate a raw token-id prompt; raises ValueError naming ``field``."""
        if not ids:
            raise ValueError(f"{field} must not be empty")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                raise ValueError(f"{field} token ids must be integers in [0, {vocab_size}); got {i!r}")
        if self.mask_token_id is not None and self.mask_token_id in ids:
            raise ValueError(f"{field} contains the mask token id {self.mask_token_id}, which is "
                             "reserved for diffusion and never valid input")
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens skipped). Bytes that do not form valid UTF-8 (a
        character cut at the end, or a model's own token sequence that is not UTF-8, as in
        diffusion) decode to U+FFFD; ``token_bytes`` gives the raw bytes."""
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: for byte-level BPE (GPT-2 / SmolLM2) and byte-fallback
        (``<0xNN>``) tokens its exact bytes, even when they are part of a multi-byte
        character; otherwise the UTF-8 of its decoded text."""
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str):
            if self._byte_level:
                try:
                    return bytes(_BYTE_OF[ch] for ch in piece)
                except KeyError:
                    pass  # an added token written as text
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
        return self.decode([int(token_id)]).encode("utf-8", "surrogatepass")

    @property
    def _byte_level(self) -> bool:
        backend = getattr(self.hf, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        return type(decoder).__name__ == "ByteLevel"


def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are
    shifted to U+0100 and up (``bytes_to_unicode`` in GPT-2's encoder)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


_BYTE_OF = _byte_table()


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content'; got {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"messages[{i}].role must be a non-empty string; got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string; got "
                             f"{type(m['content']).__name__}")
        check_text(m["content"], f"messages[{i}].content")
        check_text(m["role"], f"messages[{i}].role")


RESERVED_TEMPLATE_KWARGS = ("messages", "conversation", "tokenize", "add_generation_prompt",
                            "chat_template", "return_dict", "tools", "documents")


def check_template_kwargs(kwargs) -> dict:
    """``chat_template_kwargs`` as a dict of template variables (None: {}); ValueError
    naming the field for anything else, or a name the renderer itself sets."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier()
                                               for k in kwargs):
        raise ValueError(f"chat_template_kwargs must be an object of template variables "
                         f"(e.g. {{\"enable_thinking\": false}}); got {kwargs!r:.80}")
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(reserved)} (trimode "
                         "sets it)")
    return dict(kwargs)


def check_text(text: str, field: str) -> str:
    """``text`` if it is a string of valid Unicode (encodable as UTF-8), else ValueError
    naming ``field``, the first bad character's index and code point. Python strings can
    hold lone surrogates (U+D800..U+DFFF): JSON's ``"\\ud800"`` decodes to one and
    undecodable argv bytes become them; the tokenizer cannot take them."""
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a string; got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid Unicode: lone surrogate "
                         f"U+{ord(text[exc.start]):04X} at character {exc.start} (send UTF-8 "
                         "text; a surrogate escape must be half of a pair)") from None
    return text


def _gguf_tokenizer(directory: Path, gguf_file: Path):
    """transformers reads GGUF tokenizers only for architectures it knows; for the others
    (``dream``, written by ``trimode convert``) the tokenizer class reads the same metadata."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file.name)
    except ValueError as exc:
        if "architecture" not in str(exc):
            raise
        return PreTrainedTokenizerFast.from_pretrained(str(directory), gguf_file=gguf_file.name)
