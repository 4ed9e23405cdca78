"""MMLU questions with worked answers, from the chain-of-thought few-shot prompts shipped in the lm-eval wheel.

``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`` maps each of the 57 subjects to one prompt string:
a header line, then blocks ``Q: <question>\\n(A) .. (B) ..\\nA: Let's think step by step. ... The answer is
(X).`` separated by blank lines. That is 282 blocks; one question appears under two subjects, so 281
distinct questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fedfleet.errors import DataError
from fedfleet.hf.data._files import package_file

COT_PROMPTS = ("tasks", "mmlu", "flan_cot_fewshot", "_cot_prompts.json")
_LETTER = re.compile(r"The answer is \(([A-J])\)")


@dataclass(frozen=True)
class QaPair:
    """One question and its answer. ``prompt`` and ``answer`` are the texts a model reads and learns to write."""

    prompt: str  # ends with "A:", the cue the answer follows
    answer: str  # starts with a space, so it tokenizes as it would after the cue
    subject: str = ""
    letter: str = ""  # the correct choice, "A".."J"; empty where the data is not multiple choice


def mmlu_questions(reasoning: bool = True) -> list[QaPair]:
    """The 281 distinct MMLU questions, in file order. Answers keep the step-by-step reasoning unless
    ``reasoning=False``, which leaves only ``" The answer is (X)."``."""
    path = package_file("lm_eval", *COT_PROMPTS, wheel="lm-eval")
    with open(path, encoding="utf-8") as f:
        prompts: dict[str, str] = json.load(f)
    pairs: list[QaPair] = []
    seen: set[str] = set()
    for subject, text in prompts.items():
        for block in text.split("\n\nQ: ")[1:]:  # [0] is the "The following are ..." header
            question, cue, answer = block.partition("\nA: ")
            found = _LETTER.search(answer)
            if not cue or not found:
                raise DataError(f"{path}: a {subject} question has no 'A: ... The answer is (X).': {block[:80]!r}")
            if question in seen:
                continue
            seen.add(question)
            letter = found.group(1)
            said = answer.strip() if reasoning else f"The answer is ({letter})."
            pairs.append(QaPair(f"Q: {question.strip()}\nA:", " " + said, subject, letter))
    return pairs
