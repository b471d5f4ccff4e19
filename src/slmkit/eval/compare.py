"""Answer flips against a base model (MUSCLE, Echterhoff et al. 2024): what an accuracy delta hides.

A compressed or fine-tuned model can keep its accuracy while answering many items differently: items it now
gets right balance items it now gets wrong. `compare_tasks` puts, per task, the primary metric's delta next to
the share of items whose answer changed (`flips`), those that went from right to wrong (`negative_flips`, the
regressions a user of the base model would meet) and from wrong to right (`positive_flips`). Answers are the
choice picked by the primary metric (multiple choice: `acc_norm`) or the generated text (generation); items are
matched by index within a template, and each share is the mean over templates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slmkit.errors import UserError


def compare_tasks(base: dict[str, Any], model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task both report entries evaluated: delta of the primary metric (model - base), flip shares."""
    base_tasks = {t["task"]: t for t in base.get("tasks", [])}
    out = []
    for task in model.get("tasks", []):
        other = base_tasks.get(task["task"])
        if other is None or "items" not in task or "items" not in other:
            continue
        metric = task["primary_metric"]
        flips, negative, positive = [], [], []
        for template, answers in task["items"]["answers"].items():
            base_answers = other["items"]["answers"].get(template)
            if base_answers is None:
                continue
            if len(base_answers) != len(answers):
                raise UserError(
                    f"--compare: task {task['task']} has {len(base_answers)} items for the base and {len(answers)} "
                    "for the model; evaluate both with the same --limit"
                )
            right = np.asarray(task["items"]["correct"][template], dtype=bool)
            base_right = np.asarray(other["items"]["correct"][template], dtype=bool)
            changed = np.asarray([a != b for a, b in zip(answers, base_answers, strict=True)])
            flips.append(float(changed.mean()))
            negative.append(float((base_right & ~right).mean()))
            positive.append(float((~base_right & right).mean()))
        if not flips:
            continue
        out.append(
            {
                "task": task["task"],
                "metric": metric,
                "base": other["metrics"][metric]["mean"],
                "value": task["metrics"][metric]["mean"],
                "delta": task["metrics"][metric]["mean"] - other["metrics"][metric]["mean"],
                "flips": float(np.mean(flips)),
                "negative_flips": float(np.mean(negative)),
                "positive_flips": float(np.mean(positive)),
                "examples": task["examples"],
            }
        )
    return out
