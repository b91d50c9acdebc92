"""The task registry: name -> Task class (`pipelines/tasks/base.py` says what a task is).

Modules load on first use, so importing the registry costs nothing a task does not need.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.tasks.base import Task

# name -> "module:Class"; a finetuning issue adds its line here and nothing else in the loop.
TASKS: dict[str, str] = {
    "pretrain": "pipelines.tasks.pretrain:PretrainTask",
    "vqa": "pipelines.tasks.vqa:VQATask",
    "caption": "pipelines.tasks.caption:CaptionTask",
    "retrieval": "pipelines.tasks.retrieval:RetrievalTask",
    "grounding": "pipelines.tasks.grounding:GroundingTask",
    "nlvr2": "pipelines.tasks.classification:NLVR2Task",
    "snli_ve": "pipelines.tasks.classification:SnliVeTask",
    "video_retrieval": "pipelines.tasks.video:VideoRetrievalTask",
    "video_qa": "pipelines.tasks.video:VideoQATask",
    "video_caption": "pipelines.tasks.video:VideoCaptionTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered as `name`; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)
