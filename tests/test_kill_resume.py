"""A killed run resumes to the identical result: tests/scripts/kill_resume.py kills the tiny pipeline (in each stage,
mid-epoch included) and a tiny `minirec fit` with SIGKILL at seeded random points and compares every resumed run with
the unbroken one (selections, scores, test metrics; final LoRA weights and validation history)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_anywhere_then_resume_gives_the_unbroken_result(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tests/scripts/kill_resume.py"), "--workdir", str(tmp_path),
                           "--pipeline-kills", "8", "--fit-kills", "4", "--seed", "0"],
                          capture_output=True, text=True, timeout=1800)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kill_resume: 0 of 13 comparisons differ" in done.stdout  # cold vs warm run, 8 + 4 resumed runs
    assert done.stdout.count("-> identical") == 13
    assert "the run ended first" not in done.stdout  # every kill landed where it was aimed
