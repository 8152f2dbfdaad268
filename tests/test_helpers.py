"""The test helpers that decide skips: a missing system dependency skips locally and fails under CI=true."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    helpers.require(True, "never used")
    with pytest.raises(pytest.skip.Exception, match="chromium not installed"):
        helpers.require(None, "chromium not installed")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        helpers.require(False, "chromium not installed")
    for value in ("true", "TRUE", " true "):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=r"chromium not installed; CI=true, so .* is a failure"):
            helpers.require(False, "chromium not installed")
        helpers.require("/usr/bin/chromium", "never used")


def test_needs_marks_a_skip_locally_and_replaces_the_test_by_a_failure_in_ci(monkeypatch):
    def a_test():
        @pytest.mark.slow
        def test_uses_a_fixture(model_store):
            raise AssertionError("must not run")

        return test_uses_a_fixture

    monkeypatch.delenv("CI", raising=False)
    available = a_test()
    assert helpers.needs("/usr/bin/chromium", "x")(available) is available
    skipped = helpers.needs(None, "chromium not installed")(a_test())
    marks = [(m.name, m.kwargs) for m in skipped.pytestmark]
    assert marks == [("slow", {}), ("skip", {"reason": "chromium not installed"})]

    monkeypatch.setenv("CI", "true")
    failing = helpers.needs(None, "chromium not installed")(a_test())
    assert failing.__name__ == "test_uses_a_fixture" and inspect.signature(failing).parameters == {}  # no fixture built
    assert [m.name for m in failing.pytestmark] == ["slow"]
    with pytest.raises(pytest.fail.Exception, match="chromium not installed"):
        failing()


@pytest.mark.parametrize("ci", [None, "true"])
def test_pytest_reports_a_missing_dependency_as_skipped_locally_and_failed_in_ci(tmp_path, ci):
    """The whole way through pytest, as the suite runs them: in a fixture (require) and as a decorator (needs)."""
    (tmp_path / "test_missing.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from tests.helpers import needs, require

            @pytest.fixture
            def server():
                require(False, "server not installed")

            def test_in_fixture(server):
                pass

            @needs(None, "browser not installed")
            def test_decorated():
                pass
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": ROOT}
    if ci:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_missing.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1]
    if ci:
        assert done.returncode == 1, done.stdout
        assert "1 failed" in summary and "1 error" in summary and "skipped" not in summary, done.stdout
        assert "server not installed; CI=true" in done.stdout and "browser not installed; CI=true" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "2 skipped" in summary, done.stdout


def test_read_only_directory_refuses_entries_even_to_root_and_is_restored(tmp_path):
    target = tmp_path / "serving"
    target.mkdir()
    with helpers.read_only_directory(str(target)):
        with pytest.raises(OSError):
            (target / "new").mkdir()
        with pytest.raises(OSError):
            (target / "file").write_text("x")
    (target / "new").mkdir()  # writable again afterwards, so pytest can clean it up
    assert sorted(os.listdir(target)) == ["new"]
