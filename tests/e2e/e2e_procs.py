"""Process helpers of the end-to-end tests (jobs and clusters run as separate processes)."""
import os
import signal
from pathlib import Path


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a job or `ray start --block` started with start_new_session)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
