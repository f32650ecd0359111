"""``ratelimit``/``ntsratelimit`` verdicts over time (server/ratelimit.py): a bucket of
``burst`` tokens per client address, one token back every ``2**interval`` seconds, one
in ``2**leak`` of the limited requests let through.  Time is a value handed in."""

from __future__ import annotations

from ntspy.config import parse_config
from ntspy.server.ratelimit import RateLimiter, Verdict

S = 10**9
NOW = 1_800_000_000 * S
P, L, D = Verdict.PASS, Verdict.LEAK, Verdict.DROP


def test_rate_limit_burst_then_leak() -> None:
    limiter = RateLimiter(interval=3, burst=4, leak=1)
    verdicts = [limiter.check("a", NOW) for _ in range(8)]
    assert verdicts[:4] == [Verdict.PASS] * 4
    assert verdicts[4:] == [Verdict.DROP, Verdict.LEAK, Verdict.DROP, Verdict.LEAK]
    assert limiter.check("b", NOW) is Verdict.PASS  # other clients unaffected
    assert limiter.check("a", NOW + 8 * 10**9) is Verdict.PASS  # refilled after 2**3 s


def test_rate_limiter_table_is_bounded() -> None:
    limiter = RateLimiter(0, 1, 0, max_clients=100)
    for i in range(1000):
        limiter.check(str(i), NOW)
    assert len(limiter._buckets) == 100


def test_one_token_comes_back_per_interval() -> None:
    limiter = RateLimiter(interval=2, burst=2, leak=4)  # 4 s per token
    assert [limiter.check("c", NOW) for _ in range(3)] == [P, P, D]
    assert limiter.check("c", NOW + 3 * S) is D  # 3/4 of a token: not yet
    assert limiter.check("c", NOW + 4 * S) is P  # the whole token
    assert limiter.check("c", NOW + 4 * S) is D
    # A client polling exactly at the rate is never limited.
    t = NOW + 4 * S
    for _ in range(20):
        t += 4 * S
        assert limiter.check("c", t) is P


def test_an_idle_client_saves_up_no_more_than_burst() -> None:
    limiter = RateLimiter(interval=0, burst=3, leak=4)
    assert limiter.check("c", NOW) is P
    later = NOW + 3600 * S  # an hour idle: 3600 tokens earned, 3 kept
    assert [limiter.check("c", later) for _ in range(4)] == [P, P, P, D]


def test_sub_second_intervals() -> None:
    limiter = RateLimiter(interval=-2, burst=1, leak=4)  # a token every 0.25 s
    assert limiter.check("c", NOW) is P
    assert limiter.check("c", NOW + S // 8) is D
    assert limiter.check("c", NOW + S // 4) is P


def test_leak_lets_one_in_two_to_the_leak_through() -> None:
    limiter = RateLimiter(interval=10, burst=1, leak=2)
    assert limiter.check("c", NOW) is P
    limited = [limiter.check("c", NOW) for _ in range(12)]
    assert limited == [D, D, D, L] * 3
    assert RateLimiter(10, 1, 0).leak_every == 1  # leak 0: every limited request answered


def test_a_clock_going_back_earns_nothing() -> None:
    limiter = RateLimiter(interval=0, burst=1, leak=4)
    assert limiter.check("c", NOW) is P
    assert limiter.check("c", NOW - 100 * S) is D  # no tokens for negative time
    # ... and the bucket now counts from the earlier stamp.
    assert limiter.check("c", NOW - 99 * S) is P


def test_eviction_forgets_the_least_recently_seen_client() -> None:
    limiter = RateLimiter(interval=10, burst=1, leak=4, max_clients=3)
    for client in ("a", "b", "c"):
        assert limiter.check(client, NOW) is P
    assert limiter.check("a", NOW) is D  # "a" used its token and is seen again: kept
    assert limiter.check("d", NOW) is P  # a fourth client pushes out "b", the oldest
    assert set(limiter._buckets) == {"a", "c", "d"}
    assert limiter.check("a", NOW) is D  # still limited: its bucket survived
    assert limiter.check("b", NOW) is P  # forgotten, so a fresh bucket


def test_a_burst_of_zero_still_lets_one_through() -> None:
    assert RateLimiter(interval=0, burst=0, leak=4).check("c", NOW) is P


def test_the_directive_values_reach_the_limiter() -> None:
    rl = parse_config("ratelimit interval 1 burst 2 leak 1\n").ratelimit
    assert rl is not None
    limiter = RateLimiter(rl.interval, rl.burst, rl.leak)
    assert [limiter.check("c", NOW) for _ in range(4)] == [P, P, D, L]
    assert limiter.check("c", NOW + 2 * S) is P  # 2**1 s per token
