"""What a learned router sees of a prompt: the weak model's own reading of it.

Per prompt, from one forward pass of the weak model over the prompt tokens:
- the final hidden state (after the last norm, what the LM head reads), mean-pooled over the prompt;
- the final hidden state at the last prompt position (what the model's next token comes from);
- the prompt's mean negative log-likelihood under the weak model (log perplexity: how familiar the text is);
- the entropy and the top probability of the next-token distribution after the prompt.

So a router costs the weak model one prefill, which a cascade or a server pays anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from slmkit.errors import UserError

FEATURE_VERSION = 1
SCALAR_FEATURES = ("prompt_mean_nll", "next_token_entropy", "next_token_top_probability")


def unwrap(model: Any) -> Any:
    """The torch module of a `LoadedModel` (or the module itself)."""
    return getattr(model, "model", model)


def feature_size(d_model: int) -> int:
    return 2 * d_model + len(SCALAR_FEATURES)


def prompt_features(model: Any, prompts: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
    """Features (N, 2 * d_model + 3) of each prompt (token ids; the left part is dropped past the model's window)."""
    import torch

    model = unwrap(model)
    if not prompts:
        return np.zeros((0, feature_size(model.config.d_model)), dtype=np.float32)
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: a router needs at least one prompt token")
    window = model.config.max_seq_len
    rows = [list(p)[-window:] for p in prompts]
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    # the LM head's input is the final (normed) hidden state; a hook reads it without touching the model's code
    handle = model.lm_head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    out = np.zeros((len(rows), feature_size(model.config.d_model)), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                group = order[start : start + batch_size]
                width = max(len(rows[i]) for i in group)
                x = torch.zeros((len(group), width), dtype=torch.long)
                lengths = torch.tensor([len(rows[i]) for i in group])
                for r, i in enumerate(group):
                    x[r, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                captured.clear()
                logits = model(x.to(device)).float().cpu()  # (B, T, V); right padding is invisible to causal rows
                hidden = captured[-1].float().cpu()  # (B, T, C)
                mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # (B, T)
                mean_hidden = (hidden * mask[..., None]).sum(1) / lengths[:, None]
                last = lengths - 1
                arange = torch.arange(len(group))
                last_hidden = hidden[arange, last]
                logprobs = torch.log_softmax(logits, dim=-1)  # (B, T, V)
                # NLL of tokens 1..T-1 given their prefix (a one-token prompt has none: 0)
                token_lp = logprobs[:, :-1].gather(2, x[:, 1:, None]).squeeze(2)  # (B, T-1)
                nll_mask = mask[:, 1:]
                mean_nll = -(token_lp * nll_mask).sum(1) / nll_mask.sum(1).clamp(min=1)
                next_lp = logprobs[arange, last]  # (B, V)
                entropy = -(next_lp.exp() * next_lp).sum(-1)
                top = next_lp.max(-1).values.exp()
                scalars = torch.stack([mean_nll, entropy, top], dim=1)
                block = torch.cat([mean_hidden, last_hidden, scalars], dim=1).numpy()
                out[group] = block
    finally:
        handle.remove()
        model.train(was_training)
    return out
