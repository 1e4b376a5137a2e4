import math
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rewards import registry
from rewards.functions import format_reward, overlong_penalty
from rewards.outcome import Failed, RewardFailed, ScoredBatch
from rewards.registry import RewardPluginError, get, register
from rewards.scorer import RewardScorer, metric_name

sys.path.insert(0, str(Path(__file__).parent))

GOOD = "<think>\n12+34=46\n</think>\n\\boxed{46}"
SAMPLE = {"problem": "What is 12 + 34?", "answer": "46"}


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(["accuracy", "format", "plugins_for_tests:hangs", "plugins_for_tests:raises"],
                     [1.0, 0.5, 1.0, 1.0], timeout_s=1.0, batch_timeout_s=4.0, num_workers=2)
    yield s
    s.close()


def test_hanging_and_raising_plugins_do_not_stall_the_batch(scorer, caplog):
    n = 16
    t0 = time.perf_counter()
    res = scorer.score([GOOD] * n, [SAMPLE] * n)
    wall = time.perf_counter() - t0
    # 16 hanging items at 1 s each on 2 workers would take 8 s; the batch deadline (4 s) bounds it
    assert wall < 4.0 + 3.0, wall
    assert res.components["accuracy"] == [1.0] * n and res.components["format"] == [1.0] * n
    # failed, not 0: NaN in the components and in the rewards, marked per item and per function
    assert all(math.isnan(v) for v in res.components["plugins_for_tests:hangs"])
    assert all(math.isnan(v) for v in res.components["plugins_for_tests:raises"])
    assert res.failed == [True] * n and all(math.isnan(r) for r in res.rewards)
    assert res.failed_by_fn == {"accuracy": [False] * n, "format": [False] * n,
                                "plugins_for_tests:hangs": [True] * n, "plugins_for_tests:raises": [True] * n}
    assert res.metrics["reward/timeouts"] == n and res.metrics["reward/errors"] == n
    assert res.metrics["reward/failed_frac"] == 1.0
    assert res.metrics["reward/plugins_for_tests.hangs/failed_frac"] == 1.0
    assert res.metrics["reward/accuracy/failed_frac"] == 0.0 and res.metrics["reward/accuracy_mean"] == 1.0
    assert math.isnan(res.metrics["reward/total_mean"])  # no item has a total
    assert "plugins_for_tests:" in res.error_example
    assert caplog.text.count("reward failures in this batch") == 1  # one line per batch, not per item


def test_scorer_still_works_after_failures(scorer):
    res = scorer.score([GOOD, "\\boxed{45}"], [SAMPLE, SAMPLE])
    assert res.components["accuracy"] == [1.0, 0.0] and res.failed_by_fn["accuracy"] == [False, False]


