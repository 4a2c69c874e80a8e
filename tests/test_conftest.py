"""The test suite's own fixtures and hooks (tests/conftest.py)."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_INNER = """
import gc
import weakref

import pytest

refs = []


class Engine:  # an LLM: a reference cycle holding a KV cache
    def __init__(self):
        self.me = self


def test_fails():
    engine = Engine()
    refs.append(weakref.ref(engine))
    assert engine is None


@pytest.fixture
def freed_at_setup():
    # What the next test's engine sees when it sizes its KV cache: the collection the
    # GPU fixture runs has had its chance, and pytest still holds the last traceback.
    gc.collect()
    return refs[0]() is None


def test_next_finds_it_freed(freed_at_setup):
    assert freed_at_setup
"""


def test_failed_test_releases_its_locals(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=_INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    # The failure's text still shows the locals it had (the report is written first).
    result.stdout.fnmatch_lines(["*assert <test_inner.Engine object at *> is None*"])
