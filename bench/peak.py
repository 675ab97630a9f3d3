"""Run a command and print its peak memory (ru_maxrss, KiB) and wall seconds: `python3 -I -S peak.py CMD...`.

A child's ru_maxrss counts the memory of the process it was forked from, until the exec: measured
straight from the (large) benchmark process, every command would look as big as the benchmark. This
small launcher, started fresh, forks the command instead, so only the command's own peak is seen.
Standard library only, run without site packages, to stay small.
"""

import os
import sys
import time

start = time.perf_counter()
# The command's output goes nowhere: this one's stdout carries the measurement.
quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=quiet)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, time.perf_counter() - start, os.waitstatus_to_exitcode(status))
