"""Decoding settings as a request sends them -> a GenerationConfig within the served LIMITS (generation.py).

An app's controls and API clients send numbers as floats (a slider's 3.0), strings or None; these readers take whole
numbers only where whole numbers are meant and finite numbers only, and every refusal is a ValueError that names the
value and says what was expected. No web framework here: the app (captioner/app/handlers.py) turns the ValueError
into its message, so the library can parse and check served settings without Gradio.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any

from .generation import LIMITS, STRATEGIES, GenerationConfig


def shown(value: Any, width: int = 24) -> str:
    """A value as an error message quotes it: short (a 5,000-digit number is named by its length, not printed)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (Python's 4,300-digit limit)
        text = "a number"
    if len(text) > width:
        return f"{text[:width - 8]}… ({len(text):,} characters)"
    return text


def whole_number(name: str, value: Any, expected: str) -> int:
    """An API or control value that must be a whole number: an int, a float with nothing after the point (sliders
    send 3.0) or such a string. 1.5, NaN, infinities, booleans and 5,000-digit numbers are a ValueError that names the
    value and says what is `expected`; nothing is rounded."""
    bad = ValueError(f"{name}={shown(value)}: expected {expected}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 30:
            raise bad
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            raise bad from None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise bad


def real_number(name: str, value: Any, expected: str) -> float:
    """An API or control value that must be a finite number (NaN and infinities are a ValueError, as bad values are)."""
    bad = ValueError(f"{name}={shown(value)}: expected {expected}")
    if isinstance(value, bool):
        raise bad
    try:
        number = float(value.strip() if isinstance(value, str) and len(value) <= 40 else value if not isinstance(value, str) else "x")
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(number):
        raise bad
    return number


def setting_value(name: str, value: Any, defaults: GenerationConfig) -> Any:
    """One sent value of setting `name` -> its GenerationConfig value, checked against the served range (the app's
    range is named, before the library's wider one would be). A negative seed means a new one each run; a
    guide_threshold of 0 means each word's calibrated one; the model's own max_len is always allowed."""
    if name not in GenerationConfig.names():
        raise ValueError(f"unknown decoding setting {name!r}")
    kind = GenerationConfig.kind(name)
    expected = LIMITS[name].describe(kind is int, served=True) if name in LIMITS else "one of " + ", ".join(STRATEGIES)
    if kind is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if kind is int:
        number = whole_number(name, value, expected)
        out = None if name == "seed" and number < 0 else number
        if not (name == "max_len" and number == defaults.max_len):
            GenerationConfig.check(name, out, served=True)
        return out
    if kind is float:
        number = real_number(name, value, expected)
        out = None if name == "guide_threshold" and number == 0 else number  # the slider's 0: calibrated
        if name in LIMITS:
            GenerationConfig.check(name, out, served=True)
        return out
    return kind(value)


def settings_from(values: dict[str, Any], defaults: GenerationConfig) -> GenerationConfig:
    """Sent values (any of them None, "" or missing: the default) -> `defaults` with them, within the served limits
    (GenerationConfig.check_served: an API event's values never pass through a slider's range, so this is where
    every request's settings are held to them). Raises ValueError naming the bad value (TypeError and OverflowError
    included, as a ValueError). The model's own max_len (`defaults.max_len`) is allowed above the served bound."""
    try:
        out = {name: setting_value(name, value, defaults) for name, value in values.items() if value is not None and value != ""}
        config = GenerationConfig.make(defaults, **out)
        own_length = config.max_len == defaults.max_len
        (GenerationConfig.make(config, max_len=None) if own_length else config).check_served()
        return config
    except (TypeError, OverflowError) as e:
        raise ValueError(str(e)) from None
