"""Pipeline schedules as data.

A schedule is, for every rank, the ordered list of :class:`Action` it runs in
one optimizer step: ``F m`` (forward of micro-batch m) or ``B m`` (its
backward). The runtime executes the list; :func:`simulate` runs it with
unit-time actions and the pipeline's dependencies, and :func:`grid` renders
that as a step x rank table (a string) for debugging.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


def gpipe(num_stages: int, micro_batches: int) -> list[list[Action]]:
    """All forwards, then all backwards (the most activation memory, simplest)."""
    _check(num_stages, micro_batches)
    one = [Action("F", m) for m in range(micro_batches)] + [Action("B", m) for m in range(micro_batches)]
    return [list(one) for _ in range(num_stages)]


def one_f_one_b(num_stages: int, micro_batches: int) -> list[list[Action]]:
    """1F1B: rank s warms up with S-1-s forwards, then alternates one forward
    and one backward, then drains the remaining backwards. At most S-s
    micro-batches are in flight on rank s."""
    _check(num_stages, micro_batches)
    plan = []
    for s in range(num_stages):
        warmup = min(num_stages - 1 - s, micro_batches)
        actions = [Action("F", m) for m in range(warmup)]
        f, b = warmup, 0
        while f < micro_batches:
            actions += [Action("F", f), Action("B", b)]
            f, b = f + 1, b + 1
        actions += [Action("B", m) for m in range(b, micro_batches)]
        plan.append(actions)
    return plan


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build(name: str, num_stages: int, micro_batches: int) -> list[list[Action]]:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_stages, micro_batches)


def _check(num_stages: int, micro_batches: int) -> None:
    if num_stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {num_stages} and {micro_batches}")


def simulate(plan: list[list[Action]]) -> list[list[Action | None]]:
    """Run ``plan`` with unit-time actions: F m on rank s waits for F m on
    s-1, B m waits for B m on s+1 (or F m on the last rank). Returns
    timeline[t][s]. Raises if the plan deadlocks."""
    num = len(plan)
    done: set[tuple[int, str, int]] = set()
    cursor = [0] * num
    timeline = []
    while any(c < len(p) for c, p in zip(cursor, plan)):
        row: list[Action | None] = [None] * num
        for s in range(num):
            if cursor[s] == len(plan[s]):
                continue
            a = plan[s][cursor[s]]
            if a.kind == "F":
                ready = s == 0 or (s - 1, "F", a.micro_batch) in done
            else:
                ready = (s, "F", a.micro_batch) in done and (s == num - 1 or (s + 1, "B", a.micro_batch) in done)
            if ready:
                row[s] = a
        if not any(row):
            raise RuntimeError(f"schedule deadlocks at step {len(timeline)}: next actions "
                               f"{[str(p[c]) if c < len(p) else '-' for c, p in zip(cursor, plan)]}")
        for s, a in enumerate(row):
            if a is not None:
                done.add((s, a.kind, a.micro_batch))
                cursor[s] += 1
        timeline.append(row)
    return timeline


def grid(plan: list[list[Action]]) -> str:
    """A printable step x rank table of ``plan`` (``.`` = idle)."""
    timeline = simulate(plan)
    header = "step " + " ".join(f"r{s:<3}" for s in range(len(plan)))
    lines = [header]
    for t, row in enumerate(timeline):
        lines.append(f"{t:<4} " + " ".join(f"{str(a) if a else '.':<4}" for a in row))
    return "\n".join(lines)
