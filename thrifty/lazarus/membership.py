"""Who is in a Lazarus job: heartbeats, failure detection, agreement, fail-fast collectives.

Every worker keeps three connections to the coordinator
(:mod:`thrifty.lazarus.coordinator`): the main thread's store client, a
heartbeat thread's (``hb/<id>`` += 1 every ``heartbeat_interval_s``) and a
watchdog thread's, plus the liveness connection whose EOF tells the
coordinator the process is gone.

Detection. A member is *gone* when ``dead/<id>`` (the coordinator saw its
liveness connection close: a crash, SIGKILL, SIGTERM, normal exit) or
``left/<id>`` (its manager gave up after a local error) exists, or when its
heartbeat counter has not moved for ``failure_timeout_s`` (a SIGSTOPped or
hung process, which closes no socket). Staleness is judged on the watchdog's
own clock and the watchdog forgives everyone when it was itself starved
(its loop overslept by more than half the timeout): on a loaded machine a
delayed observer must not accuse the observed.

Fail fast. A gloo collective waiting for a peer that stopped answering only
raises after the group's timeout, and a rank whose peer died only notices if
it is reading from that very peer ("Connection closed by peer"); ranks
waiting on a *live* rank wait on. ``ProcessGroupGloo.abort()`` does not wake
a blocked collective on torch 2.13 (measured: no effect), but shutting down
the group's connected sockets does: the blocked call raises at once, and
every peer blocked on *us* sees EOF and raises too. So :class:`GlooSockets`
records the sockets each generation's group opened (the descriptors that
appeared while it was built), and the watchdog shuts them down as soon as a
watched member is gone; a rank leaving a generation for any reason does the
same, so the failure spreads through the group in milliseconds.

Agreement (one generation ``g``, from the members ``base`` of ``g - 1``):
each survivor writes ``in/<g>/<id>`` and waits until every member of
``base`` has either checked in or is gone; then it proposes the checked-in
members plus the live joiners waiting for admission through
``compare_set("members/<g>", "", proposal)``. The first proposal wins and
every survivor adopts it, so all agree even when their views of who is
alive differed for a moment. A member that finds itself left out was
declared gone (e.g. it was stopped for too long) and must not continue.
Before building the group, members write ``ready/<g>/<id>`` and wait for
each other while watching for deaths, so a member that dies during the
agreement costs a new generation, not a rendezvous timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from thrifty.lazarus.coordinator import LIVENESS_KEY, parse_address

__all__ = [
    "Agreement",
    "GenerationFailed",
    "GlooSockets",
    "MemberEvicted",
    "Membership",
    "client",
]

log = logging.getLogger(__name__)

_POLL_S = 0.01


class GenerationFailed(RuntimeError):
    """A member died while a generation was being formed: start the next one."""


class MemberEvicted(RuntimeError):
    """The survivors agreed on a member list without this process (it was presumed dead)."""


@dataclass(frozen=True)
class Agreement:
    """The members of generation ``gen`` (sorted ids) and how many joiners have been admitted."""

    gen: int
    members: tuple[int, ...]
    admitted: int
    joiners: tuple[int, ...]


class GlooSockets:
    """The connected sockets of one gloo process group, to shut down from another thread.

    Call :meth:`before` right before building the group and :meth:`after`
    once the rendezvous store client exists and again once the group is
    built: the connected sockets that appeared since :meth:`before` (not
    listeners) are the group's pairs and its rendezvous connection. Shutting
    the latter down makes a rendezvous waiting for a member that died before
    publishing its address fail at once. Each descriptor is remembered with
    its inode, so one that was closed and reused meanwhile is never touched.
    No other thread may open sockets in that window (the membership threads
    open theirs at start).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._before: dict[int, str] = {}
        self._fds: dict[int, str] = {}

    @staticmethod
    def _sockets() -> dict[int, str]:
        out = {}
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{name}")
                if target.startswith("socket:"):
                    out[int(name)] = target
        return out

    def before(self) -> None:
        self._before = self._sockets()

    def after(self) -> None:
        found = {}
        for fd, target in self._sockets().items():
            if self._before.get(fd) == target:
                continue
            sock = socket.socket(fileno=fd)
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None  # a listener, or not connected
            finally:
                sock.detach()
            if peer is not None:
                found[fd] = target
        with self._lock:
            self._fds.update(found)

    def forget(self) -> None:
        """The group is being destroyed: never touch its descriptors again."""
        with self._lock:
            self._fds = {}

    def shutdown(self) -> int:
        """Shut down every recorded socket still open; returns how many. Safe from any thread."""
        done = 0
        with self._lock:
            for fd, target in self._fds.items():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/self/fd/{fd}") != target:
                        continue
                    sock = socket.socket(fileno=fd)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                        done += 1
                    except OSError:
                        pass
                    finally:
                        sock.detach()
        return done


