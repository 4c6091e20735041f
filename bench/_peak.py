"""Run a module (`-m name args...`) or code (`-c code args...`) in this process and print its peak resident memory
at exit as `__peak_rss_kb__ N`. It reads VmHWM, which exec resets: a child's ru_maxrss also counts the parent's
memory it was forked from."""

import atexit
import runpy
import sys


def _report() -> None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                print(f"__peak_rss_kb__ {line.split()[1]}", file=sys.stderr, flush=True)


atexit.register(_report)
kind, target, *rest = sys.argv[1:]
if kind == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<code>", "exec"), {"__name__": "__main__"})
