"""r1lab data: synthetic verifiable tasks, prompt templates and dataset loading shared by every stage."""
from data.loading import DataError, load_rows, load_dataset
from data.prompts import R1_INSTRUCTION, build_prompt, build_messages
from data.tasks import TASKS, make_task

__all__ = [
    "DataError", "load_rows", "load_dataset", "R1_INSTRUCTION", "build_prompt", "build_messages",
    "TASKS", "make_task",
]
