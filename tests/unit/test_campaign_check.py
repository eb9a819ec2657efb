"""The fault campaign's checker (benchmarks/campaign_check.py) on made-up histories: the masters'
log lines as the reference app writes them, the store's rows, the fault. Each property is shown to
hold on a good round and to be reported on a round that breaks it."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any

from benchmarks.campaign_check import (
    CUT_LEADER_HOST,
    FAILED,
    FAULT_KINDS,
    HALTED,
    KILLED,
    READY,
    RESTART_EMPTY,
    SIGKILL_LEADER,
    SIGSTOP_LEADER,
    Fault,
    Finding,
    Round,
    StoreWrite,
    check_round,
    check_store_order,
    parse_log,
    round_line,
    rounds_from_json,
    settle,
    summarise,
)
from benchmarks.fault_campaign import schedule

T0 = float(int(time.time()))  # whole seconds: log lines carry milliseconds
GEN = "campaign-1-001"


def line(at: float, pid: int, logger: str, message: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f"{stamp},{round((at % 1) * 1000):03d} [{pid}] [INFO] {logger}: {message}"


def boot(master: int, pid: int, at: float) -> str:
    return line(at, pid, "gunicorn.error", f"Booting worker with pid: {pid}")


def told(pid: int, at: float, runner: int, token: int, here: bool = False) -> str:
    how = "ran here" if here else "was done by another worker"
    return line(
        at,
        pid,
        "demo.app",
        f"worker pid {pid}: job 'seed' {how} (runner vm:{runner}, fencing token {token}, 3.01 s)",
    )


def ready(pid: int, at: float) -> str:
    return line(at, pid, "demo.app", f"worker pid {pid}: startup finished; serving")


def sleeping(pid: int, at: float, token: int) -> str:
    return line(
        at,
        pid,
        "demo.jobs",
        f"seed: pid {pid} sleeping 3.0 s with fencing token {token} (HYPERION_DEMO_SEED_DELAY)",
    )


def wrote(pid: int, at: float, token: int) -> str:
    return line(
        at, pid, "demo.jobs", f"seed: pid {pid} inserted 3 item(s) with fencing token {token}"
    )


def clean_logs() -> dict[str, str]:
    """Host a's pid 101 leads (token 7) and writes; 102 (a) and 201 (b) wait and are told so; all
    serve."""
    a = [
        boot(100, 101, T0),
        boot(100, 102, T0 + 0.1),
        sleeping(101, T0 + 2, 7),
        wrote(101, T0 + 5, 7),
        told(101, T0 + 5.01, 101, 7, here=True),
        ready(101, T0 + 5.02),
        told(102, T0 + 5.03, 101, 7),
        ready(102, T0 + 5.04),
    ]
    b = [boot(200, 201, T0), told(201, T0 + 5.05, 101, 7), ready(201, T0 + 5.06)]
    return {"a": "\n".join(a) + "\n", "b": "\n".join(b) + "\n"}


def make_round(
    logs: dict[str, str],
    writes: list[tuple[int, int]],
    fault: Fault | None = None,
    reports: dict[int, Any] | None = None,
    killed: tuple[int, ...] = (),
    exited: dict[str, float] | None = None,
) -> Round:
    r = Round(
        1,
        GEN,
        T0,
        fault,
        {h: parse_log(h, text) for h, text in logs.items()},
        [StoreWrite(i, GEN, token, pid, T0 + 5 + i) for i, (pid, token) in enumerate(writes, 1)],
        reports or {},
        T0 + 20,
        60.0,
    )
    settle(r, killed, exited or {})
    return r


def rules(findings: list[Finding]) -> list[tuple[str, bool]]:
    return [(f.rule, f.anomaly) for f in findings]


def stop_fault(pid: int, host: str = "a", kind: str = SIGSTOP_LEADER) -> Fault:
    return Fault(kind, T0 + 3, T0 + 7, f"{host}:{pid}", pid, host)


def test_the_log_is_read_into_each_workers_history() -> None:
    log = parse_log("a", clean_logs()["a"])
    assert sorted(log.workers) == [101, 102]
    leader = log.workers[101]
    assert (leader.end, leader.ended, leader.booted) == (READY, T0 + 5.02, T0)
    assert [(r.token, r.started, r.ended, r.result) for r in leader.runs] == [
        (7, T0 + 2, T0 + 5, "wrote")
    ]
    assert leader.told == {"seed": (True, 101, 7)}
    assert log.workers[102].told == {"seed": (False, 101, 7)} and log.workers[102].runs == []


def test_a_clean_round_has_no_finding() -> None:
    reports = {
        pid: {
            "pid": pid,
            "generation": GEN,
            "jobs": {"seed": {"runner_pid": 101, "fencing_token": 7, "outcome": "done"}},
        }
        for pid in (101, 102, 201)
    }
    r = make_round(clean_logs(), [(101, 7)], reports=reports)
    assert check_round(r) == []
    s = summarise(r)
    assert (s.leaders, s.takeover, s.ends[READY]) == (1, False, 3)
    assert round_line(r, [], 5).endswith("; ok")


def test_a_stalled_leader_whose_late_write_is_refused_is_a_clean_takeover() -> None:
    logs = clean_logs()
    logs["b"] = (
        "\n".join(
            [
                boot(200, 201, T0),
                sleeping(201, T0 + 6, 8),
                wrote(201, T0 + 9, 8),
                told(201, T0 + 9.1, 201, 8, here=True),
                ready(201, T0 + 9.2),
            ]
        )
        + "\n"
    )
    logs["a"] = (
        "\n".join(
            [
                boot(100, 101, T0),
                boot(100, 102, T0 + 0.1),
                sleeping(101, T0 + 2, 7),
                line(
                    T0 + 9.5,
                    101,
                    "hyperion_lock.runonce.coordinator",
                    "seed: job failed after 7.50 s: LeaseLostError: "
                    "refusing to write: fencing token 8 (pid 201, generation g) already wrote for "
                    "'seed' after this worker's lease with token 7 began",
                ),
                line(
                    T0 + 9.6,
                    101,
                    "demo.app",
                    "worker pid 101: startup failed, this worker will exit: LeaseLostError: "
                    "refusing to write",
                ),
                line(T0 + 9.7, 100, "gunicorn.error", "Worker (pid:101) exited with code 3."),
                line(T0 + 9.8, 100, "gunicorn.error", "Worker (pid:102) was sent SIGTERM!"),
                line(T0 + 9.9, 100, "gunicorn.error", "Reason: Worker failed to boot."),
            ]
        )
        + "\n"
    )
    r = make_round(logs, [(201, 8)], fault=stop_fault(101), exited={"a": T0 + 10})
    assert check_round(r) == []
    workers = {w.pid: w for w in r.workers()}
    assert workers[101].end == FAILED and workers[101].runs[0].result == "raised"
    assert (workers[102].end, workers[102].ended) == (HALTED, T0 + 10)
    assert "Worker failed to boot" in workers[102].error
    s = summarise(r)
    assert s.takeover and s.raised == {"fence": 1}


def test_a_second_accepted_seed_is_allowed_only_after_a_fault_ended_the_first_leaders_lease() -> (
    None
):
    logs = clean_logs()
    logs["a"] = logs["a"].replace(
        told(101, T0 + 5.01, 101, 7, here=True) + "\n", ""
    )  # 101 never recorded done
    for t in ("a", "b"):
        logs[t] = logs[t].replace(
            "runner vm:101, fencing token 7", "runner vm:201, fencing token 8"
        )
    writes = [(101, 7), (201, 8)]
    allowed = check_round(make_round(logs, writes, fault=stop_fault(101)))
    assert rules(allowed) == [("second-run", False)]
    cut = Fault(CUT_LEADER_HOST, T0 + 3, T0 + 7, "a", None, "a")
    assert rules(check_round(make_round(logs, writes, fault=cut))) == [("second-run", False)]
    redis = Fault(RESTART_EMPTY, T0 + 3, T0 + 3, "redis :1")
    assert rules(check_round(make_round(logs, writes, fault=redis))) == [("second-run", False)]
    # The fault hit someone else (another pid, another host): the second run is an anomaly.
    assert rules(check_round(make_round(logs, writes, fault=stop_fault(102)))) == [
        ("one-seed", True)
    ]
    elsewhere = Fault(CUT_LEADER_HOST, T0 + 3, T0 + 7, "b", None, "b")
    assert rules(check_round(make_round(logs, writes, fault=elsewhere))) == [("one-seed", True)]
    assert rules(check_round(make_round(logs, writes))) == [("one-seed", True)]


def test_a_second_seed_after_done_was_recorded_is_an_anomaly() -> None:
    logs = clean_logs()  # 101 ran here (recorded done), yet the store takes a second run
    found = check_round(make_round(logs, [(101, 7), (201, 8)], fault=stop_fault(101)))
    assert ("one-seed", True) in rules(found)
    assert any("recorded done" in f.text for f in found)


def test_writes_out_of_token_order_overlap_in_the_stores_view() -> None:
    found = check_round(make_round(clean_logs(), [(201, 8), (101, 7)], fault=stop_fault(201, "b")))
    assert ("fence", True) in rules(found)
    same = check_round(make_round(clean_logs(), [(201, 7), (101, 7)], fault=stop_fault(201, "b")))
    assert ("fence", True) in rules(same)


def test_no_seed_at_all_is_an_anomaly() -> None:
    found = check_round(make_round(clean_logs(), []))
    assert ("one-seed", True) in rules(found)


def test_a_worker_without_an_end_or_too_late_or_without_a_reason_is_reported() -> None:
    logs = clean_logs()
    logs["b"] = boot(200, 201, T0) + "\n"  # never ended
    found = check_round(make_round(logs, [(101, 7)]))
    assert [f.text.split(" has ")[0] for f in found if f.rule == "bounded-end"] == ["worker b:201"]
    late = clean_logs()
    late["b"] = (
        "\n".join([boot(200, 201, T0), told(201, T0 + 70, 101, 7), ready(201, T0 + 70)]) + "\n"
    )
    assert rules(check_round(make_round(late, [(101, 7)]))) == [("bounded-end", True)]
    mute = clean_logs()
    mute["b"] = (
        "\n".join(
            [
                boot(200, 201, T0),
                line(
                    T0 + 6,
                    201,
                    "demo.app",
                    "worker pid 201: startup failed, this worker will exit: X: ",
                ),
            ]
        )
        + "\n"
    )
    r = make_round(mute, [(101, 7)])
    r.workers()[-1].error = ""  # what a worker that failed without saying why would leave
    assert rules(check_round(r)) == [("bounded-end", True)]


def test_killed_workers_end_with_the_fault() -> None:
    logs = clean_logs()
    logs["b"] = "\n".join([boot(200, 201, T0), sleeping(201, T0 + 1, 6)]) + "\n"
    r = make_round(
        logs,
        [(101, 7)],
        fault=Fault(SIGKILL_LEADER, T0 + 2, T0 + 2, "b:201", 201, "b"),
        killed=(201,),
    )
    killed = next(w for w in r.workers() if w.pid == 201)
    assert (killed.end, killed.ended, killed.runs[0].result) == (KILLED, T0 + 2, "killed")
    assert check_round(r) == []


def test_workers_must_agree_with_the_store_and_with_their_reports() -> None:
    logs = clean_logs()
    logs["b"] = logs["b"].replace(
        "runner vm:101, fencing token 7", "runner vm:101, fencing token 6"
    )
    assert ("agreement", True) in rules(check_round(make_round(logs, [(101, 7)])))
    two = clean_logs()
    two["b"] = two["b"].replace(
        "was done by another worker (runner vm:101", "ran here (runner vm:101"
    )
    assert any("more than one worker" in f.text for f in check_round(make_round(two, [(101, 7)])))
    report = {
        201: {
            "pid": 201,
            "generation": GEN,
            "jobs": {"seed": {"runner_pid": 101, "fencing_token": 6, "outcome": "done"}},
        }
    }
    assert rules(check_round(make_round(clean_logs(), [(101, 7)], reports=report))) == [
        ("agreement", True)
    ]


def test_a_logged_write_missing_from_the_store_is_an_anomaly() -> None:
    assert ("store", True) in rules(check_round(make_round(clean_logs(), [(999, 7)])))


def test_tokens_across_generations_only_fall_after_redis_lost_data() -> None:
    def rnd(number: int, kind: str | None) -> Round:
        fault = Fault(kind, T0, T0, "x") if kind else None
        return Round(number, f"g{number}", T0, fault, {}, [], {}, T0, 60.0)

    writes = [
        StoreWrite(1, "g1", 5, 1, T0),
        StoreWrite(2, "g2", 6, 2, T0),
        StoreWrite(3, "g3", 1, 3, T0),
    ]
    quiet = [rnd(1, SIGKILL_LEADER), rnd(2, SIGSTOP_LEADER), rnd(3, SIGKILL_LEADER)]
    assert rules(check_store_order(quiet, writes)) == [("fence", True)]
    lossy = [rnd(1, SIGKILL_LEADER), rnd(2, SIGSTOP_LEADER), rnd(3, RESTART_EMPTY)]
    assert check_store_order(lossy, writes) == []


def test_the_schedule_draws_every_fault_kind_once_per_block() -> None:
    kinds = schedule(12, random.Random(3))
    assert len(kinds) == 12
    assert sorted(kinds[:5]) == sorted(FAULT_KINDS) and sorted(kinds[5:10]) == sorted(FAULT_KINDS)
    assert kinds != schedule(12, random.Random(4))


def test_a_history_file_gives_back_the_same_rounds() -> None:
    """--history writes the rounds as JSON; --from-history checks them again from it."""
    r = make_round(clean_logs(), [(101, 7)], fault=stop_fault(101), reports={101: {"pid": 101}})
    again = rounds_from_json(json.loads(json.dumps({"rounds": [dataclasses.asdict(r)]})))
    assert again == [r]
