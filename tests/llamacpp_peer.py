"""llama.cpp as a peer, through the prebuilt `xllamacpp` wheel (no build step; `make install` pins its version).

Two ways in, each for what it does best:
- `LlamaCppLogits`: libllama's C API (the wheel's extension module exports it) through ctypes, for full logits of
  every prompt position (logit parity, perplexity). Only the three structs passed by value are declared, for the
  pinned build; `check_layout` proves them against the library (the size it writes and the defaults it fills in)
  before any call that passes them, because `llama_context_params` changes between llama.cpp builds.
- `llama_server_greedy`: xllamacpp's in-process llama-server (its C++ server, no HTTP), for greedy token ids and
  llama.cpp's own decode timings, as a user of llama-server would see them.

Used by tests/interop/test_llama_cpp.py, tests/compress/test_compress_llama_cpp.py and
benchmarks/llamacpp_compare.py. Importing this module does not import xllamacpp; `available()` says whether it is
installed."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_DEFAULT_N_THREADS = 4


def available() -> bool:
    try:
        return importlib.util.find_spec("xllamacpp") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


class LlamaModelParams(ctypes.Structure):
    """`struct llama_model_params` of the pinned build (load_mode/lazy_mode enums, no use_mmap booleans)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int32),
        ("load_mode", ctypes.c_int32),
        ("lazy_mode", ctypes.c_int32),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


class LlamaContextParams(ctypes.Structure):
    """`struct llama_context_params` of the pinned build. We set n_ctx, n_batch, n_ubatch, the thread counts and the
    KV cache types. `_after_abort` is 8 bytes this build keeps between the abort callback and the booleans (found by
    `check_layout`'s byte probe, zero by default, never set here)."""

    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_rs_seq", ctypes.c_uint32),
        ("n_outputs_max", ctypes.c_uint32),
        ("n_outputs_max_per_seq", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        ("ctx_type", ctypes.c_int32),
        ("rope_scaling_type", ctypes.c_int32),
        ("pooling_type", ctypes.c_int32),
        ("attention_type", ctypes.c_int32),
        ("flash_attn_type", ctypes.c_int32),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int32),
        ("type_v", ctypes.c_int32),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("_after_abort", ctypes.c_uint8 * 8),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool),
        ("swa_full", ctypes.c_bool),
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p),
        ("n_samplers", ctypes.c_size_t),
        ("ctx_other", ctypes.c_void_p),
    ]


