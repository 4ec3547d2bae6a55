"""nanofast: minimal, fast batch-size-1 inference for Qwen3 dense models, in one file.

    python nanofast.py --prompt "Why is the sky blue?"          # generate (streams text)
    python nanofast.py --help                                   # every option

At batch size 1 a decode step reads every weight once and does almost no arithmetic,
so the speed limit is memory bandwidth, and the enemy is the host: a step made of
hundreds of small launches from Python leaves the GPU idle most of the time. So:

- weights load straight from safetensors and are fused where that saves launches
  (q/k/v into one matrix, gate/up into one);
- every buffer is allocated once at startup, and the KV cache is one contiguous,
  paged block per layer (page table = arange);
- on CUDA the entire decode step, from the embedding lookup through the sampler, is
  one CUDA graph: a handful of fused Triton kernels per layer, the sequence length and
  sampling state kept on the device, replayed once per token with no host work between
  replays and tokens read back a few steps behind the GPU;
- prefill runs in chunks through cuBLAS and FlashInfer attention, outside the graph;
- everywhere else (CPU, or --plain on CUDA) the same model runs in plain torch, which
  is also the reference the fast path is tested against.

The sections below follow the data: config, weights, tokenizer, KV cache, model,
sampling, GPU kernels, fast decoder, engine, CLI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_MODEL = os.path.join("weights", "Qwen3-0.6B")
DEFAULT_REPO = "Qwen/Qwen3-0.6B"


class NanofastError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line."""


# -----------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class Config:
    vocab_size: int  # rows of the embedding and of lm_head
    hidden_size: int  # D, width of the residual stream
    intermediate_size: int  # I, width of the MLP's hidden layer
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; each serves num_heads // num_kv_heads query heads
    head_dim: int  # width of one attention head (128 in every released Qwen3)
    rms_norm_eps: float  # epsilon inside every RMSNorm
    rope_theta: float  # RoPE base frequency
    tie_word_embeddings: bool  # lm_head reuses the embedding matrix
    max_position_embeddings: int  # longest context the model was trained for


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NanofastError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanofastError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NanofastError(f"{path} does not hold a JSON object")
    return data


def load_config(model_dir: str) -> Config:
    """Read config.json, as released (rope_theta) or as transformers 5 writes it (rope_parameters)."""
    if not os.path.isdir(model_dir):
        raise NanofastError(f"model folder not found: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    raw = _read_json(path)
    archs = raw.get("architectures") or ["Qwen3ForCausalLM"]
    if raw.get("model_type") != "qwen3" or "Qwen3ForCausalLM" not in archs:
        raise NanofastError(
            f"{path}: model_type {raw.get('model_type')!r} / architectures {archs} is not supported; "
            "nanofast runs Qwen3 dense models (qwen3, Qwen3ForCausalLM)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NanofastError(f"{path}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    try:
        heads = int(raw["num_attention_heads"])
        cfg = Config(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1e6))),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
        )
    except KeyError as e:
        raise NanofastError(f"{path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise NanofastError(f"{path}: bad value ({e})") from None
    sizes = [cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
             cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
    if min(sizes) <= 0 or cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise NanofastError(f"{path}: inconsistent sizes (heads {cfg.num_heads}, kv heads "
                            f"{cfg.num_kv_heads}, head_dim {cfg.head_dim})")
    return cfg


def generation_defaults(model_dir: str) -> dict:
    """Sampling defaults and stop ids from generation_config.json (greedy when it is absent)."""
    path = os.path.join(model_dir, "generation_config.json")
    g = _read_json(path) if os.path.exists(path) else {}
    eos = g.get("eos_token_id", _read_json(os.path.join(model_dir, "config.json")).get("eos_token_id"))
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    sampling = g.get("do_sample", False)
    return dict(temperature=float(g.get("temperature", 1.0)) if sampling else 0.0,
                top_k=int(g.get("top_k", 0) or 0) if sampling else 0,
                top_p=float(g.get("top_p", 1.0)) if sampling else 1.0,
                eos_ids=eos)


# -----------------------------------------------------------------------------
# weights


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (D,)
    qkv: torch.Tensor  # ((Hq + 2 Hkv) hd, D): q, k and v projections stacked
    q_norm: torch.Tensor  # (hd,)
    k_norm: torch.Tensor  # (hd,)
    o: torch.Tensor  # (D, Hq hd)
    mlp_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 I, D): gate and up projections stacked
    down: torch.Tensor  # (D, I)


@dataclass
class Weights:
    embed: torch.Tensor  # (V, D)
    layers: list
    norm: torch.Tensor  # (D,)
    lm_head: torch.Tensor  # (V, D); the same tensor as embed when tied


def checkpoint_shapes(cfg: Config) -> dict:
    """Every tensor of a released Qwen3 checkpoint, by name, with its shape."""
    D, I, hd, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "self_attn.o_proj.weight": (D, q),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, D),
            p + "mlp.up_proj.weight": (I, D),
            p + "mlp.down_proj.weight": (D, I),
        })
    return shapes


