"""``pallas_flash.tuning.search.screen_then_confirm``: the screen, the confirming rounds, the margin over the baseline.

CPU only: the candidates are strings and their timers fakes that return scripted times.
"""

from __future__ import annotations

import threading

import pytest

from pallas_flash.tuning.search import Search, fastest, screen_then_confirm


def _scripted(times: dict[str, list[float]], prepared: list | None = None, fail=()):
    """``prepare`` for candidates named in ``times``: each call of a candidate's timer returns its next scripted time
    (the last one repeated); ``fail``: names whose preparation raises."""
    lock = threading.Lock()

    def prepare(name):
        if name in fail:
            raise RuntimeError(f"{name} does not compile")
        with lock:
            if prepared is not None:
                prepared.append(name)
        script = list(times[name])

        def timer(min_time):
            assert min_time > 0
            return script.pop(0) if len(script) > 1 else script[0]

        return timer

    return prepare


def test_the_confirmed_fastest_wins_not_the_lucky_screen():
    # "lucky" screens fastest once, then runs slower than "steady" in every round
    times = {"lucky": [0.5, 1.2], "steady": [0.9, 0.9], "slow": [2.0], "base": [1.0]}
    logs = []
    best, t, record = screen_then_confirm(list(times), _scripted(times), logs.append, baseline="base",
                                          search=Search(top=2, rounds=3))
    assert best == "steady" and t == 0.9
    assert set(record["confirm"]) == {"'lucky'", "'steady'", "'base'"}  # the top 2 and the baseline
    assert record["screen"] == {"'lucky'": 0.5, "'steady'": 0.9, "'slow'": 2.0, "'base'": 1.0}
    assert record["pick"] == "'steady'" and record["baseline"] == "'base'"
    assert any("<- pick" in line and "steady" in line for line in logs)


@pytest.mark.parametrize("challenger, want", [(0.995, "base"), (0.98, "other")])
def test_the_baseline_stays_unless_beaten_by_the_margin(challenger, want):
    times = {"other": [challenger], "base": [1.0]}
    best, t, _ = screen_then_confirm(list(times), _scripted(times), lambda s: None, baseline="base",
                                     search=Search(top=1, rounds=3, margin=0.01))
    assert best == want and t == times[want][0]


def test_no_candidate_is_always_timed_last():
    """Identical kernels, but whichever is timed second in a round reads 5% slow (a clock that drifts within a
    round): with the order reversed every other round the bias evens out and the baseline (appended last to the
    shortlist) stays; in a fixed order it would read slow in every round and lose by more than the margin."""
    calls = []

    def prepare(name):
        def timer(min_time):
            calls.append(name)
            return 1.05 if len(calls) % 2 == 0 else 1.0  # two timed per round (and in the screen)

        return timer

    best, _, record = screen_then_confirm(["a"], prepare, lambda s: None, baseline="base",
                                          search=Search(top=1, rounds=4, margin=0.01))
    assert best == "base"
    assert record["confirm"] == {"'a'": [1.0, 1.05, 1.0, 1.05], "'base'": [1.05, 1.0, 1.05, 1.0]}


def test_a_baseline_outside_the_candidates_is_timed_too():
    times = {"a": [1.0], "b": [1.1], "base": [0.8]}
    prepared = []
    best, _, record = screen_then_confirm(["a", "b"], _scripted(times, prepared), lambda s: None, baseline="base",
                                          search=Search(top=1, rounds=2))
    assert best == "base" and prepared == ["a", "b", "base"] and "'base'" in record["confirm"]


def test_the_median_of_the_rounds_decides():
    # "a" has one bad round of five, "b" is always a little slower than a's median
    times = {"a": [1.0, 1.0, 3.0, 1.0, 1.0, 1.0], "b": [1.05]}
    best, t, record = screen_then_confirm(list(times), _scripted(times), lambda s: None, search=Search(top=2, rounds=5))
    assert best == "a" and t == 1.0 and len(record["confirm"]["'a'"]) == 5


def test_failures_are_skipped_and_logged_and_all_failing_raises():
    times = {"ok": [1.0], "bad": [0.1]}
    logs = []
    best, _, record = screen_then_confirm(list(times), _scripted(times, fail=("bad",)), logs.append)
    assert best == "ok" and "'bad'" not in record["screen"]
    assert [line for line in logs if "skip" in line] == ["    skip bad: RuntimeError: bad does not compile"]
    with pytest.raises(RuntimeError, match="no candidate config compiled"):
        screen_then_confirm(["bad"], _scripted(times, fail=("bad",)), lambda s: None)


def test_threads_prepare_each_candidate_once_and_pick_the_same():
    times = {f"c{i}": [1.0 + 0.01 * ((7 * i) % 13)] for i in range(13)}
    picks = []
    for threads in (1, 4):
        prepared = []
        best, t, _ = screen_then_confirm(list(times), _scripted(times, prepared), lambda s: None,
                                         search=Search(threads=threads))
        assert sorted(prepared) == sorted(times)
        picks.append((best, t))
    assert picks[0] == picks[1] == ("c0", 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(top=0), "top=0"), (dict(rounds=1.5), "rounds=1.5"), (dict(threads=True), "threads=True"),
     (dict(margin=-0.1), "margin=-0.1"), (dict(margin=1.0), "margin=1.0"), (dict(screen_s=0), "screen_s=0")],
)
def test_search_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Search(**kwargs)


def test_a_non_finite_time_never_wins():
    """A timer's NaN or inf (a failure, not a time) is skipped in the screen, puts a candidate last in the
    confirming rounds, and never comes back as the pick; ``fastest`` skips it too."""
    times = {"a": float("nan"), "b": 1.0, "c": 2.0}
    pick, t, _ = screen_then_confirm(list(times), lambda c: (lambda s: times[c]), lambda s: None,
                                     search=Search(top=3, rounds=2))
    assert (pick, t) == ("b", 1.0)
    assert fastest(list(times), lambda c: times[c], lambda s: None) == ("b", 1.0)
    confirm = {"a": iter([0.5, float("inf"), 0.5, 0.5]), "b": iter([1.0] * 4)}  # "a": fine in the screen only
    pick, t, _ = screen_then_confirm(["a", "b"], lambda c: (lambda s: next(confirm[c])), lambda s: None,
                                     search=Search(top=2, rounds=3))
    assert (pick, t) == ("b", 1.0)
    with pytest.raises(RuntimeError, match="finite time"):
        screen_then_confirm(["a"], lambda c: (lambda s: float("nan")), lambda s: None)