class LlamaBatch(ctypes.Structure):
    """`struct llama_batch` (stable across builds): per-token arrays owned by llama_batch_init/llama_batch_free."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


_LIB: ctypes.CDLL | None = None
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *_: None)


def _written_size(function) -> int:
    """How many bytes a `*_default_params()` function writes: call it through the hidden result pointer (the x86-64
    System V convention for structs over 16 bytes) into a buffer filled with two different sentinels."""
    raw = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.cast(function, ctypes.c_void_p).value)
    last = 0
    for fill in (0xAB, 0xCD):
        buffer = (ctypes.c_uint8 * 1024)(*([fill] * 1024))
        raw(ctypes.addressof(buffer))
        last = max(last, max(i for i, b in enumerate(bytes(buffer)) if b != fill))
    return (last + 8) // 8 * 8


def check_layout(lib: ctypes.CDLL) -> None:
    """Refuse to pass structs whose declared layout is not the library's: sizes as written by the library, and
    defaults landing on the fields they belong to."""
    for name, struct in (("llama_model_default_params", LlamaModelParams),
                         ("llama_context_default_params", LlamaContextParams)):  # fmt: skip
        size = _written_size(getattr(lib, name))
        if size != ctypes.sizeof(struct):
            raise RuntimeError(
                f"{name} writes {size} bytes but tests/llamacpp_peer.py declares {ctypes.sizeof(struct)}: this "
                "xllamacpp is not the pinned build (Makefile XLLAMACPP_VERSION); update the declared structs"
            )
    model = lib.llama_model_default_params()
    context = lib.llama_context_default_params()
    expected = {
        "model.n_gpu_layers": (model.n_gpu_layers, -1),
        "model.use_extra_bufts": (model.use_extra_bufts, True),
        "context.n_seq_max": (context.n_seq_max, 1),
        "context.n_threads": (context.n_threads, GGML_DEFAULT_N_THREADS),
        "context.type_k": (context.type_k, GGML_TYPE_F16),
        "context.type_v": (context.type_v, GGML_TYPE_F16),
        "context.yarn_beta_slow": (context.yarn_beta_slow, -1.0),
        "context.offload_kqv": (context.offload_kqv, True),
        "context.kv_unified": (context.kv_unified, False),
    }
    wrong = {k: got for k, (got, want) in expected.items() if got != want}
    if wrong:
        raise RuntimeError(f"llama.cpp defaults do not land on the declared fields {wrong}: struct layout changed")


def library() -> ctypes.CDLL:
    """libllama as exported by the xllamacpp extension module, with the prototypes we call and layouts checked."""
    global _LIB
    if _LIB is not None:
        return _LIB
    import xllamacpp  # noqa: F401  (loads the extension; its file is the library)

    path = next(Path(importlib.util.find_spec("xllamacpp").origin).parent.glob("xllamacpp*.so"))
    lib = ctypes.CDLL(str(path))
    p, i32 = ctypes.c_void_p, ctypes.c_int32
    for name, restype, argtypes in [
        ("llama_backend_init", None, []),
        ("llama_log_set", None, [p, p]),
        ("llama_model_default_params", LlamaModelParams, []),
        ("llama_context_default_params", LlamaContextParams, []),
        ("llama_model_load_from_file", p, [ctypes.c_char_p, LlamaModelParams]),
        ("llama_init_from_model", p, [p, LlamaContextParams]),
        ("llama_model_get_vocab", p, [p]),
        ("llama_vocab_n_tokens", i32, [p]),
        ("llama_batch_init", LlamaBatch, [i32, i32, i32]),
        ("llama_batch_free", None, [LlamaBatch]),
        ("llama_decode", i32, [p, LlamaBatch]),
        ("llama_get_logits_ith", ctypes.POINTER(ctypes.c_float), [p, i32]),
        ("llama_get_memory", p, [p]),
        ("llama_memory_clear", None, [p, ctypes.c_bool]),
        ("llama_free", None, [p]),
        ("llama_model_free", None, [p]),
    ]:
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    check_layout(lib)
    lib.llama_log_set(ctypes.cast(_LOG_CALLBACK, ctypes.c_void_p), None)
    lib.llama_backend_init()
    _LIB = lib
    return lib


class LlamaCppLogits:
    """A GGUF file in libllama with an f32 KV cache (llama.cpp's default f16 cache alone moves logits by ~3e-3):
    `logits(ids)` is the (T, V) float32 array of every position of one fresh sequence."""

    def __init__(self, path: str | Path, n_ctx: int = 128, threads: int = 2):
        import numpy as np

        self._np = np
        self.lib = lib = library()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.flash_attn_type = 0  # disabled: its CPU kernel rounds K/Q products through f16
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    def logits(self, ids: list[int]):
        np, lib = self._np, self.lib
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit a context of {self.n_ctx}")
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            if (status := lib.llama_decode(self.ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {status}")
        finally:
            lib.llama_batch_free(batch)
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for i in range(len(ids)):
            out[i] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self):
        self.close()


def llama_server_greedy(path: str | Path, prompt: list[int], n_new: int, n_ctx: int = 128, threads: int = 2):
    """Greedy continuation of prompt (token ids) by xllamacpp's in-process llama-server, asked over its HTTP port
    on its native `/completion` endpoint (the OpenAI-shaped `handle_completions` returns text only, and these
    tiny models' tokens are often partial UTF-8): (token ids, decode tokens/s as llama-server's own
    `timings.predicted_per_second` reports it)."""
    import json
    import socket
    import urllib.request

    import xllamacpp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.port = port
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.warmup = False
    server = xllamacpp.Server(params)
    body = {
        "prompt": list(prompt),
        "n_predict": n_new,
        "temperature": 0.0,
        "top_k": 1,
        "repeat_penalty": 1.0,
        "cache_prompt": False,
        "return_tokens": True,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{server.listening_address}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        result = json.loads(response.read())
    del server
    return list(result["tokens"]), float(result["timings"]["predicted_per_second"])
