"""The watches' hub (daemon/hub.py): who gets which message and which removal.

Followers here are plain recorders: the hub's routing by session tag and by
scope (isolate_peers namespaces) is the part that must never leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nexusd.daemon.hub import Batch, Hub
from nexusd.storage.base import Added, Removed
from nexusd.storage.scope import NS_MARK
from nexusd.wire.errors import Lagged, NexusError

A = f"{NS_MARK}u1001{NS_MARK}"
B = f"{NS_MARK}u1002{NS_MARK}"


@dataclass(eq=False)
class Recorder:
    tag: str | None
    scope: str | None
    got: list[int] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    last_sent: int | None = None
    ended: list[NexusError | None] = field(default_factory=list)

    def offer(self, batch: Batch, removed: list[Removed]) -> None:
        self.got += [m.id for m, _ in batch.items]
        self.removed += removed

    def end(self, err: NexusError | None) -> None:
        self.ended.append(err)


def row(tag: str, content: str = "c") -> tuple[str, str, str, str, None, None]:
    return ("user", content, "2026-01-01T00:00:00.000000Z", tag, None, None)


def test_messages_go_to_their_sessions_and_scopes_only() -> None:
    hub = Hub(buffer=1 << 20)
    one_a = Recorder(A + "s", A)  # peer A's session s
    all_a = Recorder(None, A)  # every session of peer A
    all_b = Recorder(None, B)
    plain = Recorder(None, "")  # the daemon's own uid: unprefixed tags only
    everyone = Recorder(None, None)  # isolation off
    followers = [one_a, all_a, all_b, plain, everyone]
    for f in followers:
        hub.add(f)
    hub.publish([Added(10, [row(A + "s"), row(B + "s"), row("s"), row(A + "t")])])
    assert one_a.got == [10]
    assert all_a.got == [10, 13]
    assert all_b.got == [11]
    assert plain.got == [12]
    assert everyone.got == [10, 11, 12, 13]
    for f in followers:
        hub.remove(f)
    assert hub.count == 0


def test_removals_reach_only_the_watches_they_concern() -> None:
    hub = Hub(buffer=1 << 20)
    one_a, all_a, all_b, plain = (
        Recorder(A + "s", A),
        Recorder(None, A),
        Recorder(None, B),
        Recorder(None, ""),
    )
    for f in (one_a, all_a, all_b, plain):
        hub.add(f)
    pop_b = Removed(B + "s", ids=(5,))
    clear_all_a = Removed(None, before_id=99, scope=A)
    clear_all_plain = Removed(None, before_id=99, scope="")
    hub.publish([pop_b, clear_all_a, clear_all_plain])
    assert one_a.removed == [clear_all_a]
    assert all_a.removed == [clear_all_a]
    assert all_b.removed == [pop_b]
    assert plain.removed == [clear_all_plain]


def test_the_messages_of_several_sessions_reach_an_all_watch_in_id_order() -> None:
    hub = Hub(buffer=1 << 20)
    everyone = Recorder(None, None)
    hub.add(everyone)
    hub.publish([Added(1, [row("x"), row("y"), row("x"), row("z"), row("y")])])
    assert everyone.got == [1, 2, 3, 4, 5]


def test_interrupt_ends_every_watch_lagged_at_what_it_was_sent() -> None:
    # Storage shared with other daemons lost touch for too long: commits may have
    # been missed, so every watch ends lagged at its own last id and resumes from history.
    hub = Hub(buffer=1 << 20)
    one, every = Recorder("s", None, last_sent=7), Recorder(None, None)
    hub.add(one)
    hub.add(every)
    hub.interrupt()
    assert [type(e) for e in one.ended] == [Lagged] and [type(e) for e in every.ended] == [Lagged]
    assert [e.last_id for e in one.ended if isinstance(e, Lagged)] == [7]
    assert [e.last_id for e in every.ended if isinstance(e, Lagged)] == [None]
    assert hub.lagged == 2