def _checkpoint_files(model_dir: str) -> dict:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise NanofastError(f"{index}: no weight_map")
        return {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(single):
        raise NanofastError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    return {None: single}


def load_weights(model_dir: str, cfg: Config, dtype: torch.dtype, device) -> Weights:
    """Load, check and fuse the weights, one tensor at a time (peak memory ~ one copy)."""
    from safetensors import safe_open

    expected = checkpoint_shapes(cfg)
    files = _checkpoint_files(model_dir)
    handles, where = {}, {}  # file -> open handle; tensor name -> handle
    try:
        for path in sorted(set(files.values())):
            if not os.path.exists(path):
                raise NanofastError(f"shard {os.path.basename(path)} listed in the index is missing")
            handles[path] = safe_open(path, framework="pt", device=str(device))
    except NanofastError:
        raise
    except Exception as e:  # safetensors reports truncation and corruption at open
        raise NanofastError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    for path, h in handles.items():
        for name in h.keys():
            if None not in files and files.get(name) != path:
                raise NanofastError(f"{os.path.basename(path)} holds {name}, which the index does not place there")
            where[name] = h
    need = set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = sorted(need - set(where)), sorted(set(where) - set(expected))
    if missing:
        raise NanofastError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise NanofastError(f"checkpoint has unexpected tensor(s): {', '.join(unexpected[:5])}")
    for name, h in where.items():
        shape = tuple(h.get_slice(name).get_shape())
        if shape != expected[name]:
            raise NanofastError(f"tensor {name} has shape {shape}, expected {expected[name]}")

    def get(name):
        try:
            return where[name].get_tensor(name).to(dtype)
        except Exception as e:
            raise NanofastError(f"cannot read tensor {name} ({e})") from None

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(Layer(
            attn_norm=get(p + "input_layernorm.weight"),
            qkv=torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]),
            q_norm=get(a + "q_norm.weight"),
            k_norm=get(a + "k_norm.weight"),
            o=get(a + "o_proj.weight"),
            mlp_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
            down=get(m + "down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)


# -----------------------------------------------------------------------------
# tokenizer and chat template


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus Qwen3's chat template."""

    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as _Tokenizer

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise NanofastError(f"{path} not found")
        try:
            self.tok = _Tokenizer.from_file(path)
        except Exception as e:
            raise NanofastError(f"{path}: cannot load tokenizer ({e})") from None

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @staticmethod
    def chat(prompt: str, system: str | None = None, think: bool = True) -> str:
        """Qwen3's released chat template for one user turn, with the generation prompt."""
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        text += f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        return text if think else text + "<think>\n\n</think>\n\n"


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back split UTF-8 characters.

    Byte-level BPE can split one character over several tokens; decoding such a prefix
    ends in U+FFFD. Pending tokens are kept until they decode to whole characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending), []
        return text


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per layer, K and V of shape (num_pages, page_size, Hkv, hd), allocated once.

    Pages are laid out in order (page table = arange), so token t of the sequence lives
    at page t // page_size, slot t % page_size, and flat(layer) is a plain
    (max_tokens, Hkv, hd) view. That is the layout FlashInfer's paged kernels take."""

    def __init__(self, cfg: Config, max_seq_len: int, page_size: int, dtype, device):
        self.page_size = page_size
        self.num_pages = -(-max_seq_len // page_size)
        shape = (cfg.num_layers, 2, self.num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.k = [self.data[i, 0] for i in range(cfg.num_layers)]
        self.v = [self.data[i, 1] for i in range(cfg.num_layers)]
        self.page_table = torch.arange(self.num_pages, dtype=torch.int32, device=device)

    def flat(self, layer: int):  # -> (max_tokens, Hkv, hd) views of K and V
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


# -----------------------------------------------------------------------------
# model (plain torch: the CPU path, and the reference for the fast path)


def rms_norm(x, w, eps):  # (..., n) -> (..., n); fp32 statistics, as transformers does
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(cfg: Config, max_seq_len: int, device):  # -> cos, sin: (max_seq_len, hd/2) fp32
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x, cos, sin):  # x (T, H, hd), cos/sin (T, hd/2) -> (T, H, hd), half-split form
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def sdpa_attention(q, k, v, pos):  # q (T, Hq, hd), k/v (pos+T, Hkv, hd) -> (T, Hq hd)
    T, S = q.shape[0], k.shape[0]
    # query t sits at position pos + t and sees keys 0..pos+t (bottom-right causal)
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(pos, pos + T, device=q.device)[:, None]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask if T > 1 else None)
    return out.transpose(0, 1).reshape(T, -1)


def forward(w: Weights, cfg: Config, cache: KVCache, rope, ids, pos: int,
            attention=sdpa_attention, last_only=False):
    """Run tokens ids (T,) at positions pos..pos+T-1, writing their K/V into the cache.
    Returns fp32 logits (T, V), or (1, V) for the last token only."""
    T, Hq, Hkv, hd, eps = ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
    x = w.embed[ids]  # (T, D)
    for i, L in enumerate(w.layers):
        q, k, v = (rms_norm(x, L.attn_norm, eps) @ L.qkv.T).split([Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rope(rms_norm(q.view(T, Hq, hd), L.q_norm, eps), cos, sin)
        k = apply_rope(rms_norm(k.view(T, Hkv, hd), L.k_norm, eps), cos, sin)
        k_cache, v_cache = cache.flat(i)
        k_cache[pos:pos + T] = k
        v_cache[pos:pos + T] = v.view(T, Hkv, hd)
        x = x + attention(q, k_cache[:pos + T], v_cache[:pos + T], pos) @ L.o.T
        gate, up = (rms_norm(x, L.mlp_norm, eps) @ L.gate_up.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ L.down.T
    if last_only:
        x = x[-1:]
    return (rms_norm(x, w.norm, eps) @ w.lm_head.T).float()


# -----------------------------------------------------------------------------
# sampling (plain torch)


def sample(logits, temperature: float, top_k: int, top_p: float, generator=None) -> int:
    """One token from fp32 logits (V,), with transformers' semantics: divide by the
    temperature, keep the top_k highest scores (0 = all), then the smallest set whose
    probability reaches top_p (1.0 = all). Temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.detach().float().cpu() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores[scores < kth] = -math.inf
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        above = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = above >= top_p
        drop[0] = False
        scores[order[drop]] = -math.inf
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


# -----------------------------------------------------------------------------
# GPU kernels (Triton)

# -----------------------------------------------------------------------------
# fast decoder: buffers, prefill, the CUDA graph, the replay loop


# -----------------------------------------------------------------------------
# engine and Python API

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise NanofastError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise NanofastError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NanofastError("CUDA is not available on this machine; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise NanofastError(f"no such GPU: {name} ({torch.cuda.device_count()} visible)")
    return device


class Engine:
    """A loaded model with its KV cache: prefill, step and generate.

        engine = nanofast.load("weights/Qwen3-0.6B")
        for token in engine.generate(prompt_ids, max_new_tokens=64, temperature=0.6, top_k=20):
            ...

    On CUDA with bf16/fp16 weights, Triton and FlashInfer, decoding runs as one CUDA
    graph per token (engine.fast is True); elsewhere, or with fast=False, it runs the
    plain-torch model above."""

    def __init__(self, model_dir: str, device=None, dtype=None, max_seq_len: int = 4096,
                 page_size: int = 16, fast: bool | None = None):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        if isinstance(dtype, str):
            dtype = DTYPES[dtype]
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if max_seq_len < 2:
            raise NanofastError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.cfg = load_config(model_dir)
        self.max_seq_len = max_seq_len
        self.weights = load_weights(model_dir, self.cfg, self.dtype, self.device)
        self.cache = KVCache(self.cfg, max_seq_len, page_size, self.dtype, self.device)
        self.rope = rope_tables(self.cfg, max_seq_len, self.device)
        self.pos = 0  # tokens held in the cache (plain path)
        self.stop_reason, self.stats = None, {}
        self.fast = False
        if self.device.type == "cuda" and fast is not False:
            self.fast = self._start_fast()

    def _start_fast(self) -> bool:
        return False

    # plain path: forward / reset / prefill / step

    def forward(self, ids, pos: int, last_only: bool = False):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = forward(self.weights, self.cfg, self.cache, self.rope, ids, pos, last_only=last_only)
        self.pos = pos + ids.shape[0]
        return logits

    def reset(self):
        self.pos = 0

    def prefill(self, ids):  # -> fp32 logits (V,) of the last prompt token
        return self.forward(ids, 0, last_only=True)[0]

    def step(self, token: int):  # -> fp32 logits (V,) after appending one token
        if self.pos >= self.max_seq_len:
            raise NanofastError("the KV cache is full")
        return self.forward([token], self.pos)[0]

    # generation

    def generate(self, prompt_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=()):
        """Yield new token ids. Stops at a stop id (which is yielded), after
        max_new_tokens, or when prompt plus output fill max_seq_len. Afterwards
        self.stop_reason says which ("eos", "max_new_tokens", "cache_full", or
        "interrupted" if the caller stopped early) and self.stats has the timings."""
        P = len(prompt_ids)
        if P == 0:
            raise NanofastError("the prompt is empty")
        if P >= self.max_seq_len:
            raise NanofastError(f"the prompt is {P} tokens, which leaves no room with max_seq_len "
                                f"{self.max_seq_len}; raise --max-seq-len")
        if max_new_tokens < 1:
            raise NanofastError("max_new_tokens must be at least 1")
        limit = min(max_new_tokens, self.max_seq_len - P)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        source = (self._fast_tokens if self.fast else self._plain_tokens)(
            list(prompt_ids), limit, temperature, top_k, top_p, seed)
        stop, n, t_first = set(stop_ids), 0, None
        self.stop_reason, self.stats = None, {}
        t0 = time.perf_counter()
        try:
            for token in source:
                n += 1
                t_first = t_first or time.perf_counter()
                yield token
                if token in stop:
                    self.stop_reason = "eos"
                    break
            else:
                self.stop_reason = "max_new_tokens" if n >= max_new_tokens else "cache_full"
        finally:
            source.close()
            t_end = time.perf_counter()
            self.stop_reason = self.stop_reason or "interrupted"
            self.stats = dict(prompt_tokens=P, generated_tokens=n,
                              ttft_s=(t_first - t0) if t_first else None,
                              decode_tok_s=(n - 1) / (t_end - t_first) if n > 1 else None,
                              total_s=t_end - t0)

    def _plain_tokens(self, prompt_ids, limit, temperature, top_k, top_p, seed):
        generator = torch.Generator().manual_seed(seed)
        logits = self.prefill(prompt_ids)
        for i in range(limit):
            token = sample(logits, temperature, top_k, top_p, generator)
            yield token
            if i + 1 < limit:
                logits = self.step(token)


def load(model_dir: str, **kwargs) -> Engine:
    """Load a Qwen3 checkpoint folder; see Engine for the options."""
    return Engine(model_dir, **kwargs)


# -----------------------------------------------------------------------------
# CLI


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _ArgParser(prog="nanofast.py", description="Generate text with a Qwen3 model, fast, one "
                   "sequence at a time. Sampling defaults come from the model's generation_config.json.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder (default {DEFAULT_MODEL}; "
                   f"downloaded from {DEFAULT_REPO} if missing and huggingface_hub is installed)")
    p.add_argument("--prompt", help="the prompt text; '-' reads it from stdin")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--system", help="system prompt (default: none)")
    p.add_argument("--no-think", action="store_true", help="turn Qwen3's thinking off (empty <think> block)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many new tokens (default 512)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 0)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="keep the smallest set with this much probability, 1 = off "
                   "(default: generation_config.json)")
    p.add_argument("--seed", type=int, help="random seed; the same seed repeats a run (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens (benchmarks)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache size in tokens: prompt plus output "
                   "(default 4096)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--plain", action="store_true", help="on CUDA, run the plain-torch path instead of the CUDA graph")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, stop reason, timings) "
                   "instead of streaming text")
    args = p.parse_args(argv)
    checks = [
        (args.temperature is not None and not (args.temperature >= 0 and math.isfinite(args.temperature)),
         "--temperature must be a finite number >= 0"),
        (args.top_k is not None and args.top_k < 0, "--top-k must be >= 0"),
        (args.top_p is not None and not 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
        (args.max_seq_len < 2, "--max-seq-len must be >= 2"),
        (args.prompt is not None and args.prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (args.prompt is None and args.prompt_file is None, "no prompt: give --prompt TEXT, --prompt - (stdin) "
         "or --prompt-file FILE"),
    ]
    for bad, message in checks:
        if bad:
            p.error(message)
    return args


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise NanofastError(f"cannot read --prompt-file {args.prompt_file} ({e.__class__.__name__})") from None
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def download_default(model_dir: str):
    """Fetch Qwen3-0.6B into weights/ when it is missing (atomically: a .partial folder, then rename)."""
    cmd = f"hf download {DEFAULT_REPO} --local-dir {model_dir}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NanofastError(f"{model_dir} not found; fetch it with: pip install huggingface_hub && {cmd}") from None
    print(f"downloading {DEFAULT_REPO} into {model_dir}", file=sys.stderr)
    partial = model_dir + ".partial"
    try:
        snapshot_download(DEFAULT_REPO, local_dir=partial, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:
        raise NanofastError(f"download failed ({e.__class__.__name__}); fetch it with: {cmd}") from None
    os.replace(partial, model_dir)


def run(args) -> int:
    prompt = read_prompt(args)
    device = pick_device(args.device)
    if args.model == DEFAULT_MODEL and not os.path.exists(args.model):
        download_default(args.model)
    load_config(args.model)  # fail fast on a bad folder, before the tokenizer
    defaults = generation_defaults(args.model)
    tokenizer = Tokenizer(args.model)
    text = prompt if args.raw else Tokenizer.chat(prompt, args.system, think=not args.no_think)
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        raise NanofastError("the prompt is empty")
    if len(prompt_ids) >= args.max_seq_len:
        raise NanofastError(f"the prompt is {len(prompt_ids)} tokens; --max-seq-len {args.max_seq_len} "
                            "must be larger")
    t0 = time.perf_counter()
    engine = load(args.model, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                  fast=not args.plain)
    print(f"[nanofast] loaded {args.model} on {device} ({str(engine.dtype).replace('torch.', '')}, "
          f"{'CUDA graph' if engine.fast else 'plain torch'}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    generation = engine.generate(prompt_ids, max_new_tokens=args.max_new_tokens,
                                 temperature=pick(args.temperature, "temperature"), top_k=pick(args.top_k, "top_k"),
                                 top_p=pick(args.top_p, "top_p"), seed=args.seed,
                                 stop_ids=() if args.ignore_eos else defaults["eos_ids"])
    stream, out_ids = StreamDecoder(tokenizer), []
    try:
        for token in generation:
            out_ids.append(token)
            if not args.json:
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()
    except KeyboardInterrupt:
        generation.close()
    s = engine.stats
    if args.json:
        print(json.dumps(dict(prompt_ids=prompt_ids, generated_ids=out_ids, text=tokenizer.decode(out_ids),
                              stop_reason=engine.stop_reason, timings=s), ensure_ascii=False))
    else:
        sys.stdout.write(stream.flush() + "\n")
    ttft = f"{s['ttft_s'] * 1e3:.0f} ms" if s.get("ttft_s") is not None else "-"
    tps = f"{s['decode_tok_s']:.1f} tok/s" if s.get("decode_tok_s") else "-"
    print(f"[nanofast] prompt {s.get('prompt_tokens')} tokens, generated {s.get('generated_tokens')} tokens "
          f"(stop: {engine.stop_reason}), time to first token {ttft}, decode {tps}", file=sys.stderr)
    return 130 if engine.stop_reason == "interrupted" else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except NanofastError as e:
        print(f"error: {e}", file=sys.stderr)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; lower --max-seq-len or use a smaller model", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
