"""What the terminal shows while a job runs: Ray's native lines go to the command's log file, our bar stays."""
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])

CHILD = """
import os, sys
from jobs.progress import QUIET, native_lines_to_log
QUIET["log"] = sys.argv[1]
with native_lines_to_log() as terminal:
    os.write(2, b"core_worker.cc: a native line of Ray's\\n")  # what C++ code writes, below Python
    terminal.write("label: 100%|####| 3/3\\n")
sys.stderr.write("after the pool\\n")
"""


def test_native_lines_go_to_the_log_while_the_bar_stays_on_the_terminal(tmp_path):
    log = tmp_path / "dicl.log"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "label: 100%|####| 3/3\nafter the pool\n"  # the bar, and stderr restored after
    assert log.read_text() == "core_worker.cc: a native line of Ray's\n"
