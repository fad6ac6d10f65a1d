"""Run inside lmms-eval's venv by tests/test_export_lmms.py: load and score the exported tasks.

``python lmms_eval_probe.py <include_path> <out.json>`` writes ``{"load": ..., "score": ...}``.

Load: builds the group ``mis_ground`` with lmms-eval's own TaskManager (chat task type, as a chat model such as Qwen3-VL gets it),
then for every document of every task builds what lmms-eval sends to a model: the prompt
text, the visuals and the chat messages (validated by lmms-eval's ``ChatMessages``). Writes,
per task, the question ids, prompts, number of images and of video frames, targets, repeats
and filter names, for the test to compare with ``questions.parquet``.

Score: feeds each document scripted
responses (right, wrong, unparseable, ambiguous, in turn) through the task's own
``process_results`` and metric aggregations, and writes the responses and the metrics, for
the test to compare with stage 06's scoring of the same responses.
"""

import json
import sys

from lmms_eval.evaluator_utils import get_subtask_list
from lmms_eval.protocol import ChatMessages
from lmms_eval.tasks import TaskManager, get_task_dict


def _tasks(include_path: str):
    manager = TaskManager(include_path=include_path, include_defaults=False)
    task_dict = get_task_dict(["mis_ground"], manager, task_type="chat")
    return task_dict, {name: task for sub in task_dict.values() for name, task in sub.items()}


def _scripted(doc, k: int) -> list[str]:
    """N responses of four kinds, rotating with the document number ``k``."""
    choices = list(doc["choices"])
    wrong = next(c for c in choices if c.lower() != str(doc["answer"]).lower())
    kinds = [f"Answer: {doc['answer']}", f"Answer: {wrong}", "I cannot tell from this.",
             f"Answer: {choices[0]} or {choices[1]}"]
    return [kinds[(k + t) % len(kinds)] for t in range(2)]


def score(tasks) -> dict:
    report = {}
    for name, task in tasks.items():
        items, responses = {}, []
        for k, doc in enumerate(task.test_docs()):
            texts = _scripted(doc, k)
            # what the evaluator passes: one request per document, its N filtered responses
            metrics = task.process_results(doc, [texts])
            for metric, value in metrics.items():
                items.setdefault(metric, []).append(value)
            responses += [{"question_id": doc["question_id"], "trial": t, "raw_text": r}
                          for t, r in enumerate(texts)]
        aggregation = task.aggregation()
        report[name] = {"responses": responses,
                        "metrics": {m: float(aggregation[m](v)) for m, v in items.items()}}
    return report


def load(task_dict) -> dict:
    groups = {str(k): v for k, v in get_subtask_list(task_dict).items()}
    report = {"groups": groups, "tasks": {}}
    for _group, subtasks in task_dict.items():
        for name, task in subtasks.items():
            docs = list(task.test_docs())
            entry = {"question_ids": [], "prompts": [], "targets": [], "images": 0,
                     "video_frames": 0, "videos": 0, "repeats": task.config.repeats,
                     "filters": [f.name for f in task._filters],
                     "output_type": task.OUTPUT_TYPE, "task_class": type(task).__name__}
            for doc in docs:
                messages = task.doc_to_messages(doc)
                chat = ChatMessages(messages=messages)
                images, videos, _ = chat.extract_media()
                entry["question_ids"].append(doc["question_id"])
                entry["prompts"].append(task.doc_to_text(doc))
                entry["targets"].append(task.doc_to_target(doc))
                entry["images"] += len(images)
                entry["videos"] += len(videos)
                entry["video_frames"] += sum(len(v) for v in videos)
                texts = [c.text for m in chat.messages for c in m.content if c.type == "text"]
                assert texts == [doc["text"]], (name, doc["question_id"], texts)
            report["tasks"][name] = entry
    return report


def main(include_path: str, out: str) -> None:
    task_dict, tasks = _tasks(include_path)
    with open(out, "w") as fh:
        json.dump({"load": load(task_dict), "score": score(tasks)}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
