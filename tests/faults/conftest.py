"""The fault suite's tally: every test here records what it injected and what it checked, and the
session ends with one line of figures (faults injected, bad inputs tried, runs completed, records
lost). `records_lost` is what a test found missing after a fault; the suite's claim is that it is 0.
"""
import collections

import pytest

_TALLY = collections.Counter()
_KEYS = ("faults_injected", "bad_inputs", "runs_completed", "records_lost")


@pytest.fixture
def tally():
    """`tally(faults_injected=1, bad_inputs=3, runs_completed=1, records_lost=0)` adds to the figures."""
    def add(**counts):
        unknown = set(counts) - set(_KEYS)
        if unknown:
            raise KeyError(f"unknown tally keys {sorted(unknown)}; valid: {', '.join(_KEYS)}")
        _TALLY.update({k: int(v) for k, v in counts.items()})
    return add


def pytest_terminal_summary(terminalreporter):
    if any(_TALLY.values()):
        line = ", ".join(f"{k.replace('_', ' ')} {_TALLY[k]}" for k in _KEYS)
        terminalreporter.write_line(f"fault suite: {line}")
