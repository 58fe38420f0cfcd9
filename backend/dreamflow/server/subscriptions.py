"""The socket thread's subscriptions, indexed so that each loop turn costs what the active ones cost.

A subscription is a (peer, job) pair with a cursor: the next seq that peer should get. Three
indexes keep every operation proportional to what it touches, never to all subscriptions:
by job (a live event visits only that job's subscribers), by peer (a vanished peer's are dropped
at once), and ``waiting`` (those behind their job's log or blocked, which the replay pump feeds).
Peers are kept in the order they were last heard from, so subscriptions of peers silent for longer
than the timeout (clients ping every heartbeat) are expired from the front, a few per turn.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator

Key = tuple[bytes, str]  # (peer routing id, job id)


@dataclass
class Sub:
    """One subscription's delivery state."""

    cursor: int
    blocked_until: float = 0.0


class Subscriptions:
    """Subscriptions by (peer, job), with indexes by job and peer, the waiting set, and peer silence."""

    def __init__(self) -> None:
        self._subs: dict[Key, Sub] = {}
        self._by_job: dict[str, set[bytes]] = collections.defaultdict(set)
        self._by_peer: dict[bytes, set[str]] = collections.defaultdict(set)
        self.waiting: set[Key] = set()  # behind their job's log, or blocked: the pump's work list
        self._heard: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, key: Key) -> bool:
        return key in self._subs

    def get(self, key: Key) -> Sub | None:
        """The subscription, or None."""
        return self._subs.get(key)

    def add(self, peer: bytes, job: str, cursor: int, behind: bool) -> Sub:
        """Subscribe ``peer`` to ``job`` from ``cursor`` (replacing an older subscription of the pair)."""
        sub = self._subs[(peer, job)] = Sub(cursor)
        self._by_job[job].add(peer)
        self._by_peer[peer].add(job)
        if behind:
            self.waiting.add((peer, job))
        return sub

    def remove(self, key: Key) -> None:
        """End one subscription (no error if there is none)."""
        if self._subs.pop(key, None) is None:
            return
        peer, job = key
        self.waiting.discard(key)
        for index, outer, inner in ((self._by_job, job, peer), (self._by_peer, peer, job)):
            members = index.get(outer)
            if members is not None:
                members.discard(inner)
                if not members:
                    del index[outer]

    def of_job(self, job: str) -> list[tuple[bytes, Sub]]:
        """The job's subscribers and their subscriptions."""
        return [(peer, self._subs[(peer, job)]) for peer in self._by_job.get(job, ())]

    def drop_peer(self, peer: bytes) -> int:
        """End every subscription of a peer; how many there were."""
        jobs = list(self._by_peer.get(peer, ()))
        for job in jobs:
            self.remove((peer, job))
        self._heard.pop(peer, None)
        return len(jobs)

    def jobs(self) -> set[str]:
        """Job ids with at least one subscriber."""
        return set(self._by_job)

    def heard(self, peer: bytes, now: float) -> None:
        """Note that ``peer`` sent something at ``now`` (monotonic seconds)."""
        self._heard[peer] = now
        self._heard.move_to_end(peer)

    def expire(self, now: float, timeout: float, limit: int = 1000) -> Iterator[tuple[bytes, int]]:
        """Drop subscriptions of peers silent for over ``timeout`` s (oldest first, ``limit`` peers per call).

        Yields (peer, subscriptions dropped) for each peer that had any.
        """
        for _ in range(limit):
            if not self._heard:
                return
            peer, last = next(iter(self._heard.items()))
            if now - last <= timeout:
                return
            dropped = self.drop_peer(peer)
            if dropped:
                yield peer, dropped
