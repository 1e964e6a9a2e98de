"""Deliveries give way to the listener while clients send and relayd is short of CPU.

A client in session waits for each reply; a queued message waits for nobody in
particular, and Exchange Online's 30 messages a minute bound its delivery far below
what the listener accepts. Where both compete for the same cores (a fast upstream,
a burst of mail from the EAP), the deliveries' work slowed accepting by half on a
2-core VM (bench/README.md, "Deliveries give way to the listener"). Postfix gets the
same effect from its process model: twenty smtpd processes against three smtp ones.

So, while messages arrive quickly and relayd's own CPU is high, each route uses one
connection fewer than it may (at least one) and reads no message ahead; as soon as
either figure drops (the burst ends, or the deliveries wait on the network rather
than use the CPU, as they do with Exchange Online tens of milliseconds away) the
route widens again. Both figures are measured over a short window, so the decision
follows the load within a tenth of a second. Nothing is held: a delivery is always
allowed, and messages wait on disk meanwhile, as they would behind the rate limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW = 0.1  # seconds over which the arrival rate and the CPU share are measured
ARRIVALS_PER_SECOND = 100  # the EAP's bursts; a steady trickle never narrows delivery
CPU_SHARE = 0.5  # of one core: relayd's process, all its threads


class ListenerFirst:
    """Whether deliveries should go narrower now (one connection fewer, nothing read
    ahead); one for all the routes."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._since = clock()
        self._cpu_since = cpu_clock()
        self._arrivals = 0
        self._engaged = False

    def arrived(self) -> None:
        """A message was committed (the listener's ``notify``)."""
        self._arrivals += 1

    def engaged(self) -> bool:
        """True while the last full window saw a burst of arrivals and a busy process."""
        now = self._clock()
        elapsed = now - self._since
        if elapsed >= WINDOW:
            cpu = self._cpu_clock()
            self._engaged = (
                self._arrivals >= ARRIVALS_PER_SECOND * elapsed
                and cpu - self._cpu_since >= CPU_SHARE * elapsed
            )
            self._since, self._cpu_since, self._arrivals = now, cpu, 0
        return self._engaged
