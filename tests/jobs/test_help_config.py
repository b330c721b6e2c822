"""Every job parses its command line the same way: `--help-config` prints the job's config keys and exits 0.

Each file of jobs/ runs in this process as `python jobs/<job>.py --help-config` would run it (runpy with
sys.argv set), so a job that reads its arguments its own way, or does work before parsing them, fails here.
"""
import re
import runpy
import sys
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.py"))
KEY_LINE = re.compile(r"^[a-z_][\w.]*:( |$)")  # `dotted.key: value  # meaning` or a `section:` header


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_help_config_prints_the_keys_and_exits_0(job, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(job), "--help-config"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(job), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    lines = out.strip().splitlines()
    assert len(lines) >= 3 and all(KEY_LINE.match(line) for line in lines), out
