"""The coach's context and system instruction: pure functions, no I/O."""

from __future__ import annotations

from coach_context import SessionContext, StepInfo, context_from_row, system_instruction


def make_context(**changes: object) -> SessionContext:
    fields: dict = dict(
        full_name="Maya Patel",
        user_data={"goal": "sleep 8 hours", "night_shifts": True},
        impact_title="Sleep better",
        impact_description="Feel rested by spring",
        step=StepInfo(
            order=2, title="No screens after 10", description="Phone in the kitchen", icon="📵"
        ),
        previous_step_title="Dim the lights",
        next_step_title="Same wake-up time",
        current_order=2,
        total_steps=5,
    )
    fields.update(changes)
    return SessionContext(**fields)


def test_instruction_names_the_person_and_their_profile() -> None:
    text = system_instruction(make_context())
    assert "Maya Patel" in text and "Address them as Maya" in text
    assert "- Goal: sleep 8 hours" in text
    assert "- Night shifts: true" in text


def test_instruction_carries_the_plan_step_neighbours_and_progress() -> None:
    text = system_instruction(make_context())
    for expected in [
        "Plan: Sleep better",
        "Feel rested by spring",
        "Current step: 📵 No screens after 10",
        "Phone in the kitchen",
        "Previous step: Dim the lights",
        "Next step: Same wake-up time",
        "Progress: step 2 of 5.",
    ]:
        assert expected in text


def test_first_and_last_steps_say_so() -> None:
    only = make_context(
        previous_step_title=None, next_step_title=None, current_order=1, total_steps=1
    )
    text = system_instruction(only)
    assert "Previous step: none, this is the first step." in text
    assert "Next step: none, this is the last step of the plan." in text


def test_an_empty_profile_is_stated_not_invented() -> None:
    assert "No profile details were given." in system_instruction(make_context(user_data={}))


def test_context_from_a_database_row() -> None:
    row = {
        "full_name": "Li Wei",
        "user_data": None,
        "impact_title": "Learn piano",
        "impact_description": None,
        "step_order": 7,
        "step_title": "Scales",
        "step_description": None,
        "step_icon": None,
        "previous_step_title": None,
        "next_step_title": "Chords",
        "current_order": 3,
        "total_steps": 4,
    }
    ctx = context_from_row(row)
    assert ctx.user_data == {} and ctx.impact_description == ""
    assert ctx.step == StepInfo(order=7, title="Scales")
    assert (ctx.current_order, ctx.total_steps) == (3, 4)
