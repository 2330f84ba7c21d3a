"""The 2+2 judge: states 4 passes; 14, 42, 40 and silence fail; reasoning is stripped."""

import pytest

from harness.probes.validation import first_number, has_chat_template, is_correct


@pytest.mark.parametrize(
    "answer",
    [
        "4",
        "four",
        "Four.",
        "2 + 2 = 4",
        "2+2=4",
        "The answer is 4.",
        "4.0",
        " 4\n",
        "<think>2+2... carry nothing, so 5? no.</think>The answer is 4",
        "Two plus two is four.",
        "**4**",
        "It's 4, not 5.",
    ],
)
def test_passes(answer):
    assert is_correct(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "14",
        "42",
        "40",
        "forty-two",
        "five",
        "",
        "2+2",
        "<think>it is 4</think>",
        "The answer is 5. Not 4.",
        "3\n4",
        None,
    ],
)
def test_fails(answer):
    assert not is_correct(answer)


def test_first_number_ignores_echo():
    assert first_number("2 + 2 equals 4") == 4.0
    assert first_number("two and two make four") == 4.0


def test_chat_template_detection(tmp_path):
    assert not has_chat_template(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert has_chat_template(str(tmp_path))
    other = tmp_path / "b"
    other.mkdir()
    (other / "chat_template.jinja").write_text("{{ messages }}")
    assert has_chat_template(str(other))
