"""The source state machine: what a poll does, fed events and the time, no I/O."""

from __future__ import annotations

from ntspy.client.machine import (
    IBURST_COUNT,
    IBURST_INTERVAL,
    KE_BACKOFF_CONNECT_LOG2,
    KE_BACKOFF_MAX_LOG2,
    KE_BACKOFF_TLS_LOG2,
    MAX_POLL_LOG2,
    SourceMachine,
    Step,
)


def test_plain_source_always_sends_at_minpoll() -> None:
    m = SourceMachine(4, 6)
    for i in range(5):
        assert m.begin_poll(i * 16.0, have_keys=False) is Step.SEND
    assert m.interval() == 16.0 and m.polls == 5


def test_nts_source_without_keys_does_key_exchange_then_sends() -> None:
    m = SourceMachine(4, 6, nts=True)
    assert m.begin_poll(0.0, have_keys=False) is Step.KEY_EXCHANGE
    m.ke_succeeded(0.5, 1.8e9)
    assert m.ke.successes == 1 and m.ke.attempts == 0 and m.ke.last_success == 0.5
    assert m.begin_poll(16.0, have_keys=True) is Step.SEND


def test_key_exchange_backs_off_by_kind_and_doubles_to_the_cap() -> None:
    refused = SourceMachine(4, 6, nts=True)
    tls = SourceMachine(4, 6, nts=True)
    now = 0.0
    delays: list[tuple[float, float]] = []
    for _ in range(20):
        for m, connect in ((refused, True), (tls, False)):
            assert m.begin_poll(now, have_keys=False) is Step.KEY_EXCHANGE
            m.ke_failed(now, "no", connect=connect)
        delays.append((refused.ke.retry_at - now, tls.ke.retry_at - now))
        now = max(refused.ke.retry_at, tls.ke.retry_at)
    assert delays[0] == (2.0**KE_BACKOFF_CONNECT_LOG2, 2.0**KE_BACKOFF_TLS_LOG2)
    assert delays[1] == (2.0 ** (KE_BACKOFF_CONNECT_LOG2 + 1), 2.0 ** (KE_BACKOFF_TLS_LOG2 + 1))
    assert delays[-1] == (2.0**KE_BACKOFF_MAX_LOG2, 2.0**KE_BACKOFF_MAX_LOG2)


def test_no_key_exchange_before_the_back_off_ends_and_rekey_clears_it() -> None:
    m = SourceMachine(4, 6, nts=True)
    m.begin_poll(0.0, have_keys=False)
    m.ke_failed(0.0, "refused", connect=True)
    assert m.begin_poll(8.0, have_keys=False) is Step.SKIP
    assert m.ke.attempts == 1  # a skipped poll is no attempt
    m.rekey()
    assert m.begin_poll(9.0, have_keys=False) is Step.KEY_EXCHANGE


def test_keys_are_refreshed_after_ntsrefresh() -> None:
    m = SourceMachine(4, 6, nts=True, ntsrefresh=3600)
    m.begin_poll(0.0, have_keys=False)
    m.ke_succeeded(0.0, 1.8e9)
    assert m.begin_poll(3599.0, have_keys=True) is Step.SEND
    assert m.begin_poll(3600.0, have_keys=True) is Step.KEY_EXCHANGE


def test_iburst_polls_fast_then_minpoll() -> None:
    m = SourceMachine(6, 10, iburst=True)
    intervals = []
    for i in range(IBURST_COUNT + 2):
        m.begin_poll(float(i), have_keys=False)
        m.advise(5.0)  # burst samples say nothing about the interval
        intervals.append(m.interval())
    assert intervals[: IBURST_COUNT - 1] == [IBURST_INTERVAL] * (IBURST_COUNT - 1)
    assert intervals[IBURST_COUNT - 1] == 64.0
    assert m.poll == 8  # the two advices after the burst counted


def test_rate_kiss_doubles_the_interval_past_maxpoll_up_to_the_rfc_limit() -> None:
    m = SourceMachine(4, 6)
    for _ in range(3):
        m.kissed("RATE")
    assert m.poll == 7
    for _ in range(20):
        m.kissed("RATE")
    assert m.poll == MAX_POLL_LOG2
    m.kissed("DENY")
    assert m.poll == MAX_POLL_LOG2


def test_advice_moves_the_interval_within_minpoll_and_maxpoll() -> None:
    m = SourceMachine(4, 6)
    for _ in range(40):
        m.advise(0.25)
    assert m.poll == 6
    m.advise(-2.0)  # a bad miss takes off two steps at once
    assert m.poll == 4
    m.advise(-5.0)
    assert m.poll == 4
    m.advise(float("nan"))
    assert m.poll == 4


def test_renewal_after_a_nak_failing_backs_off_until_an_answer() -> None:
    m = SourceMachine(4, 6, nts=True)
    m.renewal_failed(100.0, "NTS-KE refused")
    assert m.ke.retry_at == 100.0 + 2.0**KE_BACKOFF_CONNECT_LOG2 and m.ke.attempts == 1
    assert m.begin_poll(101.0, have_keys=False) is Step.SKIP
    assert m.begin_poll(116.0, have_keys=False) is Step.KEY_EXCHANGE
    m.answered()  # an authenticated answer ends the run of failures
    assert m.ke.attempts == 0


def test_naks_without_an_authenticated_answer_back_off_doubling() -> None:
    # A forged NAK for every request: each renewal fails; the waits double, so the KE
    # server sees a handful of connections an hour, not one per poll.
    m = SourceMachine(-2, -2, nts=True)
    now, kes = 0.0, 0
    while now < 3600.0:
        if m.begin_poll(now, have_keys=False) is Step.KEY_EXCHANGE:
            kes += 1
            m.ke_succeeded(now, 1.8e9 + now)
            m.renewal_failed(now, "NTS NAK before any authenticated response")
        now += m.interval()
    assert kes <= 9, kes  # 16 s, 32 s, ... up to 2^12 s within the hour
    m.answered()  # one authenticated answer ends the back-off run
    assert m.ke.attempts == 0


def test_burst_polls_every_2_s_until_enough_answers_or_polls() -> None:
    """chronyc's burst good/max: answers end it after ``good``, silence after ``max``."""
    m = SourceMachine(6, 10)
    m.begin_poll(0.0, have_keys=False)
    assert m.interval() == 64.0
    m.burst(2, 4)
    assert m.bursting and m.interval() == IBURST_INTERVAL
    m.begin_poll(1.0, have_keys=False)
    m.answered()
    assert m.bursting
    m.begin_poll(3.0, have_keys=False)
    m.answered()
    assert not m.bursting and m.interval() == 64.0  # two good answers: done
    m.burst(3, 3)  # no answers at all: ends after three polls
    for i in range(3):
        assert m.bursting
        m.begin_poll(10.0 + 2 * i, have_keys=False)
        m.advise(-8.0)  # burst samples do not move the interval
    assert not m.bursting and m.poll == 6