def test_user_plugin_values_and_bad_return_counted():
    s = RewardScorer(["plugins_for_tests:brevity", "plugins_for_tests:returns_text"], timeout_s=5, num_workers=1)
    try:
        res = s.score(["ab", "abcd"], [SAMPLE, SAMPLE])
        assert res.components["plugins_for_tests:brevity"] == pytest.approx([1 / 3, 1 / 5])
        assert all(math.isnan(v) for v in res.components["plugins_for_tests:returns_text"])
        assert res.failed == [True, True] and res.failed_by_fn["plugins_for_tests:brevity"] == [False, False]
        assert res.metrics["reward/errors"] == 2 and "not a number" in res.error_example
        assert res.metrics["reward/plugins_for_tests.brevity_mean"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    finally:
        s.close()


def test_cache_and_slow_path_metrics():
    s = RewardScorer(["accuracy"])
    comp = "\\boxed{x^2+2x+1}"
    res = s.score([comp] * 4, [{"answer": "(x+1)^2"}] * 4)
    assert res.components["accuracy"] == [1.0] * 4
    assert res.metrics["reward/slow_path"] == 1 and res.metrics["reward/cache_hits"] == 3
    assert res.metrics["reward/latency_ms"] > 0
    res = s.score([comp], [{"answer": "(x+1)^2"}])
    assert res.metrics["reward/slow_path"] == 0 and res.metrics["reward/cache_hits"] == 1


def test_countdown_rows_are_checked_by_evaluation():
    s = RewardScorer(["accuracy"])
    row = {"task": "countdown", "numbers": [2, 3, 5], "target": 16, "answer": "16"}
    res = s.score(["\\boxed{(3+5)*2}", "\\boxed{16}", "\\boxed{3*5+2}"], [row] * 3)
    assert res.components["accuracy"] == [1.0, 0.0, 0.0]


def test_format_reward():
    assert format_reward(GOOD, SAMPLE) == 1.0
    assert format_reward("12+34=46\n</think>\n\\boxed{46}", SAMPLE) == 1.0  # <think> was in the prompt
    assert format_reward("<think>\n</think>\n\\boxed{46}", SAMPLE) == 0.0    # empty reasoning
    assert format_reward("<think>x</think> 46", SAMPLE) == 0.0              # no boxed answer
    assert format_reward("\\boxed{46}", SAMPLE) == 0.0                       # no think block
    assert format_reward("<think>a</think><think>b</think>\\boxed{1}", SAMPLE) == 0.0


def test_overlong_penalty():
    assert overlong_penalty(100, 512, 128) == 0.0
    assert overlong_penalty(384, 512, 128) == 0.0
    assert overlong_penalty(448, 512, 128) == pytest.approx(-0.5)
    assert overlong_penalty(512, 512, 128) == pytest.approx(-1.0)
    assert overlong_penalty(900, 512, 128) == -1.0


def test_registry_errors_name_the_plugin():
    with pytest.raises(RewardPluginError, match="unknown reward 'acuracy'; known rewards: .*accuracy"):
        get("acuracy")
    with pytest.raises(RewardPluginError, match="'no_such_mod:f': cannot import module 'no_such_mod'"):
        get("no_such_mod:f")
    with pytest.raises(RewardPluginError, match="'plugins_for_tests:nope': module .* has no function 'nope'"):
        get("plugins_for_tests:nope")
    with pytest.raises(RewardPluginError, match="'accuracy' is already registered"):
        register("accuracy")(lambda c, s: 0.0)
    with pytest.raises(ValueError, match="2 weights for 1 functions"):
        RewardScorer(["accuracy"], [1.0, 2.0])


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "r1lab_ep_demo.py").write_text("def shout(c, s):\n    return 2.0 if c.isupper() else 0.0\n")
    dist = tmp_path / "r1lab_ep_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: r1lab-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [r1lab.rewards]
        shout = r1lab_ep_demo:shout
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "shout" in registry.known()
    assert get("shout").fn("ABC", {}) == 2.0


# ------------------------------------------------------------------------------------------- failed items
# plugins for the tests below, named as `test_reward_scorer:NAME` (tests/ is on sys.path)
def raises_on_odd(completion, sample):
    if int(sample["answer"]) % 2:
        raise RewardFailed(f"cannot score odd answer {sample['answer']}")
    return 0.5


def batched_with_failures(completions, samples):
    return ScoredBatch([Failed("sandbox unavailable") if s["answer"] == "3" else 1.0 for s in samples],
                       {"weak_frac": 0.25, "failed_frac": 0.9})  # a clashing key: the scorer's own count wins


batched_with_failures.r1lab_batched = True


def _rows(*answers):
    return [f"<think>x</think>\\boxed{{{a}}}" for a in answers], [{"answer": str(a)} for a in answers]


def test_plugin_failing_on_some_items():
    s = RewardScorer(["accuracy", "test_reward_scorer:raises_on_odd"], [1.0, 2.0], timeout_s=10, num_workers=1)
    try:
        comps, samples = _rows(2, 3, 4)
        res = s.score(comps, samples)
        assert res.failed == [False, True, False] and res.failed_by_fn["test_reward_scorer:raises_on_odd"] == [False, True, False]
        assert res.rewards[0] == 2.0 and math.isnan(res.rewards[1]) and res.rewards[2] == 2.0
        assert res.components["accuracy"] == [1.0, 1.0, 1.0]
        assert res.metrics["reward/failed_frac"] == pytest.approx(1 / 3)
        assert res.metrics["reward/test_reward_scorer.raises_on_odd/failed_frac"] == pytest.approx(1 / 3)
        assert res.metrics["reward/test_reward_scorer.raises_on_odd_mean"] == 0.5  # over items that did not fail
        assert res.metrics["reward/total_mean"] == 2.0 and res.metrics["reward/errors"] == 1
        assert "cannot score odd answer 3" in res.error_example
    finally:
        s.close()


