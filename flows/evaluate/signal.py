"""A finer consistency signal than accuracy: how often the two stacks write the same reply, and how far into a reply
they part, each next to the same numbers for two runs of the native stack (the noise floor: batching alone can
change a GPU's reductions).

A mild integration bug can leave accuracy unchanged at 1,000 items while the share of identical replies falls
(measured on the H200: epsilon x 100 in RMSNorm). Positions are in words and punctuation marks, since the OpenAI
API returns text, not token ids; the token-level signal (flows/evaluate/logprobs.py) compares log-probabilities.
"""

from __future__ import annotations

import re
import statistics

from pydantic import BaseModel, ConfigDict

from flows.evaluate.gate import Verdict, mcnemar_exact

WORD = re.compile(r"\w+|[^\w\s]")


class Agreement(BaseModel):
    """Two runs' replies to the same requests."""

    model_config = ConfigDict(frozen=True)

    identical: float  # share of (item, repeat) replies with the same text
    first_divergence: float | None  # median word position where differing replies part (None: none differ)


class Signal(BaseModel):
    model_config = ConfigDict(frozen=True)

    flagos: Agreement  # FlagOS against native
    baseline: Agreement | None  # native against native (None: no second native run here)
    p_value: float | None = None  # exact McNemar: identical to native on one comparison but not the other, per reply
    max_identical_drop_pp: float | None = None  # the suite's gate on it; None: reported, not gated
    verdict: Verdict | None = None

    @property
    def identical_drop(self) -> float | None:
        return None if self.baseline is None else self.baseline.identical - self.flagos.identical


def first_divergence(a: str, b: str) -> int:
    left, right = WORD.findall(a), WORD.findall(b)
    for position, (x, y) in enumerate(zip(left, right)):
        if x != y:
            return position
    return min(len(left), len(right))


def _replies(results: list) -> dict[tuple[str, int], str]:
    """Each reply of a run (flows.evaluate.client.ItemResult), by item and repeat."""
    return {(r.id, r.repeat): r.response for r in results}


def agreement(first: list, second: list) -> Agreement:
    """Replies of two runs, paired by item and repeat."""
    other = _replies(second)
    pairs = [(text, other[key]) for key, text in _replies(first).items() if key in other]
    differing = [first_divergence(a, b) for a, b in pairs if a != b]
    return Agreement(identical=(len(pairs) - len(differing)) / len(pairs) if pairs else 0.0,
                     first_divergence=statistics.median(differing) if differing else None)


def _paired_p(native: list, flagos: list, native_again: list) -> float:
    """Whether FlagOS departs from native more often than native departs from itself, reply by reply."""
    flagos_replies, again_replies = _replies(flagos), _replies(native_again)
    only_baseline = only_flagos = 0
    for key, text in _replies(native).items():
        flagos_same, again_same = flagos_replies.get(key) == text, again_replies.get(key) == text
        only_baseline += again_same and not flagos_same
        only_flagos += flagos_same and not again_same
    return mcnemar_exact(only_baseline, only_flagos)


def consistency_signal(native: list, flagos: list, native_again: list | None,
                       max_identical_drop_pp: float | None) -> Signal:
    """FlagOS-vs-native agreement beside native-vs-native; FAIL when gated and the identical share falls more than
    the suite allows below the baseline (INCONCLUSIVE when gated without a baseline)."""
    signal = Signal(flagos=agreement(native, flagos),
                    baseline=agreement(native, native_again) if native_again is not None else None,
                    p_value=_paired_p(native, flagos, native_again) if native_again is not None else None,
                    max_identical_drop_pp=max_identical_drop_pp)
    if max_identical_drop_pp is None:
        return signal
    if signal.identical_drop is None:
        return signal.model_copy(update={"verdict": Verdict.INCONCLUSIVE})
    failed = signal.identical_drop * 100 > max_identical_drop_pp
    return signal.model_copy(update={"verdict": Verdict.FAIL if failed else Verdict.PASS})
