"""The quiet console of a local Ray: library notices off the console, a user's own settings kept."""
import logging
import os
import warnings

from dreamllm_platform import runtime


def test_quiet_console_sets_what_the_workers_inherit_and_keeps_a_users_settings(monkeypatch):
    for k in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(k, "")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a user's choice wins
    with warnings.catch_warnings():
        runtime.quiet_console()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default", UserWarning)
            warnings.warn("new", FutureWarning)
            warnings.warn("mine", UserWarning)
    assert [str(w.message) for w in seen] == ["mine"]
    assert os.environ["PYTHONWARNINGS"] == "ignore::DeprecationWarning,ignore::FutureWarning"
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


def test_the_worker_hook_silences_the_placement_group_cleaner_warning_only():
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    before = logging.getLogger(name).level
    try:
        runtime.quiet_worker()
        assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("ray.train").getEffectiveLevel() <= logging.WARNING
    finally:
        logging.getLogger(name).setLevel(before)