def test_weight_zero_failures_are_counted_but_do_not_fail_items():
    s = RewardScorer(["accuracy", "plugins_for_tests:raises"], [1.0, 0.0], timeout_s=10, num_workers=1)
    try:
        comps, samples = _rows(2, 3)
        res = s.score(comps, samples)
        assert res.failed == [False, False] and res.rewards == [1.0, 1.0]
        assert res.failed_by_fn["plugins_for_tests:raises"] == [True, True]
        assert res.metrics["reward/errors"] == 2 and res.metrics["reward/failed_frac"] == 0.0
        assert res.metrics["reward/plugins_for_tests.raises/failed_frac"] == 1.0
        assert math.isnan(res.metrics["reward/plugins_for_tests.raises_mean"])
    finally:
        s.close()


def test_batched_plugin_returning_failed_entries_and_metrics():
    s = RewardScorer(["test_reward_scorer:batched_with_failures", "format"], [1.0, 0.5], num_workers=1)
    try:
        comps, samples = _rows(2, 3, 4)
        res = s.score(comps, samples)
        assert res.failed == [False, True, False]
        assert res.rewards[0] == 1.5 and math.isnan(res.rewards[1])
        assert res.metrics["reward/test_reward_scorer.batched_with_failures/weak_frac"] == 0.25
        assert res.metrics["reward/test_reward_scorer.batched_with_failures/failed_frac"] == pytest.approx(1 / 3)
        assert "sandbox unavailable" in res.error_example and res.metrics["reward/errors"] == 1
    finally:
        s.close()


def test_trusted_batched_reward_like_the_code_reward(monkeypatch):
    """In-process batched builtins (the code reward) may return Failed entries and a ScoredBatch, or raise."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register("fake_code", batched=True, trusted=True)(batched_with_failures)
    register("fake_code_down", batched=True, trusted=True)(lambda c, s: (_ for _ in ()).throw(OSError("no bwrap")))
    s = RewardScorer(["fake_code", "fake_code_down"], [1.0, 0.0])
    comps, samples = _rows(3, 4)
    res = s.score(comps, samples)
    assert res.failed == [True, False] and res.components["fake_code"][1] == 1.0
    assert res.failed_by_fn["fake_code_down"] == [True, True] and res.metrics["reward/errors"] == 3
    assert res.metrics["reward/fake_code/weak_frac"] == 0.25
    assert res.error_example == "reward 'fake_code' error: Failed: sandbox unavailable"
    res = RewardScorer(["fake_code_down"]).score(comps, samples)
    assert res.failed == [True, True] and res.error_example == "reward 'fake_code_down' error: raised OSError: no bwrap"


def test_accuracy_failures_are_failed_and_never_cached():
    s = RewardScorer(["accuracy", "format"], [1.0, 0.2], timeout_s=1.0)
    comps = [GOOD, GOOD, "<think>x</think>\\boxed{(x+1)^{99999}-(x+2)^{99998}}"]
    samples = [SAMPLE, {"answer": "\\frac{"}, {"answer": "(x+1)^{99999}"}]
    for _ in range(2):  # the second call grades again: a failed verdict is not remembered
        res = s.score(comps, samples)
        assert res.failed == [False, True, True] and res.rewards[0] == pytest.approx(1.2)
        assert math.isnan(res.components["accuracy"][1]) and math.isnan(res.components["accuracy"][2])
        assert res.metrics["reward/timeouts"] == 1 and res.metrics["reward/errors"] == 1
        assert res.metrics["reward/accuracy/failed_frac"] == pytest.approx(2 / 3)
        assert res.metrics["reward/accuracy_mean"] == 1.0 and res.metrics["reward/format_mean"] == 1.0
        assert res.metrics["reward/cache_hits"] <= 1  # only GOOD/SAMPLE can come from the cache
        assert "does not parse" in res.error_example


# ------------------------------------------------------------------------------------------- transient failures
# Flaky verifiers for the tests below: each call logs an attempt per item (a file per item, since pool workers
# are separate processes) and fails transiently when a RNG seeded by (seed, item, attempt) draws below `p`.
def _attempt_no(sample) -> int:
    log = Path(sample["log_dir"]) / f"item{sample['id']}.log"
    with open(log, "a") as f:
        f.write("x\n")
    return len(log.read_text().splitlines())


def _flakes(sample, attempt) -> bool:
    import random

    return random.Random(f"{sample['seed']}-{sample['id']}-{attempt}").random() < sample["p"]


def flaky(completion, sample):
    """A remote verifier that fails transiently (reset connection, HTTP 503, timeout) on a share p of calls."""
    import urllib.error

    attempt = _attempt_no(sample)
    if _flakes(sample, attempt):
        kind = attempt % 3
        if kind == 0:
            raise ConnectionResetError("verifier reset the connection")
        if kind == 1:
            raise urllib.error.HTTPError("http://verifier/score", 503, "Service Unavailable", {}, None)
        raise TimeoutError("verifier did not answer in 2 s")
    return float(len(completion))


def flaky_batched(completions, samples):
    """Batched: Failed(transient=True) for the items whose verifier call failed; logs the ids of each call."""
    with open(Path(samples[0]["log_dir"]) / "calls.log", "a") as f:
        f.write(" ".join(str(s["id"]) for s in samples) + "\n")
    return ScoredBatch([Failed("verifier busy (HTTP 503)", transient=True) if _flakes(s, _attempt_no(s))
                        else float(len(c)) for c, s in zip(completions, samples)], {"calls": 1.0})


flaky_batched.r1lab_batched = True


def hangs_first_time(completion, sample):
    if _attempt_no(sample) == 1:
        time.sleep(60)
    return 0.5


def wrong_gold(completion, sample):
    _attempt_no(sample)
    raise ValueError(f"gold answer {sample['id']!r} does not parse")


def _flaky_rows(tmp_path, n, p, seed=7):
    comps = [f"<think>x</think>\\boxed{{{'7' * (1 + i % 9)}}}" for i in range(n)]
    return comps, [{"answer": "7", "id": i, "seed": seed, "p": p, "log_dir": str(tmp_path)} for i in range(n)]


def _attempts(tmp_path, n):
    return [len((tmp_path / f"item{i}.log").read_text().splitlines()) for i in range(n)]


def _needed(samples):
    """Attempts each item needs, replaying the verifier's seeded draws (independent of the scorer)."""
    out = []
    for s in samples:
        k = 1
        while _flakes(s, k):
            k += 1
        out.append(k)
    return out


