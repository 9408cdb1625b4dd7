"""A tiny NLD checkpoint whose tokenizer has ``<think>`` / ``</think>`` as added tokens and an
NLD-style chat template (thinking on: the generation prompt ends in ``<think>``; off, with
``chat_template_kwargs={"enable_thinking": False}``: ``<think></think>``), for the reasoning
tests. Shipped here: no hub access."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_oracle, write_checkpoint

THINK, END_THINK = 94, 95  # the tags' ids in the tiny vocabulary (96)
NLD_TEMPLATE = ("{{ '<s>' }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                "{% endfor %}{% if add_generation_prompt %}assistant : "
                "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
                "{% else %}<think>{% endif %}{% endif %}")


def write_think_checkpoint(directory: Path, seed: int = 0) -> Path:
    """The seed-``seed`` tiny checkpoint with the thinking tokenizer and template."""
    from tokenizers import Tokenizer

    write_checkpoint(directory, make_oracle(seed=seed))
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert vocab["w94"] == THINK and vocab["w95"] == END_THINK
    data = json.loads(tok.to_str())
    model_vocab = data["model"]["vocab"]
    del model_vocab["w94"], model_vocab["w95"]
    model_vocab["<think>"], model_vocab["</think>"] = THINK, END_THINK
    data["added_tokens"] += [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False} for i, c in ((THINK, "<think>"),
                                                             (END_THINK, "</think>"))]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = NLD_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
