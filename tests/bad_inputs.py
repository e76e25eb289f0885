"""Shared by the bad-input suites (tests/test_bad_inputs_*.py): each case ends in ``raises`` (the
error type and a message naming the problem) or ``documented`` (the documented result, asserted by
the test); ``OUTCOMES`` counts them, tests/conftest.py prints the counts at the end of the run."""
import collections
import re

import pytest

OUTCOMES: collections.Counter = collections.Counter()


def raises(fn, error, pattern: str):
    """``fn()`` raises ``error`` with a message matching ``pattern`` (a regex)."""
    with pytest.raises(error) as info:
        fn()
    assert re.search(pattern, str(info.value)), f"{type(info.value).__name__}: {info.value}"
    OUTCOMES["clear error"] += 1
    return info.value


def documented(ok: bool, what: str):
    """A case that returns its documented result (``ok``: the test's check of it)."""
    assert ok, what
    OUTCOMES["documented result"] += 1


def exits(fn, capsys, pattern: str):
    """A command line's ``fn()`` stops with argparse's usage error (exit 2) naming the problem."""
    with pytest.raises(SystemExit) as info:
        fn()
    err = capsys.readouterr().err
    assert info.value.code == 2 and re.search(pattern, err), err
    OUTCOMES["clear error"] += 1
