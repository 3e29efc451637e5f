"""Run the fault-injection suite and write docs/RELIABILITY.md from what the tests recorded.

    python tests/faults/report.py [--out docs/RELIABILITY.md] [pytest args...]

Each fault test records a row (fault, trials, survived, data lost, time to exit) through the `fault_row`
fixture; pytest's JUnit XML carries the rows here. A failed test shows as survived 0. Exits non-zero if
any test failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "RELIABILITY.md"))
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               "tests/faults", f"--junitxml={xml}",
               *pytest_args]
        # the in-job restart row at its full count (a plain pytest run does 2 trials)
        proc = subprocess.run(cmd, cwd=REPO, env={"FAULT_TRIALS": "10", **os.environ})
        cases = ET.parse(xml).getroot().iter("testcase")
        rows, matrix, security, failed = [], [0, 0], [0, 0], []
        for case in cases:
            ok = case.find("failure") is None and case.find("error") is None
            skipped = case.find("skipped") is not None
            name = f"{case.get('classname')}::{case.get('name')}"
            if not ok:
                failed.append(name)
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            if "fault_row" in props:
                row = json.loads(props["fault_row"])
                rows.append(row if ok else {**row, "survived": 0})
            elif "test_bad_input" in name and "exits_2" in name and not skipped:
                matrix[0] += 1
                matrix[1] += ok
            elif "test_security" in name and not skipped:
                security[0] += 1
                security[1] += ok
    lines = [
        "# Reliability",
        "",
        "Produced by `python tests/faults/report.py` (the suite in `tests/faults/`, also run by `make test`),",
        f"{datetime.date.today()}, {platform.node() or 'this host'} ({platform.machine()}, "
        f"{_cpus()} CPUs), Python {platform.python_version()}. Every fault is injected for real: signals to",
        "real ranks started by `accelerate launch`, a real full tmpfs, real damaged files, a closed port for W&B.",
        "'Data lost' counts checkpoints or metrics that were complete before the fault and were gone or damaged",
        "after it (each test verifies every file's sha256). 'Time to exit' runs from the fault to the last",
        "process's exit; '(whole run)': from the start of the process, when the fault comes from inside it.",
        "",
        "| fault | trials | survived | data lost | time to exit |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        exit_s = f"{r['exit_s']:.1f} s" if r.get("exit_s") is not None else "- (run completes)"
        exit_s += " (whole run)" if r.get("whole_run") else ""
        lines.append(f"| {r['fault']} | {r['trials']} | {r['survived']} | {r['data_lost']} | {exit_s} |")
    lines += [
        "",
        f"Bad-input matrix (`tests/faults/test_bad_input.py`): **{matrix[1]} of {matrix[0]} cases pass** — each",
        "exits 2 with one line naming what is wrong and how to fix it, no traceback, and the whole directory",
        "tree around it unchanged (sha256 of every file before and after).",
        "",
        f"Security checks (`tests/faults/test_security.py`): **{security[1]} of {security[0]} pass** — no unsafe",
        "loader or dynamic code in the package, `latest` never followed outside its directory, no file named",
        "in a meta.json outside its checkpoint, oversized meta.json and safetensors headers refused unread.",
        "Configs are read with `yaml.safe_load`; a `!!python` tag is refused as invalid YAML (a bad-input case).",
    ]
    if failed:
        lines += ["", "Failed: " + ", ".join(failed)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(rows)} fault rows, bad-input {matrix[1]}/{matrix[0]}, "
          f"security {security[1]}/{security[0]}")
    return proc.returncode


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
