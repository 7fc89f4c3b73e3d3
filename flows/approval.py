"""A person's approval before a challenger replaces the champion (`promotion.require_approval`).

The retraining run records the challenger as *pending* in the registry, publishes the champion-vs-challenger
table (with intervals and n) as an artifact and in the form's description, and suspends itself with
`suspend_flow_run(wait_for_input=ApprovalForm)`: its process exits and the worker slot is free (with the
pool's limit of 1, other runs go on meanwhile). Resume it from the UI (the run's *Resume* button shows the
form) or the API (`resume_flow_run(id, run_input={...})`): the run starts again from the top, every stage is
a cached hit, and this call returns the answer, which promotes or rejects the pending challenger in place.
No answer within `promotion.approval_timeout_hours` is a rejection the registry records ("no answer within N
hours"; Prefect fails the suspended run at the same deadline).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import Field
from prefect.input import RunInput

from loraflow.config import PipelineConfig
from loraflow.ops.registry import Approval, Candidate, Registry


class ApprovalForm(RunInput):
    """Promote the challenger?"""

    approve: bool = Field(description="Tick to promote the challenger; leave unticked to keep the champion.")
    approver: str = Field(min_length=1, description="Your name (open-source Prefect has no user identity; it goes "
                                                    "into the registry).")
    comment: str = Field("", description="Why (recorded in the registry).")


class ApprovalNeedsDeployment(ValueError):
    """promotion.require_approval outside a deployment run: a suspended run could never be resumed."""


def check_can_ask(cfg: PipelineConfig) -> None:
    """Fail before any stage when approval is required but this run cannot be suspended and resumed."""
    from prefect.runtime import deployment

    if cfg.promotion.require_approval and not deployment.id:
        raise ApprovalNeedsDeployment(
            "promotion.require_approval suspends the run until a person answers, which needs a deployment run: start it "
            "with `prefect deployment run loraflow-retrain/<name>` (or from the UI), or set promotion.require_approval=false")


def table(entry: Candidate, champion: Candidate | None, test_score: float | None) -> str:
    """Markdown: champion vs challenger on validation (decided on) and test (reported), paired intervals, n."""
    from loraflow.metrics.bootstrap import fmt_interval

    metric = entry.metric

    def cell(score: float | None) -> str:
        return "–" if score is None else f"{100 * score:.2f}"

    rows = ["| | validation " + metric + " | test " + metric + " |", "|---|---|---|",
            f"| challenger `{entry.id}` | {cell(entry.score)} | {cell(entry.test_score)} |"]
    if champion is not None:
        rows.append(f"| champion `{champion.id}` | {cell(entry.champion_score)} | {cell(test_score)} |")
    if entry.validation is not None:
        rows.append(f"| challenger − champion (paired 95% CI, n={entry.validation['n']}) | "
                    f"{fmt_interval(entry.validation)} | {fmt_interval(entry.test) if entry.test else '–'} |")
    return "\n".join(rows)


def ask(registry: Registry, entry: Candidate, champion: Candidate | None, champion_test: float | None, stages,
        cfg: PipelineConfig) -> tuple[bool, str, Candidate]:
    """Record the challenger as pending with the stages it was judged on, publish the table, and suspend until a
    person answers (`answer`); returns (promoted, reason, the registry's candidate) only when it does not suspend:
    another run already asks about this very challenger."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from loraflow.ops.report import artifact_prefix

    hours = cfg.promotion.approval_timeout_hours
    other = registry.pending(entry.train_fingerprint)
    if other is not None:
        return False, (f"awaiting approval in flow run {other.approval.flow_run_id} (candidate {other.id}, until "
                       f"{other.approval.deadline})"), other
    deadline = (datetime.now(timezone.utc) + timedelta(hours=hours)).isoformat(timespec="seconds")
    handles = {name: getattr(stages, name).model_dump(mode="json") for name in ("data", "tokenized", "model", "trained", "scores")}
    pending = entry.model_copy(update={
        "promoted": False, "reason": f"awaiting approval until {deadline}; the rule says: {entry.reason}",
        "approval": Approval(deadline=deadline, timeout_hours=hours, flow_run_id=str(flow_run.id), rule_reason=entry.reason,
                             table=table(entry, champion, champion_test), stages=handles)})
    registry.record(pending)
    create_markdown_artifact(
        f"**Approval needed**: {entry.reason}\n\n{pending.approval.table}\n\nResume this flow run (its *Resume* "
        f"button) to approve or reject; no answer by {deadline} is a rejection.",
        key=f"{artifact_prefix()}-approval", description="Champion vs challenger, awaiting a person's approval")
    return answer(registry, pending, cfg)


def suspend_seconds(deadline: str, now: datetime | None = None) -> int:
    """Whole seconds to suspend for, so that Prefect fails an unanswered run at or just after the registry's
    `deadline`, never before it: a run Prefect has failed always reads as expired in the registry."""
    left = (datetime.fromisoformat(deadline) - (now or datetime.now(timezone.utc))).total_seconds()
    return max(1, math.ceil(left))


def answer(registry: Registry, pending: Candidate, cfg: PipelineConfig) -> tuple[bool, str, Candidate]:
    """Suspend until a person answers about `pending` (on a resumed run, the answer is there at once), then
    promote or reject it in the registry."""
    from prefect.flow_runs import suspend_flow_run

    form = ApprovalForm.with_initial_data(
        description=f"### Promote challenger `{pending.id}`?\n\n{pending.approval.rule_reason}\n\n{pending.approval.table}",
        approve=False, comment="")
    reply: ApprovalForm = suspend_flow_run(wait_for_input=form, timeout=suspend_seconds(pending.approval.deadline),
                                           key=f"approval-{pending.id}")
    verdict = "approved" if reply.approve else "rejected"
    reason = (f"{verdict} by {reply.approver}" + (f" ({reply.comment})" if reply.comment else "")
              + f"; the rule said: {pending.approval.rule_reason}")
    approval = pending.approval.model_copy(update={
        "status": verdict, "approver": reply.approver, "comment": reply.comment,
        "answered_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    from loraflow.ops.tracking import champion_now

    entry = registry.resolve(pending.id, reply.approve, reason, approval, champion_now(cfg))
    return entry.promoted, entry.reason, entry


def approval_of(state, stages) -> dict[str, Any] | None:
    """The latest approval asked about this run's challenger, for the flow's result."""
    for c in reversed(state.candidates):
        if c.train_fingerprint == stages.trained.fingerprint and c.approval is not None:
            return c.approval.model_dump()
    return None
