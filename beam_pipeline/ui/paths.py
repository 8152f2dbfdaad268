"""The metadata UI's page addresses, shared by its views and the static report that links to them."""

from __future__ import annotations

from urllib.parse import quote


def run_href(pipeline: str, run_id: str) -> str:
    """The page of one pipeline run."""
    return f"/runs/{quote(pipeline, safe='')}/{quote(run_id, safe='')}"
