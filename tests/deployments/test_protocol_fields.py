"""The README's table of request fields against the request models: every field a route knows
(implemented, refused unless neutral, or accepted without effect) has a row, and every row that
says "works" names fields a route implements."""

from __future__ import annotations

import re
from pathlib import Path

from deployments.request_fields import NO_EFFECT, UNSUPPORTED
from deployments.request_models import ChatCompletionRequest, CompletionRequest

README = Path(__file__).resolve().parents[2] / "README.md"
ROUTES = (CompletionRequest, ChatCompletionRequest)
# rows for other work streams of issue 17, whose fields are refused until those land
ELSEWHERE = ("(tool calling)", "(structured outputs)")


def table_rows() -> list[tuple[list[str], str]]:
    text = README.read_text()
    section = text[text.index("### Request fields"):]
    section = section[:section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append((re.findall(r"`([a-z_]+)`", cells[0]), cells[3]))
    return rows


def test_every_known_field_has_a_row():
    named = {f for fields, _ in table_rows() for f in fields}
    known = set(UNSUPPORTED) | set(NO_EFFECT)
    for route in ROUTES:
        known |= set(route.model_fields) | set(route._neutral_overrides)
    assert known - named == set()


def test_rows_that_say_works_name_implemented_fields():
    implemented = {f for route in ROUTES for f in route.model_fields}
    for fields, status in table_rows():
        if status.startswith("works") and not any(tag in status for tag in ELSEWHERE):
            assert set(fields) <= implemented, (fields, status)
        if status.startswith("400 unless"):
            assert all(f in UNSUPPORTED or any(f in r._neutral_overrides for r in ROUTES)
                       for f in fields), (fields, status)


def test_a_response_message_sent_back_whole_is_accepted_when_its_extra_keys_are_empty():
    import pytest
    from pydantic import ValidationError

    from deployments.chat_messages import ChatMessage

    echoed = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "tool_calls": None}
    assert ChatMessage.model_validate(echoed).for_template() == {"role": "assistant", "content": "hi"}
    for key, value in (("refusal", "no"), ("audio", {"id": "a"}), ("mood", None)):
        with pytest.raises(ValidationError, match=key):
            ChatMessage.model_validate({**echoed, key: value})
