"""The response cache's Redis protocol, model-checked: two workers looking up one key, an invalidator, another key of
the same tag being stored, time passing, a crash and a lost reply, in every interleaving (see
``tests/support/model/cache_checker.py`` for what is modelled and checked, and docs/assurance.md for the figures).

The intact scripts must hold in every state reached; each broken variant of them (``cache_model.BROKEN``) must be
caught, with a shortest trace that shows the broken rule at work. A bigger configuration, outside the suite::

    HYPERION_LOCK_CACHE_MODEL_BIG=1 python3 -m pytest -q -s -p no:cacheprovider --timeout 0 \\
        tests/unit/test_cache_model.py
"""

from __future__ import annotations

import os

import pytest

from tests.support.model.cache_checker import Budget, Checker, Config, Invariant, Report
from tests.support.model.cache_model import (
    BROKEN,
    BeforeTagFix,
    CacheScripts,
    InvalidateKeyKeepsLease,
    PutWithoutHolderCheck,
    PutWithoutVersionCheck,
    PutWithoutVersionCheckKeepingStamp,
    ReadIgnoresHolder,
    RenewKeepsFirstRegistration,
)

#: Deep enough to exhaust the default configuration (its whole state space is explored: no state at the bound).
DEPTH = 40
#: The suite's configuration: one change + invalidation, one store of k2, one crash, one lost reply.
SUITE = Budget(crashes=1, replies=1, invalidations=1, others=1)
#: Outside the suite (HYPERION_LOCK_CACHE_MODEL_BIG=1): two rounds of change + invalidation, two stores of k2.
BIG = Budget(crashes=1, replies=1, invalidations=2, others=2)

#: For each broken variant: the invariant that catches it, and what its shortest trace must show (in order).
CAUGHT: dict[type[CacheScripts], tuple[Invariant, tuple[str, ...]]] = {
    PutWithoutHolderCheck: (Invariant.FRESH, ("lease won", "data of k changes", "invalidation of key k",
                                              "PUTs the value of data version 0 (namespace version 0): stored")),
    PutWithoutVersionCheck: (Invariant.FRESH, ("lease won", "data of k changes", "invalidation of the namespace",
                                               "PUTs the value of data version 0 (namespace version 0): stored")),
    InvalidateKeyKeepsLease: (Invariant.FRESH, ("lease won", "data of k changes", "invalidation of key k",
                                                "PUTs the value of data version 0 (namespace version 0): stored")),
    BeforeTagFix: (Invariant.FRESH, ("lease won", "someone READs k2", "invalidation of tag t returns (0 dropped)",
                                     "PUTs the value of data version 0 (namespace version 0): stored")),
    RenewKeepsFirstRegistration: (Invariant.FRESH, ("lease won", "RENEWs its lease: renewed",
                                                    "invalidation of tag t returns (0 dropped)",
                                                    "PUTs the value of data version 0 (namespace version 0): stored")),
    ReadIgnoresHolder: (Invariant.ONE_COMPUTATION, ("w1 READs k: lease won", "w2 READs k: lease won")),
}


def check(scripts: CacheScripts, budget: Budget = SUITE, stop: bool = False) -> Report:
    config = Config(depth=DEPTH, budget=budget, scripts=scripts, stop_at_first=stop)
    report = Checker(config).run()
    print(report.summary())
    return report


def in_order(trace: list[str], words: tuple[str, ...]) -> bool:
    """Each of ``words`` appears in a line of ``trace``, each after the line of the one before."""
    at = 0
    for word in words:
        at = next((i + 1 for i in range(at, len(trace)) if word in trace[i]), -1)
        if at < 0:
            return False
    return True


def test_the_scripts_keep_values_fresh_and_one_computation_per_lease_in_every_reachable_state() -> None:
    """The suite's configuration, or the bigger one with HYPERION_LOCK_CACHE_MODEL_BIG=1 (half a minute or more)."""
    report = check(CacheScripts(), BIG if os.environ.get("HYPERION_LOCK_CACHE_MODEL_BIG") else SUITE)
    assert not report.violations, report.summary()
    assert report.frontier == 0, "the state space is no longer exhausted within the bound: raise DEPTH"
    assert report.states > 20_000  # it reaches renewals, crashes, lost replies, every invalidation


def test_every_broken_variant_has_an_expectation() -> None:
    assert set(CAUGHT) == set(BROKEN)


@pytest.mark.parametrize("variant", BROKEN, ids=lambda v: v.__name__)
def test_a_broken_variant_is_caught_with_a_shortest_trace(variant: type[CacheScripts]) -> None:
    invariant, steps = CAUGHT[variant]
    report = check(variant(), stop=True)
    assert invariant in report.violations, report.summary()
    trace = report.violations[invariant].trace
    assert in_order(trace, steps), report.violations[invariant].timeline()
    assert len(trace) <= 6, "no longer a short trace: the bug hides behind more steps than it needs"


def test_the_3feb107_anomaly_needs_no_renewal_when_a_shorter_lived_entry_of_the_tag_is_stored() -> None:
    """Before 3feb107, a lease registered in a tag index that had no TTL left it so; the next PUT of an entry of that
    tag then gave the index key that entry's life. With that life shorter than the lease, the key expired with the
    registration in it while the lease was in its first TTL, not yet renewed."""
    report = check(BeforeTagFix(), stop=True)
    trace = report.violations[Invariant.FRESH].trace
    assert not any("RENEW" in line for line in trace), report.summary()


def test_the_version_check_of_put_is_not_what_keeps_values_fresh() -> None:
    """Without PUT's namespace-version check, the entry is still written under the version seen when the lease was
    taken, and READ drops an entry of an older version: no stale value is served. What the check saves is the write
    itself, and the waiters' wake-up ("retry", not "ok"). Goes red if the stamp or READ's version check goes."""
    report = check(PutWithoutVersionCheckKeepingStamp())
    assert not report.violations, report.summary()

