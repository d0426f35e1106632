"""CPU time per thread of a running process, over its busiest stretch: what a worker spends
beside the model.

    .venv/bin/python bench/threads_cpu.py --match celery --seconds 75 &
    .venv/bin/python bench/drain.py ...

Samples /proc every half second for --seconds, finds the longest stretch in which the machine
was at least 95% busy (a drain), and prints each thread of the processes whose command line
contains --match with its CPU seconds there, heaviest first. A worker's two inference lanes
are its two heaviest threads; the task threads (decode, preprocess, database) and the
consumer follow. Results: docs/benchmarks.md ("The worker tier at saturation", sixth session).
"""

from __future__ import annotations

import argparse
import os
import time


def sample(match: str) -> tuple[float, int, int, dict[str, float]]:
    """(time, idle jiffies, total jiffies, CPU seconds per thread id of matching processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    threads: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if match not in open(f"/proc/{pid}/cmdline").read():
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                threads[f"{pid}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    cpu = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return time.time(), cpu[3] + cpu[4], sum(cpu), threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--match", default="celery")
    parser.add_argument("--seconds", type=float, default=75)
    args = parser.parse_args()
    rows, end = [], time.time() + args.seconds
    while time.time() < end:
        rows.append(sample(args.match))
        time.sleep(0.5)
    best: list[int] = []
    run: list[int] = []
    for i in range(1, len(rows)):
        busy = 1 - (rows[i][1] - rows[i - 1][1]) / max(1, rows[i][2] - rows[i - 1][2])
        if busy >= 0.95 and rows[i][3]:
            run.append(i)
        else:
            best, run = max(best, run, key=len), []
    best = max(best, run, key=len)
    if not best:
        print("no busy stretch with a matching process")
        return
    first, last = rows[best[0] - 1], rows[best[-1]]
    spent = {t: last[3][t] - first[3].get(t, 0.0) for t in last[3]}
    total = sum(spent.values())
    print(f"busy stretch {last[0] - first[0]:.1f} s; {len(spent)} threads, {total:.2f} CPU s")
    for t, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        if s > 0:
            print(f"  {t:>14} {s:7.2f} s  {s / total:6.1%}")


if __name__ == "__main__":
    main()
