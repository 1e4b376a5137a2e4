import sys
import textwrap
import time
from pathlib import Path

import pytest

from rewards import registry
from rewards.functions import format_reward, overlong_penalty
from rewards.registry import RewardPluginError, get, register
from rewards.scorer import RewardScorer

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
    assert res.components["plugins_for_tests:hangs"] == [0.0] * n
    assert res.components["plugins_for_tests:raises"] == [0.0] * n
    assert res.metrics["reward/timeouts"] == n and res.metrics["reward/errors"] == n
    assert res.rewards == [1.5] * n
    assert "plugins_for_tests:" in res.error_example
    assert "reward failures in this batch" in caplog.text


def test_scorer_still_works_after_failures(scorer):
    res = scorer.score([GOOD, "\\boxed{45}"], [SAMPLE, SAMPLE])
    assert res.components["accuracy"] == [1.0, 0.0]


def test_user_plugin_values_and_bad_return_counted():
    s = RewardScorer(["plugins_for_tests:brevity", "plugins_for_tests:returns_text"], timeout_s=5, num_workers=1)
    try:
        res = s.score(["ab", "abcd"], [SAMPLE, SAMPLE])
        assert res.components["plugins_for_tests:brevity"] == pytest.approx([1 / 3, 1 / 5])
        assert res.components["plugins_for_tests:returns_text"] == [0.0, 0.0]
        assert res.metrics["reward/errors"] == 2
    finally:
        s.close()


def test_cache_and_slow_path_metrics():
    s = RewardScorer(["accuracy"])
    comp = "\\boxed{\\{1,2\\}}"
    res = s.score([comp] * 4, [{"answer": "\\{2,1\\}"}] * 4)
    assert res.components["accuracy"] == [1.0] * 4
    assert res.metrics["reward/slow_path"] == 1 and res.metrics["reward/cache_hits"] == 3
    assert res.metrics["reward/latency_ms"] > 0


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
