"""The timeline picture of one campaign round (matplotlib, PNG): one row per worker, from its boot
to its end.

Drawn: each worker's life (a thin line), the seed runs it led (a bar per fencing token, ending in
how the run ended), its end (serving, failed, stopped, killed), the fault (a shaded span), and the
store's accepted writes (dashed lines). matplotlib is imported here only, by ``--timeline``: the
campaign runs without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.campaign_check import (
    CUT_LEADER_HOST,
    FAILED,
    HALTED,
    KILLED,
    READY,
    SIGSTOP_LEADER,
    STOPPED,
    Round,
    Run,
    why_raised,
)

_END_STYLE = {  # end -> (marker, colour, legend label)
    READY: ("o", "#2e7d32", "serving"),
    FAILED: ("s", "#c62828", "startup failed (clear error)"),
    STOPPED: ("D", "#ef6c00", "stopped by its master"),
    HALTED: ("D", "#ef6c00", "stopped by its master"),
    KILLED: ("X", "black", "killed by the fault"),
}
_RUN_COLOURS = ("#1565c0", "#8e24aa", "#00838f", "#6d4c41")
_FAULT_NAMES = {
    "sigkill-leader": "leader SIGKILLed",
    "sigstop-leader": "leader SIGSTOPped",
    "cut-leader-host": "leader's host cut off",
    "failover": "Sentinel failover",
    "restart-empty": "Redis restarted empty",
}


def pick_round(rounds: Sequence[Round]) -> Round | None:
    """A round with a takeover; one where the stalled leader's late write was refused if there is
    one."""

    def takeover(r: Round) -> bool:
        return len({(x.pid, x.token) for x in r.runs()}) > 1

    def refused(r: Round) -> bool:
        return any(x.result == "raised" and why_raised(x.error) == "fence" for x in r.runs())

    candidates = [r for r in rounds if takeover(r)]
    best = [
        r
        for r in candidates
        if refused(r) and r.fault and r.fault.kind in (SIGSTOP_LEADER, CUT_LEADER_HOST)
    ]
    return (best or candidates)[0] if candidates else None


def timeline(r: Round, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    workers = sorted(r.workers(), key=lambda w: (w.host, w.booted))
    t0 = min([w.booted for w in workers] + [r.started])
    end = max([w.ended or r.ended for w in workers] + [r.fault.ended if r.fault else t0]) - t0 + 1
    fig, ax = plt.subplots(figsize=(9.6, 0.42 * len(workers) + 1.9), dpi=100)
    tokens = sorted({run.token for w in workers for run in w.runs})
    colour = {token: _RUN_COLOURS[i % len(_RUN_COLOURS)] for i, token in enumerate(tokens)}
    seen_labels: set[str] = set()

    def label(text: str) -> str:
        if text in seen_labels:
            return "_nolegend_"
        seen_labels.add(text)
        return text

    if r.fault is not None:
        ax.axvspan(
            r.fault.started - t0,
            max(r.fault.ended - t0, r.fault.started - t0 + 0.15),
            color="#ffcdd2",
            zorder=0,
            label=label(f"fault: {_FAULT_NAMES.get(r.fault.kind, r.fault.kind)}"),
        )
    for y, w in enumerate(workers):
        stop = (w.ended or r.ended) - t0
        ax.plot(
            [w.booted - t0, stop],
            [y, y],
            color="#9e9e9e",
            linewidth=1.2,
            zorder=1,
            label=label("worker alive (booting, waiting)"),
        )
        for run in w.runs:
            run_end = (run.ended or w.ended or r.ended) - t0
            ax.barh(
                y,
                run_end - (run.started - t0),
                left=run.started - t0,
                height=0.5,
                color=colour[run.token],
                zorder=2,
                label=label(f"leads the seed, fencing token {run.token}"),
            )
            ax.annotate(
                _run_text(run), (run_end, y), xytext=(4, 5), textcoords="offset points", fontsize=8
            )
        if w.end in _END_STYLE:
            marker, c, text = _END_STYLE[w.end]
            ax.plot(
                [stop],
                [y],
                marker=marker,
                color=c,
                markersize=7,
                linestyle="none",
                zorder=3,
                label=label(text),
            )
    for write in r.writes:
        ax.axvline(
            write.at - t0,
            color="#2e7d32",
            linestyle="--",
            linewidth=1,
            zorder=1,
            label=label("the store accepts a seed"),
        )
    ax.set_yticks(range(len(workers)), [f"host {w.host}  pid {w.pid}" for w in workers], fontsize=8)
    ax.set_ylim(len(workers) - 0.5, -0.5)
    ax.set_xlim(0, end + 2.5)  # room for the last run's label
    ax.set_xlabel("seconds since the first worker booted", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#eeeeee", zorder=0)
    accepted = ", ".join(f"token {w.token} (pid {w.pid})" for w in r.writes) or "nothing"
    ax.set_title(
        f"Fault campaign, round {r.number}: "
        f"{_FAULT_NAMES.get(r.fault.kind, '') if r.fault else ''}; "
        f"the store accepted {accepted}",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def _run_text(run: Run) -> str:
    if run.result == "raised":
        return {"fence": "write refused by the fence", "lease lost": "lease lost: no write"}.get(
            why_raised(run.error), f"raised {why_raised(run.error)}"
        )
    return {"wrote": "wrote", "killed": "killed", "unfinished": "?"}.get(run.result, run.result)
