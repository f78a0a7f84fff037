"""The step runner: each named step of a recipe runs once, its command lines as logged subprocesses.

A finished step is recorded in <out>/stages.json (with its seconds and the load average as it ended) and skipped
on a rerun; an interrupted one runs again, and its commands resume from what they had finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipes.shapes.commands import ROOT


class StepRunner:
    """Runs named steps once and their commands as subprocesses, logged to <out>/logs/<log>.log."""

    def __init__(self, out: Path, verbose: bool = False) -> None:
        self.out, self.verbose = out, verbose
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.state_path = self.out / "stages.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def sh(self, log: str, cmd: list[str]) -> None:
        """Run one command, streaming its output to the console and to logs/<log>.log."""
        print(f"\n=== {log}: {' '.join(cmd)}", flush=True)
        with open(self.out / "logs" / f"{log}.log", "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=ROOT, bufsize=1
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                noisy = line.startswith(("(", "[")) or "%|" in line  # Ray worker lines, progress bars
                if self.verbose or not noisy:
                    sys.stdout.write(line)
            rc = proc.wait()
        if rc != 0:
            raise SystemExit(f"stage {log} failed (exit {rc}); see {self.out / 'logs' / (log + '.log')}")

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run `fn` unless step `name` finished earlier; record its time (added over interrupted tries)."""
        if self.state.get(name, {}).get("done"):
            print(f"=== {name}: done earlier ({self.state[name]['seconds']:.0f} s), skipped", flush=True)
            return
        t0 = time.time()
        prev = self.state.get(name, {}).get("seconds", 0.0)
        fn()
        # the 1-minute load average as the stage ends: how busy the machine was (timings depend on it, models do not)
        self.state[name] = {"done": True, "seconds": prev + time.time() - t0, "load": round(os.getloadavg()[0], 2)}
        self.save_state()

    def command(self, name: str, build: Callable[[], list[str]], log: str | None = None) -> None:
        """A step of one command line, built as the step starts (it may read what earlier steps wrote); logged to
        `log`, by default the step's name with '/' as '_'."""
        self.step(name, lambda: self.sh(log or name.replace("/", "_"), build()))

    def seconds(self) -> dict[str, float]:
        """Each finished step's time in seconds, in the order they ran."""
        return {k: round(v["seconds"], 1) for k, v in self.state.items()}

    def highest_load(self) -> float:
        return max((v.get("load", 0.0) for v in self.state.values()), default=0.0)
