"""What the coach knows about the caller, and the system instruction built from it (pure functions)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepInfo:
    order: int
    title: str
    description: str = ""
    icon: str = ""


@dataclass(frozen=True)
class SessionContext:
    full_name: str
    user_data: Mapping[str, Any]
    impact_title: str
    impact_description: str
    step: StepInfo
    previous_step_title: str | None
    next_step_title: str | None
    current_order: int
    total_steps: int


def context_from_row(row: Mapping[str, Any]) -> SessionContext:
    """From the row of `get_session_context` (whose step and impact were found)."""
    return SessionContext(
        full_name=row["full_name"],
        user_data=row["user_data"] or {},
        impact_title=row["impact_title"],
        impact_description=row["impact_description"] or "",
        step=StepInfo(
            order=row["step_order"],
            title=row["step_title"],
            description=row["step_description"] or "",
            icon=row["step_icon"] or "",
        ),
        previous_step_title=row["previous_step_title"],
        next_step_title=row["next_step_title"],
        current_order=int(row["current_order"]),
        total_steps=int(row["total_steps"]),
    )


def system_instruction(ctx: SessionContext) -> str:
    """The coach persona, grounded in the caller's profile, plan, step and progress."""
    first_name = ctx.full_name.split()[0] if ctx.full_name.strip() else "there"
    lines = [
        f"You are a warm, practical voice coach talking with {ctx.full_name}. "
        f"Address them as {first_name}.",
        "Speak in short, natural sentences suited to a spoken conversation; ask one question at a "
        "time and keep the focus on the current step.",
        "Ground everything in the facts below; if something is not in them, ask rather than guess.",
        "",
        "## About the person",
        _profile(ctx.user_data),
        "",
        "## Their plan",
        f"Plan: {ctx.impact_title}",
    ]
    if ctx.impact_description:
        lines.append(f"Why and what: {ctx.impact_description}")
    lines += [
        "",
        "## The step to talk about",
        f"Progress: step {ctx.current_order} of {ctx.total_steps}.",
        f"Current step: {_step_line(ctx.step)}",
    ]
    if ctx.step.description:
        lines.append(f"What it involves: {ctx.step.description}")
    lines.append(
        f"Previous step: {ctx.previous_step_title}"
        if ctx.previous_step_title
        else "Previous step: none, this is the first step."
    )
    lines.append(
        f"Next step: {ctx.next_step_title}"
        if ctx.next_step_title
        else "Next step: none, this is the last step of the plan."
    )
    lines += [
        "",
        "Help them understand this step, plan when and how they will do it, and work through what "
        "is in the way. Encourage them; never shame. Do not give medical, legal or financial advice "
        "beyond general guidance.",
    ]
    return "\n".join(lines)


def _step_line(step: StepInfo) -> str:
    return f"{step.icon} {step.title}".strip()


def _profile(user_data: Mapping[str, Any]) -> str:
    if not user_data:
        return "No profile details were given."
    return "\n".join(f"- {_label(key)}: {_value(value)}" for key, value in user_data.items())


def _label(key: str) -> str:
    return str(key).replace("_", " ").strip().capitalize()


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
