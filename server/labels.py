"""Delayed labels: what the server answered for recent requests, by request id, so a true
class that arrives later (a user's correction, a reviewer's verdict) scores the answer.

Memory is bounded: the last ``capacity`` requests are remembered; older ones are
forgotten, and their ids are kept (up to ``FORGOTTEN_PER_REMEMBERED`` x ``capacity`` of them,
strings only) so that a late label is reported as expired rather than unknown.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

FORGOTTEN_PER_REMEMBERED = 5

Lookup = Literal["unknown", "expired"]


@dataclass
class Answered:
    request_id: str
    model: str
    classes: tuple[int, ...]  # the class answered for each image of the request, in order
    labelled: frozenset[int]  # images already scored


class AnswerMemory:
    """Entries are plain tuples of strings and ints, which the garbage collector stops
    tracking: ten thousand remembered answers as objects with a set each gave every full
    collection that many more objects to walk (the C=32 throughput with the memory on was
    5-8% below the same server with it off; with tuples the two measure the same)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[str, tuple[str, tuple[int, ...]]] = OrderedDict()
        self._labelled: dict[str, set[int]] = {}  # only requests that got a label
        self._forgotten: OrderedDict[str, None] = OrderedDict()  # an ordered set, oldest first

    def __len__(self) -> int:
        return len(self._answers)

    def remember(self, request_id: str, model: str, classes: tuple[int, ...]) -> None:
        if self.capacity <= 0:
            return
        answers = self._answers
        if request_id in answers:  # a reused id: the latest answer is the one labelled
            del answers[request_id]
            self._labelled.pop(request_id, None)
        answers[request_id] = (model, classes)
        if self._forgotten:
            self._forgotten.pop(request_id, None)
        if len(answers) > self.capacity:
            old_id, _ = answers.popitem(last=False)
            self._labelled.pop(old_id, None)
            self._forgotten[old_id] = None
            if len(self._forgotten) > FORGOTTEN_PER_REMEMBERED * self.capacity:
                self._forgotten.popitem(last=False)

    def lookup(self, request_id: str) -> Answered | Lookup:
        """The answer for ``request_id``, or why there is none."""
        if (answered := self._answers.get(request_id)) is not None:
            model, classes = answered
            return Answered(request_id, model, classes, frozenset(self._labelled.get(request_id, ())))
        return "expired" if request_id in self._forgotten else "unknown"

    def mark_labelled(self, request_id: str, image: int) -> None:
        self._labelled.setdefault(request_id, set()).add(image)
