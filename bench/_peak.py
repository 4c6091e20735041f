"""Run a module (`-m name args...`) or code (`-c code args...`) in this process and print its peak resident memory
at exit as `__peak_rss_kb__ N`. It reads VmHWM, which exec resets: a child's ru_maxrss also counts the parent's
memory it was forked from.

With LLMPRUNE_STAGE_PEAKS=1 a thread also samples VmRSS every 20 ms and keeps the peak per pipeline stage (the
"stage: <name>" lines llmprune logs), printed as `__stage_peak_kb__ <stage> N`, plus the RssAnon / RssFile split
at each stage's peak (file-backed pages of mapped safetensors count in RSS too)."""

import atexit
import logging
import os
import runpy
import sys
import threading
import time


def _status() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status) if v.strip().endswith("kB")}


class StagePeaks(logging.Handler):
    """Peak RSS per stage, sampled; the stage changes when llmprune logs 'stage: <name>'."""

    def __init__(self):
        super().__init__()
        self.stage = "startup"
        self.peaks: dict[str, tuple[int, int, int]] = {}  # stage -> (VmRSS, RssAnon, RssFile) kB at its peak
        threading.Thread(target=self._sample, daemon=True).start()

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("stage: "):
            self._record()
            self.stage = message.split(": ", 1)[1]

    def _record(self) -> None:
        s = _status()
        now = (s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0))
        if now[0] > self.peaks.get(self.stage, (0, 0, 0))[0]:
            self.peaks[self.stage] = now

    def _sample(self) -> None:
        while True:
            self._record()
            time.sleep(0.02)

    def report(self) -> None:
        for stage, (rss, anon, file) in self.peaks.items():
            print(f"__stage_peak_kb__ {stage} {rss} {anon} {file}", file=sys.stderr, flush=True)


def _report() -> None:
    print(f"__peak_rss_kb__ {_status()['VmHWM']}", file=sys.stderr, flush=True)


atexit.register(_report)
if os.environ.get("LLMPRUNE_STAGE_PEAKS") == "1":
    meter = StagePeaks()
    logger = logging.getLogger("llmprune")
    logger.setLevel(logging.INFO)
    logger.addHandler(meter)
    console = logging.StreamHandler(sys.stderr)  # llmprune adds its console handler only where there is none
    console.setFormatter(logging.Formatter("[llmprune] %(message)s"))
    logger.addHandler(console)
    atexit.register(meter.report)
kind, target, *rest = sys.argv[1:]
if kind == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<code>", "exec"), {"__name__": "__main__"})
