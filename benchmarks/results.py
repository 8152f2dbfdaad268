"""benchmarks/RESULTS.md is shared: each benchmark replaces only its own `## ` section."""

from __future__ import annotations

import os
import re

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = (
    "# Benchmark results\n\nEach section is written by the script it names, from one run on this project's machine.\n"
)


def write_section(title: str, body: str, path: str = PATH) -> None:
    text = open(path).read() if os.path.exists(path) else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
