"""The fair shard scheduler: its plan (pure), and its Redis transactions against a real server
(concurrent releasers, lost sends, a restart with AOF)."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from app.jobstore import JobStore
from app.scheduler import HeldJob, Schedule, Scheduler, plan, shards_ahead
from app.servers import RedisServer


def _job(id_: str, team: str, total: int, *, priority: str = "batch", cost: float = 1.0,
         held_at: float = 0.0) -> HeldJob:
    return HeldJob(id=id_, team=team, priority=priority, total=total, next=0, in_flight=0, cost=cost,  # type: ignore[arg-type]
                   held_at=held_at)


def _run(s: Schedule, n: int, **kw: object) -> list[str]:
    """Release n shards one at a time (each finishing at once), the jobs in release order."""
    out = []
    for _ in range(n):
        picks = plan(s, slots=1, **kw)  # type: ignore[arg-type]
        if not picks:
            break
        job, shard = picks[0]
        out.append(job)
        s.in_flight.pop(f"{job}:{shard}")
        s.jobs[job].in_flight -= 1
    return out


def test_teams_share_equally_whatever_their_backlog() -> None:
    s = Schedule(jobs={"bulk": _job("bulk", "a", 1000), "small": _job("small", "b", 3, held_at=5)})
    order = _run(s, 8)
    assert order[:6] == ["bulk", "small", "bulk", "small", "bulk", "small"]  # b's 3 shards go first-come
    assert order[6:] == ["bulk", "bulk"]


def test_weights_set_the_share_in_gpu_time() -> None:
    s = Schedule(jobs={"x": _job("x", "a", 1000), "y": _job("y", "b", 1000)})
    got = Counter(_run(s, 400, weights={"a": 3.0}))
    assert got == {"x": 300, "y": 100}
    # Shares are GPU-seconds, not shards: a team whose shards cost 10x gets a tenth of the shards.
    s = Schedule(jobs={"cheap": _job("cheap", "a", 10_000, cost=1.0), "dear": _job("dear", "b", 1000, cost=10.0)})
    got = Counter(_run(s, 1100))
    assert got == {"cheap": 1000, "dear": 100}


def test_interactive_first_within_a_team_then_round_robin() -> None:
    s = Schedule(jobs={"bulk": _job("bulk", "a", 100), "ci": _job("ci", "a", 2, priority="interactive", held_at=9),
                       "other": _job("other", "a", 100, held_at=1)})
    order = _run(s, 6)
    assert order[:2] == ["ci", "ci"]  # interactive before batch, though it came last
    assert order[2:] == ["bulk", "other", "bulk", "other"]  # batch jobs of the team take turns


def test_an_idle_team_banks_no_credit() -> None:
    s = Schedule(jobs={"x": _job("x", "a", 1000)})
    assert _run(s, 50) == ["x"] * 50  # team b was idle meanwhile
    s.jobs["y"] = _job("y", "b", 1000, held_at=1)
    order = _run(s, 20)
    assert Counter(order) == {"x": 10, "y": 10}  # y does not get 50 shards in a row


def test_slots_and_the_job_cap_bound_what_is_released() -> None:
    s = Schedule(jobs={"x": _job("x", "a", 10), "y": _job("y", "b", 10)})
    assert len(plan(s, slots=4)) == 4
    assert plan(s, slots=4) == []  # nothing finished: no room
    s = Schedule(jobs={"x": _job("x", "a", 10)})
    assert plan(s, slots=8, job_cap=3) == [("x", 0), ("x", 1), ("x", 2)]


def test_shards_ahead_matches_the_release_order() -> None:
    rng = random.Random(3)
    for _ in range(30):
        jobs = {f"j{i}": _job(f"j{i}", rng.choice("abc"), rng.randint(1, 20),
                              priority=rng.choice(["interactive", "batch"]), cost=rng.choice([1.0, 2.5, 10.0]),
                              held_at=i) for i in range(rng.randint(1, 6))}
        s = Schedule(jobs=jobs, vtime={t: rng.random() * 5 for t in "abc"})
        weights = {"a": 2.0}
        target = rng.choice(sorted(jobs))
        ahead = shards_ahead(s, target, weights)
        order = [j for j, _ in plan(s.copy(), slots=10_000, weights=weights)]
        assert ahead == order.index(target)


# ---- Redis ---------------------------------------------------------------------------------------


def _scheduler(store: JobStore, sent: list[tuple[str, int]], slots: int = 2, **kw: object) -> Scheduler:
    return Scheduler(store.r, send=lambda j, k: sent.append((j, k)), slots=lambda: slots, **kw)  # type: ignore[arg-type]


def test_release_holds_the_rest_and_finishing_frees_a_slot(store: JobStore) -> None:
    sent: list[tuple[str, int]] = []
    sched = _scheduler(store, sent)
    assert sched.hold("bulk", "a", "batch", 5, 1.0)
    assert not sched.hold("bulk", "a", "batch", 5, 1.0)  # a redelivered sampling task
    assert sched.release() == [("bulk", 0), ("bulk", 1)]
    assert sched.release() == []
    assert sched.hold("ci", "b", "interactive", 1, 1.0)
    assert sched.backlog().held == {("a", "batch"): 3, ("b", "interactive"): 1}
    assert sched.place("ci")["shards_ahead"] == 0  # type: ignore[index]
    assert sched.finished("bulk", 0) and not sched.finished("bulk", 0)  # once
    assert sched.release() == [("ci", 0)]  # team b's turn
    sched.finished("ci", 0)
    assert "ci" not in sched.snapshot().jobs  # nothing held or in flight: it left the schedule
    assert sched.release() == [("bulk", 2)]
    assert sent == [("bulk", 0), ("bulk", 1), ("ci", 0), ("bulk", 2)]
    there, in_flight, held = sched.forget("bulk")
    assert (there, in_flight, held) == (True, 2, 2)
    assert sched.release() == [] and sched.backlog().in_flight == 0


def test_concurrent_releasers_never_release_a_shard_twice(store: JobStore) -> None:
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def send(j: str, k: int) -> None:
        with lock:
            sent.append((j, k))

    for t in range(3):
        Scheduler(store.r).hold(f"job{t}", f"team{t}", "batch", 40, 1.0)
    scheds = [Scheduler(store.r, send=send, slots=lambda: 1000) for _ in range(8)]
    barrier = threading.Barrier(8)

    def go(s: Scheduler) -> None:
        barrier.wait()
        for _ in range(5):
            s.release()

    threads = [threading.Thread(target=go, args=(s,)) for s in scheds]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(sent) == sorted((f"job{t}", k) for t in range(3) for k in range(40))


def test_a_lost_send_is_sent_again(store: JobStore) -> None:
    calls: list[tuple[str, int]] = []

    def flaky(j: str, k: int) -> None:
        calls.append((j, k))
        if len(calls) == 1:
            raise ConnectionError("broker down")

    sched = Scheduler(store.r, send=flaky, slots=lambda: 1, resend_s=3600)
    sched.hold("x", "a", "batch", 3, 1.0)
    assert sched.release() == []  # the send failed: the shard stays released, dated back
    assert sched.release() == [("x", 0)]  # sent again, not a new shard
    sched.started("x", 0)
    assert sched.release() == []  # started: never resent, and no room for another
    # A sender that died between commit and send: resent once resend_s has passed unstarted.
    sched.finished("x", 0)
    dead = Scheduler(store.r, send=None, slots=lambda: 1, resend_s=0.0)
    assert dead.release() == []  # committed ("x", 1), could not send
    assert Scheduler(store.r, send=lambda j, k: calls.append((j, k)), slots=lambda: 1,
                     resend_s=0.0).release() == [("x", 1)]


def test_held_shards_survive_a_redis_restart(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "r").start()  # appendonly (AOF), as deployed
    try:
        store = JobStore.from_url(srv.url)
        sent: list[tuple[str, int]] = []
        sched = _scheduler(store, sent, slots=1)
        sched.hold("x", "a", "batch", 3, 1.0)
        assert sched.release() == [("x", 0)]
        srv.stop()
        srv.start()
        store = JobStore.from_url(srv.url)
        sched = _scheduler(store, sent, slots=1)
        assert sched.backlog().held == {("a", "batch"): 2} and sched.backlog().in_flight == 1
        sched.finished("x", 0)
        assert sched.release() == [("x", 1)]
    finally:
        srv.stop()


@pytest.mark.parametrize("bad", ["urgent", ""])
def test_hold_refuses_an_unknown_priority(store: JobStore, bad: str) -> None:
    with pytest.raises(ValueError, match="priority"):
        Scheduler(store.r).hold("x", "a", bad, 1, 1.0)  # type: ignore[arg-type]