@pytest.mark.parametrize("name", ["test_reward_scorer:flaky", "flaky_trusted", "test_reward_scorer:flaky_batched"])
def test_flaky_reward_scores_every_item_after_retries(tmp_path, monkeypatch, name):
    """20% transient errors (seeded): every item gets its real value after retries, each item is attempted
    exactly as often as the verifier's draws require, and the retries are counted."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register("flaky_trusted", trusted=True)(flaky)   # a builtin: in-process, per item
    comps, samples = _flaky_rows(tmp_path, 40, p=0.2)
    needed = _needed(samples)
    assert max(needed) <= 4 and sum(needed) > 40     # with this seed: retries happen, 3 retries suffice
    s = RewardScorer([name], retries=3, retry_backoff_s=0.01, timeout_s=10, num_workers=1)
    try:
        res = s.score(comps, samples)
    finally:
        s.close()
    assert res.failed == [False] * 40 and res.components[name] == [float(len(c)) for c in comps]
    assert _attempts(tmp_path, 40) == needed
    key = metric_name(name)
    assert res.metrics[f"reward/{key}/retries"] == sum(needed) - 40 == res.metrics["reward/retries"]
    assert res.metrics["reward/errors"] == 0 and res.metrics[f"reward/{key}/failed_frac"] == 0
    if name.endswith("batched"):   # retried calls carry only the items that failed; the metrics of the first
        calls = [line.split() for line in (tmp_path / "calls.log").read_text().splitlines()]
        assert len(calls) == max(needed) and len(calls[0]) == 40
        assert [len(c) for c in calls[1:]] == [sum(n > k for n in needed) for k in range(1, max(needed))]
        assert res.metrics[f"reward/{key}/calls"] == 1.0


def _score_and_close(scorer, comps, samples):
    """(the scorer's result, wall seconds of the score call); the scorer is closed afterwards."""
    try:
        t0 = time.perf_counter()
        res = scorer.score(comps, samples)
        return res, time.perf_counter() - t0
    finally:
        scorer.close()


def test_always_transient_item_fails_after_exactly_retries_plus_one_attempts(tmp_path):
    comps, samples = _flaky_rows(tmp_path, 3, p=1.0)
    s = RewardScorer(["accuracy", "test_reward_scorer:flaky"], retries=2, retry_backoff_s=0.2, timeout_s=10,
                     num_workers=1)
    res, wall = _score_and_close(s, comps, samples)
    assert _attempts(tmp_path, 3) == [3, 3, 3]
    assert res.failed == [True] * 3 and all(math.isnan(r) for r in res.rewards)     # failed, never 0
    assert all(math.isnan(v) for v in res.components["test_reward_scorer:flaky"])
    assert res.failed_by_fn["accuracy"] == [False] * 3                              # the other function scored
    assert res.metrics["reward/test_reward_scorer.flaky/retries"] == 6 and res.metrics["reward/errors"] == 3
    assert res.error_example.endswith("raised ConnectionResetError: verifier reset the connection (transient; 3 "
                                      "attempt(s))")
    assert 0.2 + 0.4 <= wall < 0.6 + 5.0                                           # backoff 0.2 s, then 0.4 s


def test_an_item_that_timed_out_in_the_pool_is_retried(tmp_path):
    comps, samples = _flaky_rows(tmp_path, 1, p=0.0)
    s = RewardScorer(["test_reward_scorer:hangs_first_time"], retries=1, retry_backoff_s=0.01, timeout_s=1.0,
                     batch_timeout_s=30, num_workers=1)
    try:
        res = s.score(comps, samples)
    finally:
        s.close()
    assert res.failed == [False] and res.components["test_reward_scorer:hangs_first_time"] == [0.5]
    assert _attempts(tmp_path, 1) == [2] and res.metrics["reward/retries"] == 1
    assert res.metrics["reward/timeouts"] == 0                 # counted only when an item ends failed


def test_deterministic_failures_are_not_retried_and_backoff_stays_within_the_batch_deadline(tmp_path):
    comps, samples = _flaky_rows(tmp_path, 2, p=1.0)
    s = RewardScorer(["test_reward_scorer:wrong_gold"], retries=3, retry_backoff_s=0.01, num_workers=1)
    try:
        res = s.score(comps, samples)
    finally:
        s.close()
    assert _attempts(tmp_path, 2) == [1, 1] and res.failed == [True, True]
    assert res.metrics["reward/retries"] == 0 and "ValueError: gold answer 0 does not parse" in res.error_example
    for f in tmp_path.glob("item*.log"):
        f.unlink()
    s = RewardScorer(["test_reward_scorer:flaky"], retries=3, retry_backoff_s=30.0, batch_timeout_s=10.0,
                     num_workers=1)
    res, wall = _score_and_close(s, comps, samples)
    assert wall < 10.0 and _attempts(tmp_path, 2) == [1, 1]  # a 30 s backoff cannot fit in a 10 s deadline
    assert res.failed == [True, True] and "no time left for another within batch_timeout_s" in res.error_example


def test_which_errors_are_transient():
    import urllib.error

    from rewards.outcome import TransientRewardError, is_transient

    class Response:
        def __init__(self, status_code):
            self.status_code = status_code

    class HTTPStatusError(Exception):   # the shape of requests' / httpx's HTTP errors
        def __init__(self, status_code):
            super().__init__(f"HTTP {status_code}")
            self.response = Response(status_code)

    class ReadTimeout(Exception):       # a client library's timeout that is not a TimeoutError
        pass

    transient = [TransientRewardError("busy"), TimeoutError(), ConnectionRefusedError(), BrokenPipeError(),
                 urllib.error.URLError("name resolution failed"), ReadTimeout(),
                 urllib.error.HTTPError("u", 503, "down", {}, None), urllib.error.HTTPError("u", 429, "slow", {}, None),
                 HTTPStatusError(502), HTTPStatusError(408)]
    deterministic = [ValueError("bad gold"), KeyError("answer"), RewardFailed("cannot score"),
                     FileNotFoundError("plugin data"), urllib.error.HTTPError("u", 404, "no such route", {}, None),
                     HTTPStatusError(400), ZeroDivisionError()]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in deterministic] == [False] * len(deterministic)
