"""The grader gives the same verdicts however its caller was started: a guarded script, an unguarded script,
`python -c` and `python - <<EOF` (stdin). Workers are programs of their own, so the caller's top-level code
runs exactly once, and nothing silently turns into False (the old spawn pool answered 62/79 from stdin)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_grader_policies import CLASSES
from test_math_grader import MULTI_BOX, TABLE

REPO = Path(__file__).resolve().parents[1]

BODY = """\
with open(COUNTER, "a") as f:  # one line per run of the top-level code
    f.write("ran\\n")
from rewards.math import GRADER_STATS, grade_batch, grader_pool

def shout(text):  # defined in __main__: shipped to the workers by value
    return text.upper()

cases = json.load(open(CASES))
verdicts = grade_batch([c for c, _ in cases], [g for _, g in cases], timeout_s=60)
(r,) = grader_pool().map(shout, [("from main",)], 60)
print("RESULT " + json.dumps({"verdicts": [v.status for v in verdicts], "stats": GRADER_STATS,
                              "main_fn": r.value, "workers": grader_pool().worker_pids()}))
"""


def _program(tmp_path: Path, guarded: bool) -> str:
    head = (f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            f"COUNTER = {str(tmp_path / 'counter.txt')!r}\nCASES = {str(tmp_path / 'cases.json')!r}\n")
    if not guarded:
        return head + BODY
    body = "".join(f"    {line}\n" if line else "\n" for line in BODY.splitlines())
    return head + "def main():\n" + body + "\nif __name__ == '__main__':\n    main()\n"


def _suite() -> tuple[list[tuple[str, str]], list[str]]:
    cases = [(f"<think>\nwork\n</think>\nThe answer is $\\boxed{{{p}}}$.", str(g)) for p, g, _, _ in TABLE]
    cases += [(f"<think>\nwork\n</think>\n{a}", g) for a, g, *_ in MULTI_BOX]
    cases += [(c, g) for c, g, _, _ in CLASSES]
    expected = ["correct" if e else "wrong" for _, _, e, _ in TABLE]
    expected += ["correct" if e else "wrong" for *_, e, _ in MULTI_BOX]  # grade_batch's default: the eval policy
    expected += ["correct" if e else "wrong" for _, _, e, _ in CLASSES]
    cases += [("\\boxed{x^2+1}", "\\frac{"), ("\\boxed{1/2}", "")]  # golds that do not parse
    expected += ["failed", "failed"]
    return cases, expected


@pytest.mark.parametrize("mode", ["guarded_file", "unguarded_file", "dash_c", "stdin"])
def test_same_verdicts_from_every_launch_mode(tmp_path, mode):
    cases, expected = _suite()
    assert len(cases) >= 79
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    program = _program(tmp_path, guarded=mode == "guarded_file")
    script = tmp_path / "grade_suite.py"
    script.write_text(program)
    argv = {"guarded_file": [str(script)], "unguarded_file": [str(script)], "dash_c": ["-c", program],
            "stdin": ["-"]}[mode]
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("R1LAB_IN_GRADER_WORKER", "R1LAB_GRADER_PYTHON", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          input=program if mode == "stdin" else None, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    wrong = [(c, g, want, got) for (c, g), want, got in zip(cases, expected, out["verdicts"]) if want != got]
    assert not wrong, wrong
    assert out["verdicts"] == expected
    assert out["stats"]["slow_path"] >= 10 and out["stats"]["timeouts"] == 0 and out["stats"]["errors"] == 0
    assert out["stats"]["failed"] == 2
    assert out["main_fn"] == "FROM MAIN" and len(out["workers"]) >= 1
    assert (tmp_path / "counter.txt").read_text() == "ran\n"  # the caller's top-level code ran exactly once
