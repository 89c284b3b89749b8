"""Every decoding setting in one frozen dataclass: its default, its range, its help text, its validation.

The library (`decode.stream`, `caption`, `caption_batch`), the CLI, the evaluation command and the app all
take a `GenerationConfig`; the CLI's flags are generated from its fields, and the app's controls are keyed by
field name, so a new setting is one field here plus the control that shows it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .settings import add_flags, given, kind
from .settings import setting as _setting

STRATEGIES = ("greedy", "beam", "sample", "guided")


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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len={self.max_len}: expected at least 1 word")
        if self.beam_size < 1:
            raise ValueError(f"beam_size={self.beam_size}: expected 1 or more")
        if self.guide_threshold is not None and not 0 < self.guide_threshold <= 1:
            raise ValueError(f"guide_threshold={self.guide_threshold}: expected a probability in (0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: expected a positive number")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected 0 (all words) or more")
        if not self.guide_margin >= 0:
            raise ValueError(f"guide_margin={self.guide_margin}: expected 0 or more")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram={self.no_repeat_ngram}: expected 0 (off) or more")
        if self.num_alternatives < 0:
            raise ValueError(f"num_alternatives={self.num_alternatives}: expected 0 or more")

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
