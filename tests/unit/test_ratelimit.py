"""Rate limiting: token buckets per client, a bounded table."""

from __future__ import annotations

from ntspy.server.ratelimit import RateLimiter, Verdict

NOW = 1_800_000_000 * 10**9


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
