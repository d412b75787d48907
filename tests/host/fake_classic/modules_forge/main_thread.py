"""Forge Classic's main thread (names as in tests/host/facts/classic.json): tasks run one at a time and keep their
result; a task queued with async_run (the start-up model load) stays on finished_list."""

from typing import Any

finished_list: list[Any] = []


class Task:
    def __init__(self, task_id: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task_id = task_id
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None

    def work(self) -> None:
        self.result = self.func(*self.args, **self.kwargs)
