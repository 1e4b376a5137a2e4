"""Which form a problem's tests run in: converted (strong, trusted harness) or legacy (weak, one process).

The converted form (`Sandbox.run_tests`) runs the tests themselves, unchanged, in a trusted harness process,
with the names they use for the solution bound to proxies of the candidate's functions, which live in another
process and answer with plain data. What the harness needs is worked out from the tests' AST:
  asserts (MBPP `test_list`, `tests`): the free names of the tests that the trusted setup (`test_imports`,
      `test_setup`) does not define are the candidate's functions; builtins stay the trusted builtins unless
      the reference solution defines that name itself (MBPP 126 names its function `sum`); a stdlib module
      name used only as `name.attr` (MBPP 596's `sys.getsizeof`) is imported on the trusted side.
  HumanEval (`test` with `check(candidate)`, `entry_point`): the trusted setup is the problem's own `prompt`
      (its helper functions, such as HumanEval/32's `poly`, stay trusted) and `test`; the entry point and any
      prompt function without a body are proxies; the test is `check(<entry point>)`.
Where the sample carries a reference solution (MBPP `code`, HumanEval `prompt + canonical_solution`), the
converted form is validated on it once per problem (`FormCache`, in memory and under
$R1LAB_CACHE_DIR/code_forms): if the reference fails tests in the converted form that it passes in the legacy
form (a solution returning an object, a generator the test consumes lazily, a class...), the problem is graded
in the legacy form, and its items are counted as weak. Tests that do not parse, or that name no candidate
function, are legacy (weak) as well.
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORM_VERSION = 1   # bump when the harness or the conversion changes: cached decisions are keyed by it
STRONG, WEAK = "strong", "weak"


@dataclass(frozen=True)
class TestPlan:
    key: str                            # cache key: the tests, their conversion and the reference
    legacy_setup: str                   # legacy form: setup + tests run with the program in one process
    legacy_tests: tuple[str, ...]
    strong: dict[str, Any] | None       # `Sandbox.run_tests` keyword arguments (tests, bind, setup, modules)
    why_weak: str | None                # why there is no converted form
    reference: str | None               # a reference solution program, if the sample has one


def _setup_of(sample: Mapping[str, Any]) -> str:
    setup = "\n".join(sample.get("test_imports") or [])
    if sample.get("test_setup"):
        setup += "\n" + sample["test_setup"]
    return setup


class _Names(ast.NodeVisitor):
    """Names a piece of code binds and loads, and which loaded names are only ever used as `name.attr`."""

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.loaded: set[str] = set()
        self.non_attr: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        (self.loaded if isinstance(node.ctx, ast.Load) else self.bound).add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and isinstance(node.value.ctx, ast.Load):
            self.loaded.add(node.value.id)
        else:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        self.bound.add(node.arg)

    def visit_alias(self, node: ast.alias) -> None:
        self.bound.add((node.asname or node.name).split(".")[0])

    def _def(self, node) -> None:
        self.bound.add(node.name)
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)

    def generic_visit(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
                self.non_attr.add(child.id)
            self.visit(child)


def _names(*sources: str) -> _Names:
    n = _Names()
    for src in sources:
        n.visit(ast.parse(src))
    return n


def _top_level_defs(src: str | None) -> set[str]:
    if not src:
        return set()
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set()
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def _assert_plan(setup: str, tests: list[str], reference: str | None) -> tuple[dict | None, str | None]:
    try:
        used, defined = _names(*tests), _names(setup)
    except SyntaxError as e:
        return None, f"the tests or their setup do not parse ({e.msg}, line {e.lineno})"
    free = used.loaded - used.bound - defined.bound
    ref_defs = _top_level_defs(reference)
    candidate = {n for n in free if not hasattr(builtins, n) or n in ref_defs}
    modules = sorted(n for n in candidate if n in sys.stdlib_module_names and n not in used.non_attr
                     and n not in ref_defs)
    bind = {n: n for n in sorted(candidate - set(modules))}
    if not bind:
        return None, "the tests call no function of the solution"
    return {"setup": setup, "tests": list(tests), "bind": bind, "modules": modules}, None


def _stub_functions(prompt: str) -> set[str]:
    """Functions of a HumanEval prompt without a real body (docstring, pass, ... and imports only)."""
    stubs = set()
    for node in ast.parse(prompt).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and all(
                isinstance(s, (ast.Pass, ast.Import, ast.ImportFrom))
                or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in node.body):
            stubs.add(node.name)
    return stubs


def _humaneval_plan(sample: Mapping[str, Any], setup: str) -> tuple[dict | None, str | None]:
    entry, prompt = sample["entry_point"], sample.get("prompt") or ""
    try:
        stubs = _stub_functions(prompt) if prompt else set()
        ast.parse(sample["test"])
    except SyntaxError as e:
        return None, f"the prompt or the test does not parse ({e.msg}, line {e.lineno})"
    bind = {name: name for name in sorted(stubs | {entry})}
    trusted = "\n".join(part for part in (setup, prompt, sample["test"]) if part)
    return {"setup": trusted, "tests": [f"check({entry})"], "bind": bind, "modules": []}, None


_PLAN_FIELDS = ("tests", "test_list", "test_imports", "test_setup", "test", "entry_point", "prompt", "code",
                "canonical_solution")


def plan_for(sample: Mapping[str, Any]) -> TestPlan:
    """The legacy and (when possible) converted forms of a sample's assert-style or HumanEval tests (memoised
    on the fields that define them: GRPO grades each problem once per sample of its group)."""
    fields = tuple(tuple(v) if isinstance(v, list) else v for v in (sample.get(f) for f in _PLAN_FIELDS))
    try:
        hash(fields)
    except TypeError:  # a field of an unusual type: plan it without the memo
        return _plan(sample)
    return _plan_memo(fields)


@functools.lru_cache(maxsize=4096)
def _plan_memo(fields: tuple) -> TestPlan:
    return _plan({k: list(v) if isinstance(v, tuple) else v
                  for k, v in zip(_PLAN_FIELDS, fields) if v is not None})


def _plan(sample: Mapping[str, Any]) -> TestPlan:
    setup = _setup_of(sample)
    tests = sample.get("tests") or sample.get("test_list")  # MBPP calls them test_list
    if tests:
        reference = sample.get("code") if isinstance(sample.get("code"), str) else None
        legacy_setup, legacy_tests = setup, tuple(tests)
        strong, why = _assert_plan(setup, list(tests), reference)
    elif sample.get("test") and sample.get("entry_point"):  # HumanEval
        reference = None
        if sample.get("canonical_solution") is not None:
            reference = (sample.get("prompt") or "") + sample["canonical_solution"]
        legacy_setup, legacy_tests = setup + "\n" + sample["test"], (f"check({sample['entry_point']})",)
        strong, why = _humaneval_plan(sample, setup)
    else:
        raise KeyError("code reward: the sample has neither 'tests'/'test_list' (asserts), 'test'+'entry_point' "
                       f"(HumanEval) nor 'io_tests'; fields: {sorted(sample)}")
    key = hashlib.sha256(json.dumps([FORM_VERSION, legacy_setup, legacy_tests, strong, reference],
                                    sort_keys=True).encode()).hexdigest()
    return TestPlan(key, legacy_setup, legacy_tests, strong, why, reference)


def decide(strong_ref: tuple[int, int], legacy_ref: tuple[int, int] | None) -> dict | None:
    """The form for a problem from its reference's results: (passed, total) in each form. None: the legacy
    result is needed first (the converted form failed some test)."""
    s_pass, s_total = strong_ref
    if s_pass == s_total:
        return {"form": STRONG, "reason": "the reference passes the converted tests", "strong": strong_ref}
    if legacy_ref is None:
        return None
    if legacy_ref[0] > s_pass:
        return {"form": WEAK, "reason": f"the reference passes {legacy_ref[0]}/{legacy_ref[1]} legacy tests but "
                f"only {s_pass}/{s_total} converted ones", "strong": strong_ref, "legacy": legacy_ref}
    return {"form": STRONG, "reason": f"the reference fails as many tests in the legacy form ({legacy_ref[0]}/"
            f"{legacy_ref[1]}) as in the converted one", "strong": strong_ref, "legacy": legacy_ref}


class FormCache:
    """Per-problem form decisions, in memory and (when `directory` is set) one JSON file per problem."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.dir = Path(directory) if directory else None
        self._mem: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            if key in self._mem:
                return self._mem[key]
        if self.dir is None:
            return None
        path = self.dir / f"{key}.json"
        try:
            decision = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RuntimeError(f"code form cache: cannot read {path}: {e} (delete the file to re-validate)") from e
        if decision.get("form") not in (STRONG, WEAK):
            raise RuntimeError(f"code form cache: {path} holds no valid decision (delete it to re-validate)")
        with self._lock:
            self._mem[key] = decision
        return decision

    def put(self, key: str, decision: dict) -> None:
        with self._lock:
            self._mem[key] = decision
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(decision, f)
        os.replace(tmp, self.dir / f"{key}.json")  # atomic: concurrent workers never see half a file


_DEFAULT: FormCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_form_cache() -> FormCache:
    """The process-wide cache, persisted under $R1LAB_CACHE_DIR/code_forms (default ~/.cache/r1lab)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            root = os.environ.get("R1LAB_CACHE_DIR") or str(Path.home() / ".cache" / "r1lab")
            _DEFAULT = FormCache(Path(root) / "code_forms")
        return _DEFAULT
