"""Validation of names that become parts of storage keys."""

from __future__ import annotations

import re

from .errors import InputError

_SPEAKER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def validate_speaker(name: str) -> str:
    """Return ``name`` if it is a safe speaker name, else raise ``InputError``.

    Speaker names become key prefixes (``speakers/<name>/...``), so anything that could
    escape the prefix or be read two ways ('/', '..', spaces, upper case) is refused.
    """
    if not isinstance(name, str) or not _SPEAKER_RE.fullmatch(name):
        raise InputError(
            f"invalid speaker name {name!r}",
            "use 1-63 characters of lower-case letters, digits, '-' and '_', starting with a "
            "letter or digit (no '/', '..' or spaces), e.g. 'cnn-anchor'",
        )
    return name
