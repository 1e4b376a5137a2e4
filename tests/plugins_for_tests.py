"""Reward plugins used by the tests (importable as `plugins_for_tests:NAME` with tests/ on sys.path)."""
import time


def hangs(completion, sample):
    while True:
        time.sleep(1)


def raises(completion, sample):
    raise RuntimeError(f"plugin exploded on {sample['answer']}")


def brevity(completion, sample):
    return 1.0 / (1 + len(completion))


def returns_text(completion, sample):
    return "not a number"


def ones(completion, sample):
    """Share of characters that are '1': trivially learnable, to check that the RL loop learns at all."""
    return completion.count("1") / max(1, len(completion))


def fails_three_in_ten(completions, samples):
    """Batched: the first 3 items of every 10 fail (rewards.outcome.Failed), the others score 1."""
    from rewards.outcome import Failed

    return [Failed("grader fell over (test)") if i % 10 < 3 else 1.0 for i in range(len(completions))]


fails_three_in_ten.r1lab_batched = True
