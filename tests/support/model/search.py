"""The breadth-first search both model checkers (``checker.py``, run-once; ``cache_checker.py``, the cache) run.

A :class:`Search` explores the states a model reaches from its initial state, level by level up to a depth bound,
with de-duplication: every state found is recorded with its parent and the label of the step that led to it, so the
first violation of each invariant comes with a shortest trace (:func:`timeline`). A state reached by a violating step
is not explored further.

What a checker adds (the run-once checker's liveness pass, the cache checker's depth in its report) stays in the
checker: :meth:`Search.explored` is called with every expanded state and its steps.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

S = TypeVar("S", bound=Hashable)  # a model state
S_co = TypeVar("S_co", covariant=True)
I = TypeVar("I", bound=Hashable)  # an invariant's name  # noqa: E741
I_co = TypeVar("I_co", covariant=True)
C = TypeVar("C")  # a checker's configuration

Parents = dict[S, tuple[S, str] | None]


class Step(Protocol[S_co, I_co]):
    """A step of a model: its label, the state it leads to, the invariant it violates (and how), if any."""

    @property
    def label(self) -> str: ...

    @property
    def world(self) -> S_co: ...

    @property
    def violation(self) -> tuple[I_co, str] | None: ...


T = TypeVar("T", bound=Step[Any, Any])  # a model's step


class Bounds(Protocol):
    """How far a search goes (a checker's configuration)."""

    @property
    def depth(self) -> int: ...

    @property
    def max_states(self) -> int: ...

    @property
    def stop_at_first(self) -> bool: ...


@dataclass
class Violation(Generic[I]):
    invariant: I
    what: str
    trace: list[str]

    def timeline(self) -> str:
        name = self.invariant.value if isinstance(self.invariant, Enum) else self.invariant
        return f"VIOLATED {name}: {self.what}\n" + "\n".join(self.trace)


@dataclass
class Report(Generic[C, I]):
    """What a search found; each checker's report adds its own counts and its summary."""

    config: C
    states: int = 0
    transitions: int = 0
    frontier: int = 0  # states at the depth bound (not expanded)
    violations: dict[I, Violation[I]] = field(default_factory=dict)
    seconds: float = 0.0


def timeline(labels: Sequence[str]) -> list[str]:
    """Step labels as a readable timeline: the time (in ticks) before each step, ticks folded in."""
    out, t = [], 0
    for label in labels:
        if label.startswith("tick"):
            t += 1
            continue
        out.append(f"  t={t} {label}")
    return out


class Search(Generic[S, I, T]):
    """Breadth-first search of a model's states; a checker gives :meth:`initial` and :meth:`successors`."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds

    def initial(self) -> S:
        raise NotImplementedError

    def successors(self, state: S) -> Sequence[T]:
        raise NotImplementedError

    def explored(self, state: S, steps: Sequence[T]) -> None:
        """Called with every expanded state and its steps (nothing by default)."""

    def search(self, report: Report[Any, I]) -> tuple[Parents[S], int]:
        """Explore up to the depth bound (or the state limit, or the first violation if asked); ``report`` gets the
        states, the frontier left, the transitions and the violations (not the time: a checker times its whole run).
        Returns every state found with its parent link, and the number of levels expanded."""
        init = self.initial()
        parent: Parents[S] = {init: None}
        frontier = [init]
        levels = 0
        for _ in range(self.bounds.depth):
            frontier = self.expand(frontier, parent, report)
            levels += 1
            if not frontier or len(parent) > self.bounds.max_states:
                break
            if report.violations and self.bounds.stop_at_first:
                break
        report.states = len(parent)
        report.frontier = len(frontier)
        return parent, levels

    def expand(self, frontier: list[S], parent: Parents[S], report: Report[Any, I]) -> list[S]:
        nxt: list[S] = []
        for state in frontier:
            steps = self.successors(state)
            self.explored(state, steps)
            for step in steps:
                report.transitions += 1
                if step.violation is not None:
                    name, what = step.violation
                    if name not in report.violations:
                        labels = [*self.path(state, parent), step.label]
                        report.violations[name] = Violation(name, what, timeline(labels))
                    continue  # a violating state is not explored further
                if step.world not in parent:
                    parent[step.world] = (state, step.label)
                    nxt.append(step.world)
        return nxt

    @staticmethod
    def path(state: S, parent: Parents[S]) -> list[str]:
        """The labels of the steps from the initial state to ``state``."""
        labels: list[str] = []
        link = parent[state]
        while link is not None:
            state, label = link
            labels.append(label)
            link = parent[state]
        return labels[::-1]
