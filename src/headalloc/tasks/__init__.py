"""Synthetic tasks, each a seeded generator with a fixed train/validation split."""

from headalloc.tasks.synthetic import TaskData, make_task, TASKS

__all__ = ["TASKS", "TaskData", "make_task"]
