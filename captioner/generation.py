"""Every decoding setting in one frozen dataclass: its default, its range, its help text, its validation.

The library (`decode.stream`, `caption`, `caption_batch`), the CLI, the evaluation command and the app all
take a `GenerationConfig`; the CLI's flags are generated from its fields, and the app's controls are keyed by
field name, so a new setting is one field here plus the control that shows it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from .settings import add_flags, given, kind
from .settings import setting as _setting

STRATEGIES = ("greedy", "beam", "sample", "guided")


class Limit(NamedTuple):
    """The range of one numeric setting. `high` binds everyone (library, CLI, evaluation); `served` is the app's
    tighter bound (every UI and API request: Handlers.settings -> GenerationConfig.check_served), what one request of
    anyone may cost a shared server. `open_low`: the low end itself is excluded (temperature 0 is not a temperature)."""

    low: float
    high: float
    served: float
    open_low: bool = False

    def describe(self, integer: bool, served: bool = False) -> str:
        low, high = _number(self.low), _number(self.served if served else self.high)
        if integer:
            return f"a whole number from {low} to {high}"
        if math.isinf(self.high):
            return f"a number of {low} or more"
        return f"a number {'above' if self.open_low else 'from'} {low} {'and up ' if self.open_low else ''}to {high}"


def _number(x: float) -> str:
    return f"{int(x):,}" if math.isfinite(x) and x == int(x) else f"{x:g}"


# Every numeric setting's range, in one place: GenerationConfig checks `high` on every construction (the Python API
# and the CLI: a long caption or a wide beam is the caller's own machine), the served app checks `served` too (the
# sliders' ranges are the same numbers). Only finite numbers pass, except guide_margin's "inf" (never drop the
# required word, what train/guided.py's report compares). None (max_len, seed, guide_threshold) means "the default".
LIMITS: dict[str, Limit] = {
    "max_len": Limit(1, 200, 60),
    "beam_size": Limit(1, 100, 10),
    "length_penalty": Limit(0, 10, 10),
    "guide_threshold": Limit(0, 1, 1, open_low=True),
    "temperature": Limit(0, 100, 5, open_low=True),
    "top_k": Limit(0, 100_000, 100),
    "top_p": Limit(0, 1, 1, open_low=True),
    "seed": Limit(0, 2**63 - 1, 2**63 - 1),
    "no_repeat_ngram": Limit(0, 200, 60),
    "guide_margin": Limit(0, math.inf, math.inf),
    "num_alternatives": Limit(0, 1000, 20),
}


@dataclass(frozen=True)
class GenerationConfig:
    strategy: str = _setting("greedy", "greedy: the likeliest word each step (the bundled model's best) · "
                                       "beam: keep several candidate captions · sample: random, varied · "
                                       "guided: beam search that must name what the CNN's ImageNet labels are sure of")
    max_len: int | None = _setting(None, "most words in a caption (default: the model's own, 20 for the bundled model)")
    beam_size: int = _setting(3, "beam search and guided: candidate captions kept at every step (guided: for each "
                                 "of with and without the required word)")
    length_penalty: float = _setting(1.0, "beam search and guided: a caption's log-probability is divided by its length "
                                          "to this power (0 = none; higher favours longer captions)")
    guide_threshold: float | None = _setting(None, "guided: how sure the CNN's ImageNet labels for a caption word must be "
                                                   "(their summed probability) before the caption must use it. None: each "
                                                   "word's own threshold, calibrated on the training photos "
                                                   "(captioner/data/imagenet_thresholds.json, docs/guided.md); a number: "
                                                   "that one threshold for every mapped word")
    temperature: float = _setting(1.0, "sampling: below 1 sharpens the distribution, above 1 flattens it")
    top_k: int = _setting(0, "sampling: draw only from the K likeliest words (0 = all)")
    top_p: float = _setting(0.9, "sampling: draw only from the smallest set of words whose probability reaches P (nucleus)")
    seed: int | None = _setting(None, "sampling: random seed (default: a new one each time)")
    no_repeat_ngram: int = _setting(2, "never say an n-gram of this many words twice, unless it is only function words "
                                       "(a, in, of, ...; see block_function_words) (0 = off; 2 kept \"a man ... a man\" "
                                       "out of all 1,000 dev captions: docs/guided.md)")
    block_function_words: bool = _setting(False, "with no_repeat_ngram: block repeated n-grams of function words too "
                                                 "(\"in a ... in a\")")
    guide_margin: float = _setting(0.5, "guided: keep the caption with the required word only when the best caption "
                                        "without it is at most this much likelier per word (mean log-probability; "
                                        "0.5 is the least that keeps the cat of examples/cat.jpg: docs/guided.md)")
    num_alternatives: int = _setting(5, "top-k alternatives recorded at every step (the inspector's words)")
    tree: bool = _setting(False, "record the search as a tree of nodes (beam and guided: every hypothesis kept, "
                                 "pruned, finished or blocked at each step; greedy and sampling: their one path); the "
                                 "CLI's --json adds it as \"tree\" (docs/search-tree.md)")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        for name in LIMITS:
            self.check(name, getattr(self, name))

    @classmethod
    def check(cls, name: str, value, *, served: bool = False) -> None:
        """A ValueError naming `value` and the range unless it is a valid value of numeric setting `name` (LIMITS:
        the library's range, or with `served` the app's): the right type (a whole number for an int setting, never
        1.5 or True), finite (no NaN; infinity only where the range has no end), within the range."""
        limit, integer = LIMITS[name], kind(cls, name) is int
        if value is None and name in ("max_len", "seed", "guide_threshold"):
            return
        expected = limit.describe(integer, served)
        where = f" in the app (the command line and Python take up to {_number(limit.high)})" if served and limit.served < limit.high else ""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
            raise ValueError(f"{name}={value!r}: expected {expected}")
        high = limit.served if served else limit.high
        if not isinstance(value, numbers.Integral) and (math.isnan(value) or (math.isinf(value) and not math.isinf(high))):
            raise ValueError(f"{name}={value!r}: expected {expected}, not {'NaN' if math.isnan(value) else 'infinity'}")
        if not (limit.low < value if limit.open_low else limit.low <= value) or value > high:
            raise ValueError(f"{name}={value if abs(value) < 10**30 else 'a number of %d digits' % len(str(abs(value)))}: "
                             f"expected {expected}{where}")

    def check_served(self) -> "GenerationConfig":
        """The app's tighter bounds (LIMITS' `served`): raises ValueError naming the value and the range; returns self."""
        for name in LIMITS:
            self.check(name, getattr(self, name), served=True)
        return self

    @classmethod
    def limit(cls, name: str, *, served: bool = True) -> tuple[float, float]:
        """(low, high) of numeric setting `name`: the app's range (served), or the library's."""
        lim = LIMITS[name]
        return lim.low, lim.served if served else lim.high

    @classmethod
    def make(cls, config: "GenerationConfig | None" = None, **overrides) -> "GenerationConfig":
        """`config` (or the defaults) with `overrides` applied; an unknown setting is a ValueError naming it."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {unknown}; known: {', '.join(cls.names())}")
        return replace(config or cls(), **overrides)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def kind(cls, name: str) -> type:
        """The plain type of setting `name` (int, float or str)."""
        return kind(cls, name)

    def resolved_max_len(self, model_max_len: int) -> int:
        return self.max_len if self.max_len is not None else model_max_len


def add_arguments(parser, *, only: tuple[str, ...] | None = None) -> None:
    """Add one --flag per decoding setting to an argparse parser (defaults and help from the dataclass)."""
    add_flags(parser, GenerationConfig, only=only, choices={"strategy": STRATEGIES})


def from_arguments(args) -> GenerationConfig:
    """The GenerationConfig of parsed flags (settings not given keep their defaults)."""
    return GenerationConfig.make(**given(GenerationConfig, args))
