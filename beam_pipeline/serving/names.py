"""What model names, version labels and versions may look like; kept free of TensorFlow for the CLI.

Names and labels from URLs are matched against strict patterns and versions must be plain integers, so
nothing a client sends is ever used to build a file path.
"""

from __future__ import annotations

import re

from beam_pipeline.serving.errors import BadRequestError

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
# Version directory names and URL versions: decimal digits that fit in an int64, as TF Serving reads them.
VERSION_RE = re.compile(r"[0-9]{1,18}")


def parse_version(text: str) -> int:
    """A version from a URL; anything but decimal digits is a 400."""
    if not VERSION_RE.fullmatch(text):
        raise BadRequestError(f"version must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def parse_version_labels(text: str) -> dict[str, int]:
    """Parse `stable=3,canary=4` (the --model_version_labels flag) into {label: version}."""
    labels: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, version = (s.strip() for s in item.partition("="))
        if not sep or not LABEL_RE.fullmatch(label) or not VERSION_RE.fullmatch(version):
            raise ValueError(f"bad version label {item!r}: expected LABEL=VERSION, LABEL matching {LABEL_RE.pattern}")
        if label in labels:
            raise ValueError(f"version label {label!r} given twice")
        labels[label] = int(version)
    return labels