def client(host: str, port: int, namespace: str, timeout_s: float) -> dist.Store:
    """A new connection to the store, keys under ``namespace``."""
    store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(namespace, store)


class Membership:
    """This process's view of the job: its id, heartbeats, the watchdog, agreement.

    Args:
        address: the coordinator's ``host:port``.
        namespace: key prefix of this job in the store.
        heartbeat_interval_s / failure_timeout_s: see
            :class:`~thrifty.lazarus.manager.LazarusOptions`.
    """

    def __init__(
        self,
        address: str,
        namespace: str,
        heartbeat_interval_s: float,
        failure_timeout_s: float,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.namespace = namespace
        self.interval = heartbeat_interval_s
        self.timeout = failure_timeout_s
        self.store = client(self.host, self.port, namespace, 60.0)
        self.me = -1
        self.sockets = GlooSockets()
        self.failure = threading.Event()
        self.failure_reason = ""
        self.failure_at = 0.0  # wall time the watchdog saw it
        self.max_heartbeat_gap_s = 0.0  # the longest a watched heartbeat stood still, not gone
        self._watched: tuple[int, ...] = ()
        self._watch_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._liveness: socket.socket | None = None
        self._stale_since: dict[int, float] = {}  # wall time of the last counter change seen

    # ------------------------------------------------------------------ lifecycle

    def start(self, member_id: int) -> None:
        """Begin heartbeats and the watchdog as ``member_id``, and open the liveness connection."""
        self.me = member_id
        self.store.add(f"hb/{member_id}", 1)
        raw = dist.TCPStore(self.host, self.port, None, False, datetime.timedelta(seconds=60))
        if raw.check([LIVENESS_KEY]):
            host, port = parse_address(raw.get(LIVENESS_KEY).decode())
            self._liveness = socket.create_connection((host, port), timeout=10)
            self._liveness.sendall(f"{self.namespace}\t{member_id}\n".encode())
        else:
            log.warning(
                "no liveness port at the store %s:%d (not a thrifty.lazarus.coordinator?): a dead "
                "process is detected by its heartbeat only, after %.1fs",
                self.host,
                self.port,
                self.timeout,
            )
        for target, name in ((self._beat, "heartbeat"), (self._watch, "watchdog")):
            thread = threading.Thread(target=target, name=f"lazarus-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def leave(self, reason: str) -> None:
        """Tell the others this member is gone (a local error), and stop beating."""
        with contextlib.suppress(Exception):
            self.store.set(f"left/{self.me}", reason[:200])
            self.store.add("events", 1)
        self.sockets.shutdown()
        self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []
        if self._liveness is not None:
            self._liveness.close()
            self._liveness = None

    # ------------------------------------------------------------------ detection

    def watch(self, members: tuple[int, ...]) -> None:
        """Watch ``members`` (self excluded) from now on, and clear any earlier alarm."""
        with self._watch_lock:
            self._watched = tuple(m for m in members if m != self.me)
            now = time.time()
            # Keep the clocks of members watched before: a stopped member stays suspect.
            self._stale_since = {m: self._stale_since.get(m, now) for m in self._watched}
            self.failure.clear()
            self.failure_reason = ""

    def gone_reason(self, member: int) -> str | None:
        """Why ``member`` is gone per the store (dead or left), or None."""
        if self.store.check([f"dead/{member}"]):
            return "dead (its connection to the coordinator closed)"
        if self.store.check([f"left/{member}"]):
            return f"left: {self.store.get(f'left/{member}').decode()}"
        return None

    def gone_since(self, member: int) -> float | None:
        """Wall time the coordinator saw ``member``'s connection close, if it did."""
        if self.store.check([f"dead/{member}"]):
            return float(self.store.get(f"dead/{member}").decode())
        return None

    def stale(self, member: int) -> bool:
        with self._watch_lock:
            since = self._stale_since.get(member)
        return since is not None and time.time() - since > self.timeout

    def last_beat(self, member: int) -> float | None:
        with self._watch_lock:
            return self._stale_since.get(member)

    def is_gone(self, member: int) -> bool:
        return self.gone_reason(member) is not None or self.stale(member)

    def _dead_or_left(self, member: int) -> bool:
        return self.gone_reason(member) is not None

    def _beat(self) -> None:
        store = client(self.host, self.port, self.namespace, 10.0)
        while not self._stop.is_set():
            try:
                store.add(f"hb/{self.me}", 1)
            except Exception:  # the coordinator went away: nothing left to tell
                return
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        store = client(self.host, self.port, self.namespace, 10.0)
        counters: dict[int, int] = {}
        events = -1
        last_loop = time.time()
        period = min(self.interval, self.timeout / 4)
        previous: tuple[int, ...] = ()
        while not self._stop.wait(period):
            now = time.time()
            overslept = now - last_loop - period > self.timeout / 2
            last_loop = now
            with self._watch_lock:
                watched = self._watched
            if watched != previous:
                previous, events = watched, -1  # look at every newly watched member once
            if not watched:
                continue
            try:
                values = store.multi_get([f"hb/{m}" for m in watched])
                seen_events = store.add("events", 0)
                gone = []
                if seen_events != events:
                    events = seen_events
                    for m in watched:
                        if store.check([f"dead/{m}"]) or store.check([f"left/{m}"]):
                            gone.append(m)
            except Exception:
                return
            with self._watch_lock:
                if watched != self._watched:
                    continue  # watch() changed the set meanwhile
                for m, raw in zip(watched, values, strict=True):
                    value = int(raw)
                    if counters.get(m) != value or overslept:
                        if counters.get(m) is not None and counters[m] != value:
                            gap = now - self._stale_since[m]
                            self.max_heartbeat_gap_s = max(self.max_heartbeat_gap_s, gap)
                        counters[m] = value
                        self._stale_since[m] = now
                stale = [m for m in watched if now - self._stale_since[m] > self.timeout]
            if (gone or stale) and not self.failure.is_set():
                self.failure_reason = (
                    f"members {sorted(gone)} gone" if gone else f"members {stale} stopped beating"
                )
                self.failure_at = now
                self.failure.set()
                closed = self.sockets.shutdown()
                log.warning(
                    "member %d: %s; shut down %d gloo sockets", self.me, self.failure_reason, closed
                )

    # ------------------------------------------------------------------ agreement

    def register_joiner(self) -> tuple[int, int]:
        """A new process asks to join: returns (join number, member id)."""
        number = self.store.add("joins", 1)
        member = int(self.store.get("world0").decode()) + number - 1
        self.store.set(f"join/{number}", str(member))
        return number, member

    def joins_requested(self) -> int:
        return self.store.add("joins", 0)

    def agree(
        self,
        gen: int,
        base: tuple[int, ...],
        admitted: int,
        deadline_s: float,
        on_poll: Callable[[], None] | None = None,
        *,
        heartbeats: bool = True,
    ) -> Agreement:
        """Agree with the other survivors of ``base`` on the members of generation ``gen``.

        ``heartbeats=False`` counts a member as gone only once the coordinator
        saw it die or it left, not when its heartbeat stood still: while the
        initial members build their first group, one of them may sit inside
        gloo's connect for seconds without beating, and must not be evicted.

        Raises :class:`MemberEvicted` when the agreed list leaves this member out,
        :class:`TimeoutError` after ``deadline_s`` seconds without a verdict.
        """
        gone = self.is_gone if heartbeats else self._dead_or_left
        store = self.store
        store.set(f"in/{gen}/{self.me}", "1")
        key = f"members/{gen}"
        deadline = time.time() + deadline_s
        while True:
            if store.check([key]):
                break
            resolved = all(m == self.me or store.check([f"in/{gen}/{m}"]) or gone(m) for m in base)
            if resolved:
                alive = [m for m in base if store.check([f"in/{gen}/{m}"])]
                asked = self.joins_requested()
                joiners = []
                for number in range(admitted + 1, asked + 1):
                    if store.check([f"join/{number}"]):
                        member = int(store.get(f"join/{number}").decode())
                        if not self.is_gone(member) and store.check([f"hb/{member}"]):
                            joiners.append(member)
                proposal = {"members": sorted(alive + joiners), "admitted": asked}
                store.compare_set(key, "", json.dumps(proposal))
                break
            if time.time() > deadline:
                missing = [m for m in base if not store.check([f"in/{gen}/{m}"])]
                raise TimeoutError(
                    f"generation {gen}: members {missing} neither checked in nor were declared "
                    f"gone within {deadline_s:g}s"
                )
            if on_poll is not None:
                on_poll()
            time.sleep(_POLL_S)
        agreed = json.loads(store.get(key))
        members = tuple(agreed["members"])
        joiners = tuple(m for m in members if m not in base)
        for member in joiners:
            store.set(f"admit/{member}", str(gen))
        if self.me not in members:
            raise MemberEvicted(
                f"member {self.me}: the survivors agreed on generation {gen} = {list(members)} "
                "without it (presumed dead: stopped or too slow for failure_timeout_s)"
            )
        return Agreement(gen, members, agreed["admitted"], joiners)

    def wait_ready(
        self, agreement: Agreement, deadline_s: float, *, heartbeats: bool = True
    ) -> None:
        """Everyone of the agreement is about to build the group; any death -> next generation.

        ``heartbeats``: as in :meth:`agree`.
        """
        gone = self.is_gone if heartbeats else self._dead_or_left
        gen = agreement.gen
        self.store.set(f"ready/{gen}/{self.me}", "1")
        deadline = time.time() + deadline_s
        waiting = [m for m in agreement.members if m != self.me]
        while waiting:
            waiting = [m for m in waiting if not self.store.check([f"ready/{gen}/{m}"])]
            for m in waiting:
                if gone(m):
                    raise GenerationFailed(f"generation {gen}: member {m} is gone before regroup")
            if time.time() > deadline:
                raise GenerationFailed(f"generation {gen}: members {waiting} never got ready")
            if waiting:
                time.sleep(_POLL_S)

    def wait_admission(self, deadline_s: float) -> int:
        """A joiner: wait until some generation admits this member; returns that generation."""
        deadline = time.time() + deadline_s
        key = f"admit/{self.me}"
        while not self.store.check([key]):
            if self.store.check(["finished"]):
                raise TimeoutError(f"joiner {self.me}: the job finished before admitting it")
            if time.time() > deadline:
                raise TimeoutError(f"joiner {self.me}: not admitted within {deadline_s:g}s")
            time.sleep(_POLL_S)
        return int(self.store.get(key).decode())
