"""Runs one command and prints its wall time, CPU time and peak RSS as JSON.

``bench.merge`` measures every contender through this small process, which never imports
torch: a child's peak RSS (``ru_maxrss``) starts from the memory of the process that forked
it, so forking straight from the benchmark driver would add the driver's own size.

    python -m bench.spawn LOG_FILE COMMAND...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> None:
    log, *cmd = argv
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_rss": usage.ru_maxrss * 1024,
                      "exit": os.waitstatus_to_exitcode(status)}))


if __name__ == "__main__":
    main(sys.argv[1:])
