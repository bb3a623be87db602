"""The answer memory behind delayed labels: bounded, and able to say whether an id it
does not hold was never seen or forgotten."""

from __future__ import annotations

from exitserve.server.labels import FORGOTTEN_PER_REMEMBERED, Answered, AnswerMemory


def test_recent_answers_are_found_by_request_id() -> None:
    memory = AnswerMemory(capacity=3)
    memory.remember("a", "m", (1, 2))
    found = memory.lookup("a")
    assert isinstance(found, Answered) and found.model == "m" and found.classes == (1, 2)
    assert memory.lookup("b") == "unknown"


def test_the_oldest_answers_are_forgotten_and_reported_as_expired() -> None:
    memory = AnswerMemory(capacity=2)
    for request_id in "abc":
        memory.remember(request_id, "m", (0,))
    assert len(memory) == 2
    assert memory.lookup("a") == "expired"
    assert isinstance(memory.lookup("c"), Answered)


def test_forgotten_ids_are_bounded_too() -> None:
    memory = AnswerMemory(capacity=2)
    total = 2 + FORGOTTEN_PER_REMEMBERED * 2 + 1
    for i in range(total):
        memory.remember(str(i), "m", (0,))
    assert memory.lookup("0") == "unknown"  # beyond what is kept even of forgotten ids
    assert memory.lookup("1") == "expired"


def test_a_reused_request_id_means_its_latest_answer() -> None:
    memory = AnswerMemory(capacity=2)
    memory.remember("a", "m", (1,))
    memory.remember("b", "m", (0,))
    memory.remember("a", "m", (2,))  # "a" is now the newest
    memory.remember("c", "m", (0,))
    assert memory.lookup("b") == "expired"
    found = memory.lookup("a")
    assert isinstance(found, Answered) and found.classes == (2,)


def test_a_memory_of_zero_remembers_nothing() -> None:
    memory = AnswerMemory(capacity=0)
    memory.remember("a", "m", (1,))
    assert memory.lookup("a") == "unknown" and len(memory) == 0
