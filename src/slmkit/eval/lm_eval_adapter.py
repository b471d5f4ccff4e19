"""slmkit models as an lm-evaluation-harness model type, ``slmkit``.

lm-eval finds model types in its own registry; it has no plugin discovery, so this module must be
imported before lm-eval looks the name up. Three ways:

    slm eval runs/x/final --lm-eval hellaswag [--lm-eval-include DIR]    (`evaluate_lm_eval_tasks`)

    python -m slmkit.eval.lm_eval_adapter --model slmkit --model_args pretrained=runs/x/final --tasks ...

(the lm-eval command line, with ``slmkit`` registered), or from Python::

    import lm_eval, slmkit.eval.lm_eval_adapter  # noqa: F401  (registers "slmkit")
    lm_eval.simple_evaluate(model="slmkit", model_args="pretrained=runs/x/final", tasks=[...])

Log-likelihoods use the same batched scorer as `slm eval --tasks` (:func:`slmkit.eval.tasks.loglikelihoods`);
generation is greedy with the static-cache decoder of `slmkit.infer.generate`.

lm-eval is optional (the ``lm-eval`` extra): without it, importing this module is a
:class:`slmkit.errors.MissingDependency` naming the pip command (on the command line: one ``error:`` line, exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from slmkit.errors import MissingDependency, UserError
from slmkit.eval.tasks import loglikelihoods, move_trailing_whitespace, prefix_token_id
from slmkit.optional import require

try:
    LM = require("lm_eval.api.model", "lm-eval").LM
    register_model = require("lm_eval.api.registry", "lm-eval").register_model
except MissingDependency as exc:
    if __name__ == "__main__":  # the lm-eval command line: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    raise


@register_model("slmkit")
class SlmkitLM(LM):
    def __init__(
        self,
        pretrained: str,
        device: str | None = "cpu",
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        import torch

        from slmkit.loading import load

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}
        if dtype not in torch_dtype:
            raise UserError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval asks for cuda by default; run where we can
        self.lm = load(pretrained, device=device, dtype=torch_dtype[dtype])
        self._device = device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix = prefix_token_id(self.lm)

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.lm.config.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.prefix

    def tok_encode(self, text: str) -> list[int]:
        return self.lm.tokenizer.encode(text).ids if text else []

    def tok_decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # the rule `slm eval --tasks` follows too (as lm-eval's own models do): trailing whitespace of the context
        # belongs to the continuation
        context, continuation = move_trailing_whitespace(context, continuation)
        return [self.prefix, *self.tok_encode(context)], self.tok_encode(continuation)

    # ---- the three request types -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return loglikelihoods(self.lm.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = loglikelihoods(self.lm.model, windows, self.batch_size)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from slmkit.infer.generate import generate_ids

        eos = self.lm.config.eos_token_id
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = min(int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            ids = [self.prefix, *self.tok_encode(context)][-(self.max_length - max_new) :]
            tokens: list[int] = []
            text = ""
            for token in generate_ids(self.lm.model, ids, max_new, stop_ids={eos} if eos is not None else None):
                tokens.append(token)
                text = self.tok_decode(tokens)
                if any(s in text for s in until):
                    break
            for s in until:
                if s in text:
                    text = text.split(s)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return results


def evaluate_lm_eval_tasks(
    model: str,
    tasks: list[str],
    include: list[str] | None = None,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `tasks` (lm-eval task or group names; "a,b" splits) on one slmkit model
    through this adapter: what `slm eval MODEL --lm-eval TASK` runs. `include`: directories of local task YAMLs.

    lm-eval indexes its thousands of built-in task YAMLs (most of a minute on a busy machine) only when a task is
    not found in `include`. A task neither knows is a UserError naming it. Returns lm-eval's results dict
    (``results``, ``versions``, ``n-shot``, ``config``, ...).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [n.strip() for t in tasks for n in t.split(",") if n.strip()]
    if not names:
        raise UserError("--lm-eval: give at least one task name")
    for directory in include or []:
        if not Path(directory).is_dir():
            raise UserError(f"--lm-eval-include: {directory} is not a directory")
    paths = [str(Path(d).resolve()) for d in include or []]
    manager = None
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not all(n in manager.all_tasks for n in names):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=paths or None)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f" (looked in lm-eval's own tasks and {', '.join(paths)})" if paths else " (lm-eval's own tasks)"
        raise UserError(f"lm-eval has no task named {', '.join(missing)}{where}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    args = f"pretrained={model},batch_size={batch_size}" + (f",device={device}" if device else "")
    return lm_eval.simple_evaluate(
        model="slmkit", model_args=args, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager
    )


def main() -> None:
    """The lm-eval command line with the `slmkit` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
