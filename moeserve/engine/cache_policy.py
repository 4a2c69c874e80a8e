"""Which expert leaves a full cache: LRU, or LFU with exponential decay. Plain Python."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable


class CachePolicy(ABC):
    """Tracks the resident experts of one layer and picks eviction victims.

    `touch(e)` records a use, `admit(e)` a new resident, `evict(e)` its departure;
    `victim(candidates)` names the resident expert among `candidates` to evict first.
    """

    @abstractmethod
    def admit(self, expert: int) -> None: ...

    @abstractmethod
    def touch(self, expert: int) -> None: ...

    @abstractmethod
    def evict(self, expert: int) -> None: ...

    @abstractmethod
    def victim(self, candidates: Iterable[int]) -> int | None: ...

    def end_step(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called once per forward of the layer (LFU decays its scores here)."""


class LRUPolicy(CachePolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def admit(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def touch(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def evict(self, expert: int) -> None:
        del self._order[expert]

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = set(candidates)
        return next((e for e in self._order if e in allowed), None)

    def order(self) -> list[int]:
        """The residents, least recently used first."""
        return list(self._order)


class LFUPolicy(CachePolicy):
    """Least frequently used, with scores decayed every step so old popularity fades.

    A score survives eviction: an expert that comes back remembers its (decayed) history.
    Ties go to the least recently admitted/used expert.
    """

    def __init__(self, num_experts: int, decay: float) -> None:
        self.decay = decay
        self.score = [0.0] * num_experts
        self._last = [0] * num_experts
        self._clock = 0
        self._resident: set[int] = set()

    def admit(self, expert: int) -> None:
        self._resident.add(expert)
        self.touch(expert)

    def touch(self, expert: int) -> None:
        self.score[expert] += 1.0
        self._clock += 1
        self._last[expert] = self._clock

    def evict(self, expert: int) -> None:
        self._resident.discard(expert)

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = [e for e in candidates if e in self._resident]
        if not allowed:
            return None
        return min(allowed, key=lambda e: (self.score[e], self._last[e]))

    def end_step(self) -> None:
        self.score = [s * self.decay for s in self.score]


def make_policy(name: str, num_experts: int, decay: float = 0.9) -> CachePolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy(num_experts, decay)
    raise ValueError(f"unknown expert cache policy {name!r} (lru, lfu)")
