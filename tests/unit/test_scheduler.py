"""The striping scheduler as pure bookkeeping: no sockets, no threads, milliseconds."""

from __future__ import annotations

from netloader.client import Scheduler
from netloader.endpoint import Endpoint
from netloader.manifest import Chunk, Piece

A, B, C = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1), Endpoint("10.0.0.3", 1)
MIB = 1 << 20


def chunks(count: int, size: int = MIB) -> list[Chunk]:
    return [Chunk(i, (Piece(i, 0, size),), size) for i in range(count)]


def test_a_lone_source_takes_everything_in_one_batch() -> None:
    plan = Scheduler([A])
    assert plan.next_source() == A
    plan.load(chunks(10))
    batch = plan.take(A)
    assert len(batch) == 10 and plan.take(A) == []
    assert not plan.finished
    plan.done(A, batch, 1.0)
    assert plan.finished and plan.delivered == {str(A): 10 * MIB}


def test_first_batches_are_small_then_sized_by_measured_speed() -> None:
    plan = Scheduler([A, B], first_batch_bytes=8 * MIB, batch_seconds=0.25)
    plan.next_source(), plan.next_source()
    plan.load(chunks(1000))
    first_a, first_b = plan.take(A), plan.take(B)
    assert len(first_a) == len(first_b) == 8
    plan.done(A, first_a, 8 * MIB / (400 * MIB))  # A: 400 MiB/s
    plan.done(B, first_b, 8 * MIB / (100 * MIB))  # B: 100 MiB/s
    assert len(plan.take(A)) == 100  # 0.25 s at 400 MiB/s
    assert len(plan.take(B)) == 25


def test_near_the_end_each_source_takes_its_share_to_finish_together() -> None:
    plan = Scheduler([A, B])
    plan.next_source(), plan.next_source()
    plan.load(chunks(24))
    plan.done(A, plan.take(A), 8 * MIB / (300 * MIB))
    plan.done(B, plan.take(B), 8 * MIB / (100 * MIB))
    assert plan.pending_bytes == 8 * MIB
    assert len(plan.take(A)) == 6  # 3/4 of what is left, for the source 3x as fast


def test_a_failed_source_gives_back_what_it_did_not_deliver() -> None:
    plan = Scheduler([A, B, C])
    for _ in range(2):
        plan.next_source()
    plan.load(chunks(40))
    batch = plan.take(A)
    rest = plan.take(B)
    plan.failed(A, batch, batch[3:], "connection reset")
    assert list(plan.pending)[: len(batch) - 3] == batch[3:]  # back at the front
    assert plan.delivered == {str(A): 3 * MIB}
    assert plan.failures == [f"{A}: connection reset"]
    assert plan.next_source() == C  # the spare steps in
    plan.done(B, rest, 1.0)
    while batch := plan.take(C):
        plan.done(C, batch, 0.1)
    assert plan.finished
    assert sum(plan.delivered.values()) == 40 * MIB


def test_waiting_sources_rejoin_when_work_comes_back() -> None:
    plan = Scheduler([A, B])
    plan.next_source(), plan.next_source()
    plan.load(chunks(4))
    a_batch = plan.take(A)  # 2 chunks: half of what is pending, before speeds are known
    b_first, b_second = plan.take(B), plan.take(B)  # 1 each: half of the rest
    assert not plan.has_work and plan.take(B) == []
    plan.leave(B)
    plan.failed(A, a_batch, a_batch, "stalled")
    assert plan.has_work
    plan.rejoin(B)
    plan.done(B, b_first, 0.1)
    plan.done(B, b_second, 0.1)
    plan.done(B, plan.take(B), 0.1)
    assert plan.finished and plan.next_source() is None


def test_no_sources_left() -> None:
    plan = Scheduler([A])
    assert plan.next_source() == A and plan.next_source() is None


def test_taking_is_linear_in_the_number_of_chunks() -> None:
    """100,000 tiny chunks in one batch."""
    plan = Scheduler([A])
    plan.next_source()
    plan.load(chunks(100_000, 4096))
    batch = plan.take(A)  # quadratic, this took minutes (pytest's timeout would end it)
    assert len(batch) == 100_000


def test_a_source_that_dropped_its_connection_is_tried_again_once_nothing_else_is_left() -> None:
    plan = Scheduler([A, B])
    plan.next_source(), plan.next_source()
    plan.load(chunks(8))
    a_batch, b_batch = plan.take(A), plan.take(B)
    plan.failed(A, a_batch, a_batch, "connection lost", retry=True)
    assert plan.next_source() is None  # B still stands: A waits
    plan.failed(B, b_batch, b_batch, "digest mismatch")  # not to be tried again
    assert plan.next_source() == A and plan.tries[A] == 2
    batch = plan.take(A)
    assert len(batch) == 8  # alone now: everything
    plan.failed(A, batch, batch, "connection lost", retry=True)
    assert plan.next_source() is None  # once only
    lost, mismatch = f"{A}: connection lost", f"{B}: digest mismatch"
    assert plan.failures == [lost, mismatch, lost]


def test_a_source_tried_again_finishes_the_pull() -> None:
    plan = Scheduler([A])
    assert plan.next_source() == A
    plan.failed(A, [], [], "connection lost", retry=True)  # before the manifest came
    assert plan.next_source() == A
    plan.load(chunks(3))
    plan.done(A, plan.take(A), 0.1)
    assert plan.finished and plan.next_source() is None
