"""A decoder-only transformer in one file: Llama by default (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU), with the few switches of `ModelConfig` that cover Mistral (sliding window), Qwen2
(q/k/v biases), Qwen3 (q/k norm) and GPT-2 (LayerNorm, learned positions, plain GELU MLP, biases).
Each layer is ``Block(mixer, mlp)``: the mixer (attention, or another registered in `slmkit.models.registry`)
and the MLP are small modules picked per layer by config fields.

Module and parameter names follow Hugging Face `LlamaForCausalLM` (without its `model.` prefix), so a
Llama-family state dict maps onto theirs by a prefix alone (other families: `slmkit.interop.hf`).

Two ways to run it:
- training / scoring: ``model(idx)`` runs causal attention over the whole sequence (no state);
- inference: ``state = model.new_state(batch, max_len)``, then ``model(idx, state=state, pos=...)`` feeds
  tokens at positions ``pos`` (the same for every row, (T,), or each row its own, (B, T)): each mixer updates
  its own part of the state and attends (or recurs) over what it holds. Prefill and decode are the same call
  with T = prompt length or T = 1; rows at different lengths share one state.

Shapes: B batch, T query tokens, S state slots, C d_model, H heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.models import native_decode
from slmkit.models.attention import Context, RMSNorm, rope_cos_sin, rope_inv_freq
from slmkit.models.decode_layout import decode_linear
from slmkit.models.registry import build_mixer, build_mlp
from slmkit.models.state import KVCacheSpec, ModelState


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, config.norm_eps) if config.norm == "rmsnorm" else nn.LayerNorm(dim, eps=config.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (unless the config's mlp is "none")."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        kind = config.mixer_at(layer_idx)
        self.input_layernorm = make_norm(config, config.d_model)
        # Hugging Face's name for an attention mixer is self_attn; other mixers are `mixer` (as in their Mamba)
        self.mixer_name = "self_attn" if kind == "attention" else "mixer"
        self.add_module(self.mixer_name, build_mixer(kind, config, layer_idx))
        mlp = config.mlp_at(layer_idx)  # per layer: mlp_pattern (e.g. a memory layer among dense ones)
        if mlp != "none":  # mlp "none": a mixer-only block (Mamba's)
            self.post_attention_layernorm = make_norm(config, config.d_model)
            self.mlp = build_mlp(mlp, config)
        self.dropout = config.dropout

    @property
    def sequence_mixer(self) -> nn.Module:
        return self._modules[self.mixer_name]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, ctx: Context | None, state: nn.Module | None) -> torch.Tensor:
        modules = self._modules  # one dict for the four lookups (nn.Module attribute access is slow per step)
        mixed = modules[self.mixer_name](modules["input_layernorm"](x), ctx, state)  # (B, T, C)
        p = self.dropout if self.training else 0.0  # residual dropout: training only, never at inference
        x = x + (F.dropout(mixed, p, True) if p else mixed)
        if "mlp" not in modules:
            return x
        out = modules["mlp"](modules["post_attention_layernorm"](x))
        return x + (F.dropout(out, p, True) if p else out)


class Transformer(nn.Module):
    DECODE_ROUTED = ("lm_head",)  # forward runs it through decode_linear (slmkit.models.decode_layout)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.value_embeds:  # modded-nanogpt's value embeddings: token rows added to attention's values
            kv_dim = config.n_kv_heads * config.dim_per_head
            self.value_embeds = nn.ModuleList(
                nn.Embedding(config.vocab_size, kv_dim) for _ in range(config.value_embeds)
            )
        if config.skip_connections:  # U-net: the first half's outputs feed the second half, mirrored
            self.skip_weights = nn.Parameter(torch.ones(config.n_layers // 2))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation --------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range); residual output projections scaled by 1/sqrt(2 * n_layers), or zero
        (`zero_init_proj`: every block starts as the identity and the projections learn first).

        Norm weights start at one, biases at zero.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("value_lambdas"):
                nn.init.constant_(p, 0.5)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                residual = name.endswith(("o_proj.weight", "down_proj.weight", "mixer.out_proj.weight"))
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * (residual_std if residual else std))
                    if residual and self.config.zero_init_proj:
                        p.zero_()  # after drawing, so the other weights match a run without the switch
        for module in self.modules():  # mixers whose scalars need their own start (mamba's A, D, dt; gla's decays)
            if hasattr(module, "reset_mixer_parameters"):
                module.reset_mixer_parameters(gen)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        *,
        state: ModelState | None = None,
        pos: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
        upto: int | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens idx (B, T); (B, 1, V) with last_only, or at each row's index logits_at (B,).

        state: from `new_state`; each layer reads and writes its own part (None: causal over idx alone).
        pos (T,) or (B, T): the tokens' positions (default 0..T-1), the same for every row or each row its own
        (rows at different lengths, as in continuous batching). With a state, a row's tokens must continue it.
        active (B,): rows whose state may change (None: all); a row fed a placeholder passes False.
        upto: attend to state slots [0, upto) only (an optimisation; must cover every position fed so far).
        segments (B, T), without a state: documents packed into one row; a token sees only earlier tokens with
        its segment id (pass each document's own positions as pos). Every mixer must support it (`packs_documents`).
        tree (T, T) bool, with a state that `takes_tree` and one row: the tokens are the nodes of a draft tree (a
        parent before its children), tree[i, j] True when node j is node i itself or one of its ancestors. Node i is
        written at state slot pos[i] (pos: T consecutive slots, the first right after the prefix) but sits at
        position pos[0] + depth(i) for rotary / learned embeddings, and sees the prefix and its ancestors only.
        """
        b, t = idx.shape
        if state is not None and (t == 1 or b == 1) and b * t <= native_decode.MAX_ROWS:
            if tree is None and segments is None and logits_at is None and not torch.is_grad_enabled():
                # one token per row, or a few tokens of one row: every layer in one native call (CPU)
                hidden = None if torch.compiler.is_compiling() else native_decode.decode(self, idx, state, pos, upto)
                if hidden is not None:
                    return self._head(hidden[:, -1:] if last_only else hidden)
        if pos is None:
            pos = torch.arange(t, device=idx.device)
        positions = pos if pos.dim() == 2 else pos.unsqueeze(0)  # (B or 1, T)
        cfg = self.config
        ctx = Context(positions, upto=upto, active=active, segments=segments)
        if tree is not None:
            if state is None or b != 1 or upto is None or not self.takes_tree(state):
                raise ValueError("tree: one row, upto = the slot after the last node, a state that takes_tree")
            start = positions[0, :1]  # (1,) the first node's slot: the prefix length (upto - T)
            depth = tree.sum(-1) - 1  # (T,) ancestors of each node
            positions = (start + depth).unsqueeze(0)  # (1, T) what rotary and learned positions see
            mask = torch.ones(t, upto, dtype=torch.bool, device=idx.device)
            mask[:, upto - t :] = tree  # the prefix, then the node's ancestors (itself included) among the nodes
            ctx.tree_mask = mask[None, None]  # (1, 1, T, S)
        if segments is not None and (state is not None or not self.packs_documents):
            raise ValueError("segments: a stateless forward of a model whose mixers all keep documents apart")
        if cfg.positions == "rope" and state is not None and state.rotary_slots is not None:
            ctx.rotary = self._rotary_lookup(state.rotary_slots + t, idx.device)  # the state rotates q and k itself
        elif cfg.positions == "rope":
            if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic":
                seq_len = int(positions.max()) + 1  # a device sync, so only here
                inv_freq = rope_inv_freq(cfg, seq_len, idx.device)
                cos, sin = rope_cos_sin(positions, cfg.dim_per_head, cfg.rope_theta, inv_freq)
            else:  # a lookup in a table of every position (fewer kernels per decode step)
                length = max(t, state.max_len if state is not None else 0)
                cos_table, sin_table = self.rope_table(length, idx.device)
                cos, sin = cos_table[positions], sin_table[positions]
                if cfg.rope_scaling is not None and cfg.rope_scaling.type == "longrope":
                    # as transformers: every position of a forward takes the long factors once its last position
                    # passes the original context (compared on the device: no sync per decode step)
                    original = cfg.rope_scaling.original_max_seq_len
                    assert original is not None
                    long_cos, long_sin = self.rope_table(length, idx.device, long=True)
                    if pos is None:  # positions 0..t-1: known here
                        if t > original:
                            cos, sin = long_cos[positions], long_sin[positions]
                    else:
                        past = positions.max() >= original
                        cos = torch.where(past, long_cos[positions], cos)
                        sin = torch.where(past, long_sin[positions], sin)
            ctx.cos, ctx.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B or 1, 1, T, D)

        x = self.embed_tokens(idx)  # (B, T, C)
        if cfg.positions == "learned":
            x = x + self.embed_positions(positions)  # (B or 1, T, C) broadcast
        if cfg.dropout and self.training:
            x = F.dropout(x, cfg.dropout, True)
        if ctx.cos is not None:
            ctx.cos, ctx.sin = ctx.cos.to(x.dtype), ctx.sin.to(x.dtype)  # type: ignore[union-attr]
        if cfg.value_embeds or cfg.skip_connections:
            x = self._layers_with_extras(x, idx, ctx, state)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, ctx, state.layer(i) if state is not None else None)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at].unsqueeze(1)  # (B, 1, C)
        elif last_only:
            x = x[:, -1:, :]
        return self._head(self.norm(x))

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        logits = decode_linear(self.lm_head, normed)  # (B, T, V); the native kernel when decoding on a CPU
        cap = self.config.logit_softcap
        if cap is not None:  # smoothly bounded to (-cap, cap)
            logits = cap * torch.tanh(logits / cap)
        return logits

    def takes_tree(self, state: ModelState) -> bool:
        """Whether a forward may verify a draft tree (`tree=`) over `state`: every layer's state is a plain KV cache
        (slot = position) of attention without a sliding window. Recurrent mixers (mamba, gla, ...) fold every fed
        token into one state, so tree nodes at one depth cannot each keep their own; bounded or compressed caches
        keep their own slot order."""
        from slmkit.models.state import KVState

        for i, block in enumerate(self.layers):
            layer_state = state.layer(i)
            if layer_state is None:
                continue
            if type(layer_state) is not KVState or getattr(block.sequence_mixer, "window", None) is not None:
                return False
        return True

    def _layers_with_extras(
        self, x: torch.Tensor, idx: torch.Tensor, ctx: Context, state: ModelState | None
    ) -> torch.Tensor:
        """The layers with value embeddings and/or U-net skips (`value_embeds`, `skip_connections`)."""
        cfg, n = self.config, self.config.n_layers
        tables = [table(idx) for table in self.value_embeds] if cfg.value_embeds else []  # (B, T, K D) each
        feeds = cfg.value_embed_layers()
        skips: list[torch.Tensor] = []
        half = n // 2 if cfg.skip_connections else 0
        for i, layer in enumerate(self.layers):
            if i >= n - half:  # the mirror of layer n - 1 - i of the first half
                x = x + self.skip_weights[i - (n - half)] * skips.pop()
            ctx.value_embed = tables[feeds[i]] if i in feeds else None
            x = layer(x, ctx, state.layer(i) if state is not None else None)
            if i < half:
                skips.append(x)
        ctx.value_embed = None
        return x

    @property
    def packs_documents(self) -> bool:
        """Whether `forward(..., segments=...)` keeps packed documents apart (every mixer supports it)."""
        return all(getattr(block.sequence_mixer, "packs_documents", False) for block in self.layers)

    def rope_table(self, length: int, device: torch.device, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (L, D) for positions 0..L-1 (L >= length), computed once per device (not for dynamic scaling);
        long: longrope's table of long factors (the default table has its short ones)."""
        key = f"{device}:long" if long else str(device)
        cfg = self.config
        # tables follow the config: a model whose context is extended in place (slm finetune --context) rebuilds them
        source = (cfg.rope_scaling, cfg.rope_theta, cfg.rope_dim, cfg.max_seq_len)
        tables = self.__dict__.get("_rope_tables")
        if tables is None or tables["source"] != source:
            tables = self.__dict__["_rope_tables"] = {"source": source}
        cached = tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, cfg.max_seq_len)
            scaling = cfg.rope_scaling
            selector = scaling.original_max_seq_len + 1 if long and scaling and scaling.original_max_seq_len else 0
            inv_freq = rope_inv_freq(cfg, selector, device)
            scale = scaling.attention_scale() if scaling is not None else 1.0
            cached = rope_cos_sin(torch.arange(size, device=device), cfg.dim_per_head, 0.0, inv_freq, scale)
            tables[key] = cached
        return cached

    def _rotary_lookup(self, length: int, device: torch.device):
        """positions (B, S) -> cos, sin (B, S, D) for positions below `length` (a cache's own, bounded positions)."""
        if self.config.rope_scaling is not None and self.config.rope_scaling.type == "dynamic":
            inv_freq = rope_inv_freq(self.config, length, device)
            positions = torch.arange(length, device=device)
            cos_table, sin_table = rope_cos_sin(positions, self.config.dim_per_head, 0.0, inv_freq)
        else:
            cos_table, sin_table = self.rope_table(length, device)
        return lambda positions: (cos_table[positions], sin_table[positions])

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of targets (B, T) given idx (B, T)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def new_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        cache: KVCacheSpec | None = None,
    ) -> ModelState:
        """Inference state for `batch_size` rows of up to `max_len` positions (default: the context), on the
        model's device, in its dtype unless `dtype` is given. `cache` chooses how attention layers keep keys and
        values (bounded, quantized, pruned: `KVCacheSpec`); other mixers keep their own state."""
        param = next(self.parameters())
        max_len = max_len or self.config.max_seq_len
        if cache is not None and cache.is_default:
            cache = None
        if cache is not None and cache.bounded and self.config.positions == "learned":
            raise UserError(
                "--kv-window needs rotary or no position embeddings: this model has a learned table of "
                f"{self.config.max_seq_len} absolute positions, and a stream past them has none"
            )
        layers = []
        for block in self.layers:
            mixer = block.sequence_mixer
            extra = {"cache": cache} if cache is not None and getattr(mixer, "accepts_kv_cache", False) else {}
            layers.append(mixer.new_state(batch_size, max_len, param.device, dtype or param.dtype, **extra))
        return ModelState(layers, batch_size, max_len)
