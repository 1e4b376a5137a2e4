import pytest

from data.tasks import make_task, make_mixture, split_of
from rewards.countdown import check_expression


@pytest.mark.parametrize("name", ["arithmetic", "chain_sum", "countdown"])
def test_seeded_and_disjoint(name):
    a = make_task(name, 200, split="train", seed=1)
    b = make_task(name, 200, split="train", seed=1)
    assert a["problem"] == b["problem"]
    test = make_task(name, 100, split="test", seed=1)
    test_other_seed = make_task(name, 100, split="test", seed=99)
    train_other_seed = make_task(name, 300, split="train", seed=7)
    train_all = set(a["problem"]) | set(train_other_seed["problem"])
    assert not train_all & (set(test["problem"]) | set(test_other_seed["problem"]))
    assert len(set(a["problem"])) == 200  # unique
    row = a[0]
    assert row["prompt"][0]["role"] == "user" and row["problem"] in row["prompt"][0]["content"]
    assert row["solution"].startswith("<think>\n") and "</think>\n\\boxed{" in row["solution"]


def _boxed(solution: str) -> str:
    return solution.rsplit("\\boxed{", 1)[1][:-1]


def test_arithmetic_and_chain_answers_are_right():
    for row in make_task("arithmetic", 300, seed=2, ops="+-*", max_digits=4):
        a, op, b = row["problem"][len("What is "):-1].split(" ")
        assert int(row["answer"]) == eval(f"{a}{op}{b}")  # noqa: S307 - generated ints
        assert _boxed(row["solution"]) == row["answer"]
    for row in make_task("chain_sum", 300, seed=2, allow_minus=True, max_terms=6):
        expr = row["problem"][len("Compute "):-1]
        assert int(row["answer"]) == eval(expr)  # noqa: S307
        last = row["solution"].split("</think>")[0].strip().splitlines()[-1]
        assert last.endswith("=" + row["answer"])


def test_countdown_reference_expression_checks():
    ds = make_task("countdown", 300, seed=5, n_numbers=4)
    for row in ds:
        expr = _boxed(row["solution"])
        assert check_expression(expr, row["numbers"], row["target"]), (expr, row)
        assert row["answer"] == str(row["target"])


def test_countdown_checker_rejects_cheats():
    assert check_expression("(3+5)*2", [2, 3, 5], 16)
    assert check_expression("(3 + 5) \\times 2 = 16", [2, 3, 5], 16)
    assert not check_expression("16", [2, 3, 5], 16)            # numbers not used
    assert not check_expression("(3+5)*2*1", [2, 3, 5], 16)     # extra number
    assert not check_expression("3*5+2", [2, 3, 5], 16)         # wrong value
    assert not check_expression("__import__('os')", [1], 1)     # no code
    assert not check_expression("2**3**9", [2, 3, 9], 8)        # no powers
    assert not check_expression("5/(3-3)", [3, 3, 5], 1)


def test_difficulty_knobs_change_the_problems():
    easy = make_task("chain_sum", 50, seed=0, min_terms=2, max_terms=2, max_value=9)
    hard = make_task("chain_sum", 50, seed=0, min_terms=5, max_terms=5, min_value=100, max_value=999)
    assert max(int(r["answer"]) for r in easy) <= 18
    assert all(r["problem"].count("+") == 4 for r in hard)


def test_small_problem_space_error_names_task():
    with pytest.raises(ValueError, match="chain_sum.*unique"):
        make_task("chain_sum", 500, min_terms=2, max_terms=2, max_value=3)
    with pytest.raises(ValueError, match="unknown task 'nope'.*known tasks"):
        make_task("nope", 1)


def test_mixture_and_split_function():
    ds = make_mixture({"chain_sum": {"n": 20}, "countdown": {"n": 10}}, seed=0)
    assert len(ds) == 30 and set(ds["task"]) == {"chain_sum", "countdown"}
    assert split_of("x") in ("train", "test")


def test_sloppy_teacher_slips_only_carries_and_keeps_gold_answers():
    """slip_rate drops carries in the *traces* (a sloppy cold-start teacher); problems and gold answers are the
    same as without slips, and a trace is wrong exactly when it dropped a carry."""
    knobs = {"min_digits": 2, "max_digits": 2, "ops": "+"}
    clean = make_task("arithmetic", 1000, seed=3, **knobs)
    sloppy = make_task("arithmetic", 1000, seed=3, slip_rate=0.5, **knobs)
    assert clean["problem"] == sloppy["problem"] and clean["answer"] == sloppy["answer"]
    wrong = carries = 0
    for row in sloppy:
        a, b = (int(x) for x in row["problem"][len("What is "):-1].split(" + "))
        steps = row["solution"].split("</think>")[0].split("\n")[1:-1]
        col = [s for s in steps if s[0].isdigit() and s.count("+") == 2]
        carried_in = [int(s.split("=")[0].split("+")[2]) for s in col]
        sums = [int(s.split("=")[1]) for s in col]
        dropped = sum(1 for i in range(len(col)) if sums[i] >= 10 and (
            carried_in[i + 1] == 0 if i + 1 < len(col) else "carry 1" not in steps))
        carries += sum(1 for s in sums if s >= 10)
        shown = int(_boxed(row["solution"]))
        assert (shown != a + b) == (dropped > 0), row["solution"]
        wrong += shown != a + b
    assert 0.35 < wrong / 1000 < 0.6 and carries > 400
    with pytest.raises(ValueError, match="slip_rate"):
        make_task("arithmetic", 5, slip_rate=1.5)
