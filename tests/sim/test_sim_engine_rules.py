"""The simulator runs the daemon's engine, so the engine's gating rules show in its traces.

``simulate`` feeds every answered poll to :class:`~ntspy.sync.engine.SyncEngine`
in the order the sources are listed, as the daemon does when their answers come
in. A recording subclass of the engine is put in the simulator's place to see
which source's sample led to each clock update; the trace rows show what the
clock did. Rules checked: the start-up hold (whoever answers first cannot set
the clock alone), only the selected source's samples move the clock, and the
hold is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ntspy.sync import sim
from ntspy.sync.engine import STARTUP_HOLD_POLLS, Decision, Exchange, SyncEngine
from ntspy.sync.select import SourceState
from ntspy.sync.sim import SimServer, simulate

JITTER = 0.0005
POLL = 16.0


@dataclass(frozen=True)
class Fed:
    """One sample handed to the engine and what it decided."""

    key: str
    selected: str | None
    moved_clock: bool
    updates_before: int
    rejected: bool


class RecordingEngine(SyncEngine):
    fed: list[Fed] = []  # noqa: RUF012 -- reset by the fixture for every test

    def sample(self, key: str, now_ns: int, exchange: Exchange,
               pending_s: float = 0.0) -> Decision:
        before = self.updates
        decision = super().sample(key, now_ns, exchange, pending_s)
        RecordingEngine.fed.append(Fed(
            key, decision.selection.selected if decision.selection else None,
            decision.action is not None, before, decision.rejected is not None))
        return decision


@pytest.fixture
def fed(monkeypatch: pytest.MonkeyPatch) -> list[Fed]:
    RecordingEngine.fed = []
    monkeypatch.setattr(sim, "SyncEngine", RecordingEngine)
    return RecordingEngine.fed


def honest(name: str, delay: float) -> SimServer:
    return SimServer(name, one_way_delay_s=delay, jitter_s=JITTER)


@pytest.mark.parametrize("liar_position", [0, 1, 2])
def test_falseticker_answering_first_never_moves_the_clock(
        fed: list[Fed], liar_position: int) -> None:
    # The liar is half a second ahead and has the shortest path: were it alone,
    # it would be the best source. The clock starts 50 ms ahead.
    liar = SimServer("liar", error_s=0.5, one_way_delay_s=0.004, jitter_s=JITTER)
    servers = [honest("a", 0.010), honest("b", 0.012)]
    servers.insert(liar_position, liar)
    trace = simulate(servers, 1800, poll=POLL, seed=11, initial_offset_s=0.05)

    assert [f.key for f in fed[:3]] == [s.name for s in servers]
    # Every clock move follows the selection of an honest source; the liar's
    # samples at most re-run the selection (the first update may come with
    # its answer, once all have answered, but on the others' measurements).
    liar_led = [i for i, f in enumerate(fed) if f.moved_clock and f.selected == "liar"]
    assert liar_led == [], f"the liar led clock moves at {liar_led}"
    early = [i for i, f in enumerate(fed[:3]) if f.moved_clock and i < 2]
    assert early == [], f"the clock moved before every source had answered: {early}"
    # What the user sees: the clock only ever goes from +50 ms towards true
    # time, never towards the liar's +500 ms.
    errors = [r.clock_error_s for r in trace.rows]
    assert max(errors) <= 0.05 + 1e-3, max(errors)
    assert max(abs(e) for e in trace.errors_after(600)) < 1e-3
    assert all(r.states["liar"] is SourceState.FALSETICKER for r in trace.rows[1:])
    assert all(r.selected != "liar" for r in trace.rows)


def test_only_the_selected_sources_samples_move_the_clock(fed: list[Fed]) -> None:
    servers = [honest("a", 0.012), honest("b", 0.008), honest("c", 0.016)]
    trace = simulate(servers, 3600, poll=POLL, seed=4, initial_offset_s=0.02,
                     frequency_error_ppm=15.0)
    moves = [f for f in fed if f.moved_clock]
    assert len(moves) > 100
    later = [f for f in moves if f.updates_before > 0]
    assert all(f.key == f.selected for f in later), [f for f in later if f.key != f.selected]
    # The other sources were combined or not, but never updated the clock.
    unselected = [f for f in fed if f.updates_before > 0 and f.key != f.selected]
    assert len(unselected) > 100 and not any(f.moved_clock for f in unselected)
    # So one update per round, a poll interval apart (chrony's update interval).
    # (In the first round each source may be the selected one when it answers.)
    rounds = len(trace.rows)
    after_first_round = [f for f in fed[len(servers):] if f.moved_clock]
    assert abs(len(after_first_round) - (rounds - 1)) <= 2
    assert trace.tracking.update_interval == pytest.approx(POLL, rel=1e-3)
    assert trace.tracking.frequency_ppm == pytest.approx(-15.0, abs=1.0)


def test_update_interval_follows_the_reference_not_the_number_of_sources(
        fed: list[Fed]) -> None:
    one = simulate([honest("a", 0.010)], 1200, poll=POLL, seed=2, initial_offset_s=0.01)
    ones = sum(f.moved_clock for f in fed)
    fed.clear()
    five = simulate([honest(n, 0.010 + i * 0.001) for i, n in enumerate("abcde")], 1200,
                    poll=POLL, seed=2, initial_offset_s=0.01)
    fives = sum(f.moved_clock for f in fed)
    assert ones == len(one.rows)
    assert abs(fives - ones) <= 1, (ones, fives)
    assert five.tracking.update_interval == pytest.approx(POLL, rel=1e-3)


def test_startup_hold_waits_for_an_answering_source_at_most_eight_polls(
        fed: list[Fed]) -> None:
    # "broken" answers every poll, but its root dispersion (5 s, over maxdistance)
    # gets every sample rejected: it stays reachable with no samples, and the
    # good source waits for it, but only STARTUP_HOLD_POLLS polls.
    broken = SimServer("broken", one_way_delay_s=0.010, jitter_s=JITTER, root_dispersion=5.0)
    good = honest("good", 0.010)
    trace = simulate([broken, good], 600, poll=POLL, seed=6, initial_offset_s=0.05)
    assert all(f.rejected for f in fed if f.key == "broken")
    assert trace.stats["broken"].np == 0
    first_move = next(i for i, r in enumerate(trace.rows) if r.action is not None)
    assert first_move == STARTUP_HOLD_POLLS - 1
    # Until then the clock was left where it was.
    assert all(r.clock_error_s == pytest.approx(0.05, abs=1e-6)
               for r in trace.rows[:first_move + 1])
    assert abs(trace.rows[-1].clock_error_s) < 1e-3
    assert all(r.states["broken"] is SourceState.UNUSABLE for r in trace.rows)
