"""nanofast: minimal, fast batch-size-1 inference for Qwen3 dense models, in one file.

    python nanofast.py --prompt "Why is the sky blue?"          # generate (streams text)
    python nanofast.py --help                                   # every option

At batch size 1 a decode step reads every weight once and does almost no arithmetic,
so the speed limit is memory bandwidth, and the enemy is the host: a step made of
hundreds of small launches from Python leaves the GPU idle most of the time. So:

- weights load straight from safetensors and are fused where that saves launches
  (q/k/v into one matrix, gate/up into one);
- every buffer is allocated once at startup: the KV cache is one contiguous block
  (one sequence needs no page table), and DecodeState holds the decode step's buffers;
- on CUDA the entire decode step, from the embedding lookup through the sampler, is
  one CUDA graph: a handful of fused Triton kernels per layer, the sequence length and
  sampling state kept on the device, replayed once per token with no host work between
  replays and tokens read back a few steps behind the GPU;
- prefill runs in chunks through cuBLAS and FlashInfer attention, outside the graph;
- everywhere else (CPU, or --plain on CUDA) the same model runs in plain torch, which
  is also the reference the fast path is tested against.

The sections follow the data: config, weights, tokenizer, KV cache, model, sampling, GPU
kernels (embedding, GEMVs, attention, sampler), prefill on CUDA, fast decoder, engine, CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the kernels below are defined but never launched
    from types import SimpleNamespace
    triton = tl = SimpleNamespace(jit=lambda fn: fn, constexpr=int)
    HAVE_TRITON = False

DEFAULT_MODEL = os.path.join("weights", "Qwen3-0.6B")
DEFAULT_REPO = "Qwen/Qwen3-0.6B"


class NanofastError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line."""


def is_out_of_memory(e: BaseException) -> bool:  # torch's GPU or CPU allocator, Python or the OS gave up
    text = str(e).lower()  # CPU: "can't allocate memory", on Windows "not enough memory"; the OS's ENOMEM
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "allocate memory" in text or "enough memory" in text


# -----------------------------------------------------------------------------
# config

FP8_BLOCK = 128  # fp8 weights carry one scale per FP8_BLOCK x FP8_BLOCK block
FP8_FORMAT = dict(quant_method="fp8", fmt="e4m3", weight_block_size=[FP8_BLOCK, FP8_BLOCK], activation_scheme="dynamic")


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
    fp8: bool = False  # projections stored as float8_e4m3fn with one scale per 128x128 block


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
        raise NanofastError(f"{path}: model_type {raw.get('model_type')!r} / architectures {archs} is not "
                            "supported; nanofast runs Qwen3 dense models (qwen3, Qwen3ForCausalLM)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NanofastError(f"{path}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    quant = raw.get("quantization_config")
    if quant is not None:  # only the format of Qwen's FP8 releases; anything else would load as noise
        got = dict(fmt="e4m3", activation_scheme="dynamic") | (quant if isinstance(quant, dict) else {})
        bad = {k: got.get(k) for k in FP8_FORMAT if got.get(k) != FP8_FORMAT[k]}
        if bad:
            raise NanofastError(f"{path}: quantization_config with {bad} is not supported; nanofast reads "
                                "fp8 (e4m3) weights with 128x128 block scales")
    try:
        heads = int(raw["num_attention_heads"])
        cfg = Config(vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                     intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
                     num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads", heads)),
                     head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
                     rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                     rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1e6))),
                     tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), fp8=quant is not None)
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
                top_p=float(g.get("top_p", 1.0)) if sampling else 1.0, eos_ids=eos)


# -----------------------------------------------------------------------------
# weights

@dataclass
class Proj:
    """A projection matrix as the kernels read it: weight (N, K) in the model's dtype, or fp8
    (float8_e4m3fn) with scale, one fp32 factor per 128 x 128 block, (N/128, K/128)."""
    weight: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.scale is not None

    @property
    def shape(self):
        return self.weight.shape


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (D,)
    qkv: Proj  # ((Hq + 2 Hkv) hd, D): q, k and v projections stacked
    q_norm: torch.Tensor  # (hd,)
    k_norm: torch.Tensor  # (hd,)
    o: Proj  # (D, Hq hd)
    mlp_norm: torch.Tensor  # (D,)
    gate_up: Proj  # (2 I, D): gate and up projections stacked
    down: Proj  # (D, I)


@dataclass
class Weights:
    embed: torch.Tensor  # (V, D)
    layers: list  # one Layer per decoder block
    norm: torch.Tensor  # (D,)
    lm_head: Proj  # (V, D); its weight is embed itself when tied


def checkpoint_shapes(cfg: Config) -> dict:
    """Every tensor of a released Qwen3 checkpoint, by name, with its shape."""
    D, I, hd, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {"input_layernorm": (D,), "self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D),
             "self_attn.v_proj": (kv, D), "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,),
             "self_attn.o_proj": (D, q), "post_attention_layernorm": (D,), "mlp.gate_proj": (I, D),
             "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    if cfg.fp8:  # each projection also stores the scales of its blocks
        shapes.update({n[:-6] + "weight_scale_inv": (-(-s[0] // FP8_BLOCK), -(-s[1] // FP8_BLOCK))
                       for n, s in shapes.items() if n.endswith("_proj.weight")})
    return shapes


def quantize_fp8(w) -> Proj:  # (N, K) -> fp8 Proj with w ~ weight * scale, block by block
    B, (N, K) = FP8_BLOCK, w.shape
    nb, kb = -(-N // B), -(-K // B)
    x = F.pad(w.float(), (0, kb * B - K, 0, nb * B - N)).view(nb, B, kb, B)
    scale = x.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # 448: the largest float8_e4m3fn
    q = (x / scale[:, None, :, None]).clamp(-448.0, 448.0).view(nb * B, kb * B)[:N, :K]
    return Proj(q.to(torch.float8_e4m3fn).contiguous(), scale)


def dequantize(p: Proj, dtype) -> torch.Tensor:
    """p's weight (N, K) as a dtype matrix: fp8 times its block scales, exact products rounded once."""
    if not p.fp8:
        return p.weight
    w, B, (N, K) = p.weight, FP8_BLOCK, p.shape
    if w.is_cuda and HAVE_TRITON:  # one pass, for prefill: read a byte, write two, per weight
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        _dequant_kernel[p.scale.shape](w, p.scale, out, N, K, p.scale.shape[1], B=B)
        return out
    if N % B or K % B:  # partial edge blocks (small test models): expand the scales
        return (w.float() * p.scale.repeat_interleave(B, 0)[:N].repeat_interleave(B, 1)[:, :K]).to(dtype)
    out = w.to(dtype)  # exact: every e4m3 value is a bf16/fp16/fp32 value
    out.view(N // B, B, K // B, B).mul_(p.scale.view(N // B, 1, K // B, 1))  # in fp32, rounded once
    return out


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


def load_weights(model_dir: str, cfg: Config, dtype: torch.dtype, device, quantize=False, keep_fp8=False,
                 progress=False) -> Weights:
    """Load, check and fuse the weights, one tensor at a time (peak memory ~ one copy). The projections
    have fp8 values if the checkpoint stores them so (cfg.fp8) or quantize rounds them so; keep_fp8 holds
    those as fp8 Projs (the CUDA kernels read them), else they are dequantized to dtype. progress: count
    the layers on stderr."""
    from safetensors import safe_open
    expected, files = checkpoint_shapes(cfg), _checkpoint_files(model_dir)
    handles, where = {}, {}  # file -> open handle; tensor name -> handle
    for path in sorted(set(files.values())):
        if not os.path.exists(path):
            raise NanofastError(f"shard {os.path.basename(path)} listed in the index is missing")
        try:
            handles[path] = safe_open(path, framework="pt", device=str(device))
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
        info = h.get_slice(name)
        shape, kind = tuple(info.get_shape()), info.get_dtype()
        if shape != expected[name]:
            raise NanofastError(f"tensor {name} has shape {shape}, expected {expected[name]}")
        if cfg.fp8 and name.endswith("_proj.weight") and kind != "F8_E4M3":
            raise NanofastError(f"tensor {name} is {kind}, expected F8_E4M3 (config.json says fp8)")

    def get(name, to=dtype):
        try:
            return where[name].get_tensor(name).to(to)
        except Exception as e:
            if is_out_of_memory(e):  # not the file's fault: the engine reports it with the memory figures
                raise
            raise NanofastError(f"cannot read tensor {name} ({e})") from None

    def proj(*names) -> Proj:  # projections stacked into one matrix
        if cfg.fp8:
            parts = [Proj(get(n + ".weight", None), get(n + ".weight_scale_inv", torch.float32)) for n in names]
        elif quantize:
            parts = [quantize_fp8(get(n + ".weight", None)) for n in names]
        else:
            return Proj(torch.cat([get(n + ".weight") for n in names]))
        if not keep_fp8:
            return Proj(torch.cat([dequantize(p, dtype) for p in parts]))
        return Proj(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]))

    layers = []
    for i in range(cfg.num_layers):
        if progress:  # a counter on the terminal: an 8B checkpoint takes seconds
            print(f"\r[nanofast] loading layer {i + 1} of {cfg.num_layers}", end="", file=sys.stderr, flush=True)
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(Layer(attn_norm=get(p + "input_layernorm.weight"),
                            qkv=proj(a + "q_proj", a + "k_proj", a + "v_proj"), q_norm=get(a + "q_norm.weight"),
                            k_norm=get(a + "k_norm.weight"), o=proj(a + "o_proj"),
                            mlp_norm=get(p + "post_attention_layernorm.weight"),
                            gate_up=proj(m + "gate_proj", m + "up_proj"), down=proj(m + "down_proj")))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    if progress:
        print("\r\033[K", end="", file=sys.stderr)  # clears the counter's line
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=Proj(lm_head))


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
        self.defaults = generation_defaults(model_dir)  # sampling defaults and stop ids ("eos_ids")

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @staticmethod
    def chat(prompt: str, system: str | None = None, think: bool = True) -> str:
        """Qwen3's chat template for one user turn (and a system prompt), with the generation prompt."""
        return Tokenizer.template([dict(role="user", content=prompt)], think, system)

    @staticmethod
    def template(messages, think: bool = True, system: str | None = None) -> str:
        """Qwen3's released chat template (without tools) for [{"role", "content"}, ...], after a
        system prompt if given, with the generation prompt. As released, an assistant turn before
        the last user turn keeps only its answer: its <think> block is dropped from the history."""
        messages = ([dict(role="system", content=system)] if system is not None else []) + list(messages)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        text, nl = "", "\n"
        for i, m in enumerate(messages):
            content, reasoning = m["content"], ""
            if m["role"] == "assistant" and "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip(nl).split("<think>")[-1].lstrip(nl)
                content = content.split("</think>")[-1].lstrip(nl)
            if m["role"] == "assistant" and i > last_user and (i == len(messages) - 1 or reasoning):
                content = f"<think>\n{reasoning.strip(nl)}\n</think>\n\n{content.lstrip(nl)}"
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
        text += "<|im_start|>assistant\n"
        return text if think else text + "<think>\n\n</think>\n\n"


def stream_text(tokenizer: Tokenizer, tokens, ids: list):
    """Yield the text of a stream of token ids as they arrive, appending each id to ids. Byte-level
    BPE can split one character over several tokens, and a prefix of them decodes to U+FFFD, so
    such tokens are held back until the character is whole. Closing this closes tokens."""
    pending = []
    try:
        for token in tokens:
            ids.append(token)
            pending.append(token)
            text = tokenizer.decode(pending)
            if not text.endswith("\ufffd"):
                pending = []
                yield text
        if pending:
            yield tokenizer.decode(pending)
    finally:
        tokens.close()


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """K and V of every layer, (max_seq_len, Hkv, hd) each, in one block allocated once. One sequence
    fills rows 0, 1, 2, ... in order, so a page table would be the identity: the cache has none, and
    FlashInfer's single-sequence prefill and the decode kernel read the rows directly.
    tokens: the ids whose K/V rows 0..len(tokens)-1 hold; wrote() keeps it, on every path, where the
    rows are written. After a generation it holds the prompt and every new token but the last."""

    def __init__(self, cfg: Config, max_seq_len: int, dtype, device):
        shape = (cfg.num_layers, 2, max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.data[:, 0]), list(self.data[:, 1])  # per layer
        self.tokens = []

    def wrote(self, pos: int, ids):  # K/V rows pos.. now hold ids; rows after them hold nothing valid
        del self.tokens[pos:]
        self.tokens.extend(ids if len(self.tokens) == pos else [])

    def reusable(self, ids) -> int:  # how many leading tokens of ids the cache holds (all but the last at most)
        return next((i for i, (a, b) in enumerate(zip(self.tokens, ids[:-1])) if a != b),
                    min(len(self.tokens), len(ids) - 1))


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


def plain_attention(q, k, v, pos):  # q (T, Hq, hd), k/v (pos+T, Hkv, hd) -> (T, Hq hd)
    T, S, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # GQA: share kv heads
    scores = torch.einsum("thd,shd->hts", q, k) * q.shape[-1] ** -0.5  # (Hq, T, S)
    # query t sits at position pos + t and sees keys 0..pos+t (bottom-right causal)
    hidden = torch.arange(S, device=q.device)[None, :] > torch.arange(pos, pos + T, device=q.device)[:, None]
    scores = scores.masked_fill(hidden, -math.inf)
    probs = scores.float().softmax(-1).to(q.dtype)  # softmax in fp32, as transformers does
    return torch.einsum("hts,shd->thd", probs, v).reshape(T, -1)


def forward(w: Weights, cfg: Config, cache: KVCache, rope, ids: list, pos: int, attention=plain_attention,
            last_only=False):
    """Run the T tokens ids at positions pos..pos+T-1, writing their K/V into the cache.
    Returns fp32 logits (T, V), or (1, V) for the last token only."""
    T, Hq, Hkv, hd, eps = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
    x = w.embed[torch.tensor(ids, device=w.embed.device)]  # (T, D)
    for layer, k_cache, v_cache in zip(w.layers, cache.k, cache.v):
        q, k, v = (rms_norm(x, layer.attn_norm, eps) @ dequantize(layer.qkv, x.dtype).T).split(
            [Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rope(rms_norm(q.view(T, Hq, hd), layer.q_norm, eps), cos, sin)
        k = apply_rope(rms_norm(k.view(T, Hkv, hd), layer.k_norm, eps), cos, sin)
        k_cache[pos:pos + T], v_cache[pos:pos + T] = k, v.view(T, Hkv, hd)
        x = x + attention(q, k_cache[:pos + T], v_cache[:pos + T], pos) @ dequantize(layer.o, x.dtype).T
        gate, up = (rms_norm(x, layer.mlp_norm, eps) @ dequantize(layer.gate_up, x.dtype).T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ dequantize(layer.down, x.dtype).T
    cache.wrote(pos, ids)
    if last_only:
        x = x[-1:]
    return (rms_norm(x, w.norm, eps) @ w.lm_head.weight.T).float()


# -----------------------------------------------------------------------------
# sampling (plain torch)

def sampling_probs(logits, temperature: float, top_k: int, top_p: float):
    """The distribution (V,) that fp32 logits (V,) are sampled from, with transformers' semantics: divide
    by the temperature (> 0), keep the top_k highest scores (0 = all), then the smallest set whose
    probability reaches top_p (1.0 = all)."""
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
    return scores.softmax(-1)


def sample(logits, temperature: float, top_k: int, top_p: float, generator=None) -> int:
    """One token from fp32 logits (V,); temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator))


# -----------------------------------------------------------------------------
# speculative decoding (plain torch)
#
# A round drafts up to k tokens cheaply, the model scores its last token and the drafts in one
# forward (k + 1 rows, one pass over the weights), keeps the longest prefix of drafts it agrees
# with and adds one token of its own. Drafts are deterministic (prompt lookup, or a draft model's
# greedy tokens), so drawing each row's token as usual and keeping a draft while it equals the
# draw is exact speculative sampling (accept x with probability p(x), else draw from p without x):
# speculation changes the speed, never the tokens' distribution.

def lookup_drafts(context: list, k: int, max_n: int = 3) -> list:
    """Prompt lookup: up to k tokens that followed the latest earlier occurrence of context's last n
    tokens (the longest n <= max_n that occurs), or none."""
    for n in range(min(max_n, len(context) - 1), 0, -1):
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i:i + n] == tail:
                return context[i + n:i + n + k]
    return []


def accept_drafts(rows, drafts: list, temperature, top_k, top_p, generator=None) -> tuple:
    """(a, token): the model keeps drafts[:a] and adds token. rows: its fp32 logits (len(drafts) + 1, V)
    after the token before the drafts and after each draft. Row by row, a token is drawn as sample()
    draws it; a draft is kept while it equals the draw, and the first draw that differs (or the one
    after the last draft) is the model's token. For a draft x, P(draw = x) = p(x), and a draw that is
    not x follows p without x: speculative sampling's rule. The draws are those that decoding without
    drafts would make, so with a seed the tokens are the same with speculation or without."""
    for i, x in enumerate(drafts):
        token = sample(rows[i], temperature, top_k, top_p, generator)
        if token != x:
            return i, token
    return len(drafts), sample(rows[len(drafts)], temperature, top_k, top_p, generator)


# -----------------------------------------------------------------------------
# GPU kernels (Triton)
#
# The kernels of one decode step at batch size 1. Each wrapper is CUDA-graph capturable: it
# derives grids and constexprs from static shapes, allocates nothing and never reads a device
# value on the host (per-token values, such as the position, are read inside the kernels).
#
# PDL (programmatic dependent launch, sm_90+): with use_pdl a kernel may start while the
# previous one is still running. It calls gdc_wait() before touching anything an earlier
# kernel wrote; weights never change, so a GEMV loads its first weight tile before the
# wait. All stores come after the wait. Every program waits, even one with no work, so
# "the previous kernel finished" implies "every earlier kernel finished". A kernel lets the
# next one launch (gdc_launch_dependents) only after its own wait, so at most two kernels
# are resident and a waiting third never takes SM slots. The interpreter cannot run PDL.

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def num_sms():
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # H100 SXM


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# --- 1. embedding lookup

@triton.jit
def _embed_kernel(token_ptr, e_ptr, h_ptr, D, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    token = tl.load(token_ptr).to(tl.int64)
    row = tl.load(e_ptr + token * D + offs, mask=offs < D, other=0.0)
    tl.store(h_ptr + offs, row.to(tl.float32), mask=offs < D)


def embed(tok, E, h, use_pdl=False):
    """tok int32[1], E [V, D], h fp32[D]  ->  h = E[tok]"""
    D = E.shape[1]
    _embed_kernel[(triton.cdiv(D, 1024),)](tok, E, h, D, BLOCK=1024, USE_PDL=use_pdl, launch_pdl=use_pdl,
                                          num_warps=4)


# --- GEMV building blocks
#
# A GEMV at batch size 1 is pure weight streaming. N and K are constexpr: each weight shape
# compiles once, and when the blocks divide the shape evenly (all Qwen3 shapes) the loads carry
# no masks. The K loop is software-pipelined by hand: tile i+1 is loaded before tile i is used,
# so every thread keeps two tiles of 16-byte loads in flight; the last tile is peeled off so the
# prefetch stays in the program's K range. The accumulator stays [BLOCK_N, BLOCK_K] until the end.

@triton.jit
def _load_w(ptrs, rows, kk, N: tl.constexpr, K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # weights are read exactly once: don't let them push activations/KV out of L2
    if EVEN_N and EVEN_K:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=(rows < N)[:, None] & (kk < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
    return w


@triton.jit
def _load_vec(ptrs, kk, K: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=kk < K, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _load_bcast(ptr, kk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr, EVEN_K: tl.constexpr):
    # vector[kk] as a [BLOCK_N, BLOCK_K] tile with equal rows. Loaded with the weight
    # tile's shape it gets the weight tile's register layout; a plain [BLOCK_K] load gets
    # another layout and costs a shared-memory conversion (and a barrier) per tile. The
    # compiler merges the duplicate loads: each thread still reads its columns once.
    offs = tl.broadcast_to(kk[None, :], [BLOCK_N, BLOCK_K])
    return _load_vec(ptr + offs, offs, K, EVEN_K)


@triton.jit
def _zeros_acc(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    if FP8:
        acc = tl.zeros([BLOCK_N, BLOCK_K // 128], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    return acc


@triton.jit
def _accumulate(acc, w, a, s_ptr, row0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
         FP8: tl.constexpr):
    # acc += w * a for the weight tile at columns k0... fp8: the partial sums of each 128-column
    # group times its block scale (the program's rows lie in one 128-row block: BLOCK_N divides
    # 128). Summed per tile, acc stays [BLOCK_N, BLOCK_K / 128], so fp8 tiles can be wide enough
    # to keep as many bytes in flight as bf16's without running out of registers.
    if FP8:
        G: tl.constexpr = BLOCK_K // 128
        K_BLOCKS: tl.constexpr = (K + 127) // 128
        g = k0 // 128 + tl.arange(0, G)
        scale = tl.load(s_ptr + (row0 // 128) * K_BLOCKS + g, mask=g < K_BLOCKS, other=0.0)
        acc += tl.sum(tl.reshape(w.to(tl.float32) * a, [BLOCK_N, G, 128]), axis=2) * scale[None, :]
    else:
        acc += w.to(tl.float32) * a
    return acc


@triton.jit
def _load_xn(x_ptr, nw_ptr, kk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
             EVEN_K: tl.constexpr):
    # x * norm_w for columns kk (as a weight-shaped tile) and x^2 (1-D, summed after the K loop)
    xn = (_load_bcast(x_ptr, kk, BLOCK_N, BLOCK_K, K, EVEN_K) *
          _load_bcast(nw_ptr, kk, BLOCK_N, BLOCK_K, K, EVEN_K))
    x = _load_vec(x_ptr + kk, kk, K, EVEN_K)
    return xn, x * x


# fp8 tiles of the fused RMSNorm GEMVs where a sweep on an H100 (each GEMV timed in a graph, PDL on) beat
# the rule in gemv_tiles: (N, K) -> (BLOCK_N, BLOCK_K, unroll the K loop), for Qwen3's [N_qkv, D] and [2I, D].
# Unrolling lets the loads of later tiles issue early; where it spills registers (4B qkv) it loses.
FP8_TILES = {(6144, 2560): (16, 512, False), (6144, 4096): (16, 1024, True), (12288, 2048): (16, 512, True),
             (19456, 2560): (32, 256, True), (34816, 5120): (8, 1024, True)}


def gemv_tiles(kind: str, N: int, K: int, fp8: bool = False) -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, UNROLL) for a GEMV over an [N, K] matrix (bf16/fp16, or fp8), 4 warps.
    kind: "norm" (rmsnorm_gemv), "silu" (rmsnorm_gemv of [gate; up], N = 2I: BLOCK_N counts outputs, so a
    program streams 2 BLOCK_N rows) or "add" (gemv_add). An H100 needs roughly 16-32 KB of loads in flight
    per SM to saturate HBM, and matrices range from ~4 MB (0.6B o_proj) to ~100 MB (8B gate_up), so:
      * BLOCK_K = 512: a warp reads 256 contiguous bf16 of a row, 16 bytes per thread (fp8: whole
        128-column groups that divide K, up to 2048, summed per group, see _accumulate);
      * BLOCK_N = 8 rows while that still gives >= 3 programs per SM, else 4, to keep every SM busy
        (16 rows is slower, lm_head included); fp8: 16K weights per tile, or FP8_TILES;
      * small-N matrices (o_proj, down_proj: N = D) instead split K into ranges of 256-wide tiles (fp8:
        ranges of two tiles, since a one-tile range has nothing to prefetch, while >= 1024 programs remain),
        whose partial sums gemv_add adds into h in a fixed order. The K loop is unrolled for fp8 only.
    Keep BLOCK_N * BLOCK_K / 128 <= 64 weight elements per thread (<= 32 for "silu", which holds two
    tiles): beyond that the tile, its prefetch and the fp32 accumulator spill on sm_90."""
    if fp8:
        kb = triton.cdiv(K, 128)
        BLOCK_K = 128 * min(16, kb & -kb if K % 128 == 0 else triton.next_power_of_2(kb))
    else:
        BLOCK_K = min(512, max(64, triton.next_power_of_2(K)))
    if kind == "add":
        BLOCK_K = min(BLOCK_K, 1024 if fp8 else 256)
        for bk in (BLOCK_K, 512, 256) if fp8 else ():
            if K % (2 * bk) == 0 and N // 8 * (K // (2 * bk)) >= 1024:
                return 8, bk, K // (2 * bk), False
        return 8, BLOCK_K, min(8, triton.cdiv(K, BLOCK_K)), False
    if fp8:
        BLOCK_N, BLOCK_K, unroll = FP8_TILES.get((N, K), (max(1, min(16, 16384 // BLOCK_K)), BLOCK_K, True))
    else:
        BLOCK_N, unroll = (8 if triton.cdiv(N, 8) >= 3 * num_sms() else 4), False
    if kind == "silu":
        BLOCK_N = max(1, BLOCK_N // 2)
    return BLOCK_N, BLOCK_K, 1, unroll


# --- 2. fused RMSNorm + GEMV:  out = W @ (x * rsqrt(mean(x^2) + eps) * norm_w)
# Every program re-reads x (from L2) and recomputes sum(x^2) in the same loop that uses
# x, so the norm costs no extra launch and no extra pass. SILU (gate/up): W is [gate; up],
# the up rows N rows below the gate rows, and a program streams both tiles of its rows:
# out = silu(W_gate @ xn) * (W_up @ xn).

@triton.jit
def _rmsnorm_gemv_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, out_ptr, eps,
                         N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr, UNROLL: tl.constexpr,
                         SILU: tl.constexpr, USE_PDL: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)                                # [BLOCK_N]
    cols = tl.arange(0, BLOCK_K)                                       # [BLOCK_K]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]   # [BLOCK_N, BLOCK_K]
    u_ptrs = w_ptrs + N * K                                            # SILU: the up rows
    LAST: tl.constexpr = (K - 1) // BLOCK_K * BLOCK_K                  # start of the last tile
    w = _load_w(w_ptrs, rows, cols, N, K, EVEN_N, EVEN_K)              # before the wait: weights are constant
    if SILU:
        wu = _load_w(u_ptrs, rows, cols, N, K, EVEN_N, EVEN_K)
    _pdl_wait(USE_PDL)
    acc = _zeros_acc(BLOCK_N, BLOCK_K, FP8)
    if SILU:
        acc_u = _zeros_acc(BLOCK_N, BLOCK_K, FP8)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, LAST, BLOCK_K, loop_unroll_factor=LAST // BLOCK_K if UNROLL else 1):
        w_next = _load_w(w_ptrs + (k0 + BLOCK_K), rows, k0 + BLOCK_K + cols, N, K, EVEN_N, EVEN_K)
        if SILU:
            wu_next = _load_w(u_ptrs + (k0 + BLOCK_K), rows, k0 + BLOCK_K + cols, N, K, EVEN_N, EVEN_K)
        xn, x2 = _load_xn(x_ptr, nw_ptr, k0 + cols, BLOCK_N, BLOCK_K, K, EVEN_K)
        acc = _accumulate(acc, w, xn, s_ptr, row0, k0, BLOCK_N, BLOCK_K, K, FP8)
        if SILU:
            acc_u = _accumulate(acc_u, wu, xn, s_ptr, N + row0, k0, BLOCK_N, BLOCK_K, K, FP8)
        ss += x2
        w = w_next
        if SILU:
            wu = wu_next
    xn, x2 = _load_xn(x_ptr, nw_ptr, LAST + cols, BLOCK_N, BLOCK_K, K, EVEN_K)
    acc = _accumulate(acc, w, xn, s_ptr, row0, LAST, BLOCK_N, BLOCK_K, K, FP8)
    if SILU:
        acc_u = _accumulate(acc_u, wu, xn, s_ptr, N + row0, LAST, BLOCK_N, BLOCK_K, K, FP8)
    ss += x2
    rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    y = tl.sum(acc, axis=1) * rstd                                     # [BLOCK_N]
    if SILU:
        up = tl.sum(acc_u, axis=1) * rstd
        y = y * tl.sigmoid(y) * up
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


def rmsnorm_gemv(x, norm_w, W: Proj, out, eps, silu=False, BLOCK_N=None, BLOCK_K=None, use_pdl=False):
    """out = W @ (x * rsqrt(mean(x^2) + eps) * norm_w): x [K] (the fp32 residual),
    norm_w [K], out [N] (qkv: bf16/fp16, logits: fp32). silu: W = [gate; up] (2I, K) and out [I] =
    silu(gate @ xn) * (up @ xn). BLOCK_N/BLOCK_K override gemv_tiles (tests)."""
    N, K = W.shape
    bn, bk, _, unroll = gemv_tiles("silu" if silu else "norm", N, K, W.fp8)
    BLOCK_N, BLOCK_K = BLOCK_N or bn, BLOCK_K or bk
    rows = N // 2 if silu else N  # outputs
    _rmsnorm_gemv_kernel[(triton.cdiv(rows, BLOCK_N),)](
        x, norm_w, W.weight, W.scale if W.fp8 else W.weight, out, eps, rows, K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        EVEN_N=rows % BLOCK_N == 0, EVEN_K=K % BLOCK_K == 0, FP8=W.fp8, UNROLL=unroll, SILU=silu, USE_PDL=use_pdl,
        launch_pdl=use_pdl, num_warps=4)


# --- 4. GEMV + residual add:  h += W @ a   (o_proj, down_proj)
# N = D is small and K is large, so K is split into SPLIT_K ranges of SPLIT_COLS columns (a multiple
# of BLOCK_K; the last range may be shorter, so no tile is masked where BLOCK_K divides K); program
# (i, j) stores its partial sums in partials[j]. The programs of a row block then take a ticket (the
# pattern of _is_last_program), and the last one adds the SPLIT_K partials to h in a fixed order.
# Atomic fp32 adds would round differently for each order the programs happen to finish in, and the
# same seed would not give the same tokens; a fixed order gives the same h on every run.

@triton.jit
def _gemv_add_kernel(a_ptr, w_ptr, s_ptr, h_ptr, part_ptr, arrivals_ptr,
                     N: tl.constexpr, K: tl.constexpr, SPLIT_COLS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_P2: tl.constexpr,
                     EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    k_begin = tl.program_id(1) * SPLIT_COLS
    cols = k_begin + tl.arange(0, BLOCK_K)                             # [BLOCK_K] columns of tile 0
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    # the last split may be shorter; where all splits are whole, the loop bound is a compile-time constant
    EVEN_SPLIT: tl.constexpr = K % SPLIT_COLS == 0
    LAST = SPLIT_COLS - BLOCK_K if EVEN_SPLIT else (tl.minimum(SPLIT_COLS, K - k_begin) - 1) // BLOCK_K * BLOCK_K
    w = _load_w(w_ptrs, rows, cols, N, K, EVEN_N, EVEN_K)
    _pdl_wait(USE_PDL)
    acc = _zeros_acc(BLOCK_N, BLOCK_K, FP8)
    for k0 in range(0, LAST, BLOCK_K):
        w_next = _load_w(w_ptrs + (k0 + BLOCK_K), rows, cols + (k0 + BLOCK_K), N, K, EVEN_N, EVEN_K)
        a = _load_bcast(a_ptr, cols + k0, BLOCK_N, BLOCK_K, K, EVEN_K)
        acc = _accumulate(acc, w, a, s_ptr, row0, k_begin + k0, BLOCK_N, BLOCK_K, K, FP8)
        w = w_next
    a = _load_bcast(a_ptr, cols + LAST, BLOCK_N, BLOCK_K, K, EVEN_K)
    acc = _accumulate(acc, w, a, s_ptr, row0, k_begin + LAST, BLOCK_N, BLOCK_K, K, FP8)
    y = tl.sum(acc, axis=1)                                            # [BLOCK_N]
    if SPLIT_K == 1:
        h = tl.load(h_ptr + rows, mask=rows < N, other=0.0)
        tl.store(h_ptr + rows, h + y, mask=rows < N)
    else:
        tl.store(part_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)
        tl.debug_barrier()  # every thread's partials stored before the ticket (released by acq_rel)
        ticket = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the row block's last program: all partials, from L2, summed alike every run
            j = tl.arange(0, SPLIT_P2)[:, None]
            ok = (j < SPLIT_K) & (rows < N)[None, :]
            y = tl.sum(tl.load(part_ptr + j * N + rows[None, :], mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            h = tl.load(h_ptr + rows, mask=rows < N, other=0.0)
            tl.store(h_ptr + rows, h + y, mask=rows < N)
            tl.store(arrivals_ptr + tl.program_id(0), 0)


def gemv_add(a, W: Proj, h, scratch, BLOCK_N=None, BLOCK_K=None, SPLIT_K=None, use_pdl=False):
    """h += W @ a: a [K] (bf16/fp16), W [N, K], h fp32 [N]; scratch from add_scratch (partials and
    arrival counters, left zeroed). The overrides are for tests."""
    N, K = W.shape
    bn, bk, sk, _ = gemv_tiles("add", N, K, W.fp8)
    BLOCK_N, BLOCK_K, SPLIT_K = BLOCK_N or bn, BLOCK_K or bk, SPLIT_K or sk
    cols = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    split = triton.cdiv(K, cols)  # rounding the range up to BLOCK_K may leave fewer ranges
    part, arrivals = scratch
    assert part.shape[0] >= split and part.shape[1] == N and arrivals.numel() >= triton.cdiv(N, BLOCK_N)
    _gemv_add_kernel[(triton.cdiv(N, BLOCK_N), split)](
        a, W.weight, W.scale if W.fp8 else W.weight, h, part, arrivals, N=N, K=K, SPLIT_COLS=cols, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, SPLIT_K=split, SPLIT_P2=triton.next_power_of_2(split), EVEN_N=N % BLOCK_N == 0,
        EVEN_K=K % BLOCK_K == 0, FP8=W.fp8, USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=4)


def add_scratch(N: int, device, max_split: int = 64):
    """gemv_add's scratch for outputs of size N: partials fp32 (max_split, N), arrival counters int32 (N,)."""
    return (torch.zeros(max_split, N, dtype=torch.float32, device=device),
            torch.zeros(N, dtype=torch.int32, device=device))


# --- 5. decode attention: q/k RMSNorm + RoPE + KV-cache append, then split-KV attention
#
# grid = (Hkv, NSPLIT). Program (h, s) serves all G = Hq/Hkv query heads of kv head h (so K/V
# are read once) over the s-th chunk of rows 0..pos, its G query rows padded to BLOCK_G >= 16 so
# both products use tl.dot (tensor cores; the padding is free in a bandwidth-bound kernel). A
# split has a fixed cost (partials to scratch, an atomic, a merge), so up to SINGLE_MAX tokens
# one program per kv head does everything and writes the output itself.
#
# The program whose rows include pos (the last active split) also writes the new token's k and
# v into cache row pos, then runs a CTA barrier (bar.sync makes a CTA's global stores visible to
# its threads) before reading that row back. No other program reads row pos, and the next
# token's kernel is ordered after this one, so nothing else can race.
#
# Merge in the same launch: each active program writes its partial (m, l, acc) to scratch,
# runs a CTA barrier, then one thread bumps counter[h] with acq_rel at gpu scope (release is
# cumulative, so every thread's stores are published: the pattern of cooperative groups'
# grid sync). The program that arrives last merges the n_active partials, reading them with
# .cg loads (L2, never a stale L1 line), and resets counter[h] for the next replay.
#
# The cache rows before pos come from earlier replays, so the first K/V tile is loaded
# before the PDL wait; the next kernel may launch only after the main loop (earlier, its
# waiting programs took SM slots from the streaming ones). num_stages=4 keeps three K/V
# tiles in flight while one is used.

@triton.jit
def _norm_rope(x_ptr, rows, d, w_ptr, cos_ptr, sin_ptr, pos, eps, row_ok, HD: tl.constexpr):
    """RMSNorm(x) * w, then RoPE at pos, for heads rows [R, 1] of x, elements d [1, HD] -> fp32 [R, HD].
    All in fp32, rounded once at the end; forward() and the prefill copy (_qk_norm_rope_rows) round after
    every torch op, as they must to give prefill the reference's exact values, which decode need not.
    RoPE (rotate_half form) pairs element d with d +/- HD/2, so x's partner (halves swapped) is loaded too:
        y[d] = x[d] * cos[d % HD/2] - x[d + HD/2] * sin[..]   for d <  HD/2
        y[d] = x[d] * cos[d % HD/2] + x[d - HD/2] * sin[..]   for d >= HD/2"""
    HALF: tl.constexpr = HD // 2
    pair = (d + HALF) % HD                                             # partner index of d
    x = tl.load(x_ptr + rows * HD + d, mask=row_ok, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + rows * HD + pair, mask=row_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]        # per head
    x = x * rstd * tl.load(w_ptr + d).to(tl.float32)
    xp = xp * rstd * tl.load(w_ptr + pair).to(tl.float32)
    c = tl.load(cos_ptr + pos * HALF + d % HALF)
    s = tl.load(sin_ptr + pos * HALF + d % HALF)
    return x * c + tl.where(d < HALF, -xp, xp) * s


@triton.jit
def _attend_tile(q, k, v, t_ok, m, l, acc, qk_scale):
    """Online softmax over one tile of rows: q [G, HD], k/v [BLOCK_S, HD], t_ok [BLOCK_S]."""
    s = tl.dot(q, tl.trans(k)) * qk_scale                      # [BLOCK_G, BLOCK_S]
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a valid row
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _decode_attn_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
                        k_ptr, v_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, qk_scale, eps,
                        stride_kt, stride_kh, stride_vt, stride_vh,
                        G: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr, SINGLE_MAX: tl.constexpr,
                        MERGE_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    h = tl.program_id(0)
    split = tl.program_id(1)
    pos = tl.load(pos_ptr)  # written by an earlier replay's sampler: safe before the PDL wait
    n_rows = pos + 1
    chunk = tl.cdiv(tl.cdiv(n_rows, NSPLIT), BLOCK_S) * BLOCK_S
    chunk = tl.where(n_rows <= SINGLE_MAX, SINGLE_MAX, chunk)  # short contexts: one program per kv head
    n_active = tl.cdiv(n_rows, chunk)
    start = split * chunk
    end = tl.minimum(start + chunk, n_rows)  # start >= end for splits with no rows
    d = tl.arange(0, HD)
    k_base = k_ptr + h * stride_kh + d[None, :]
    v_base = v_ptr + h * stride_vh + d[None, :]
    t = start + tl.arange(0, BLOCK_S)  # [BLOCK_S] rows of the first tile
    old_rows = ((t < end) & (t < pos))[:, None]
    k0 = tl.load(k_base + t[:, None] * stride_kt, mask=old_rows, other=0.0)  # [BLOCK_S, HD]
    v0 = tl.load(v_base + t[:, None] * stride_vt, mask=old_rows, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()   # every program waits, even one with no rows
    if split >= n_active:
        return                     # no rows for this split (exiting also counts as the PDL trigger)

    g = tl.arange(0, BLOCK_G)
    qh = h * G + g                                                   # [BLOCK_G] query heads
    g_ok = g < G
    HQ: tl.constexpr = G * HKV
    q = _norm_rope(qkv_ptr, qh[:, None], d[None, :], qw_ptr, cos_ptr, sin_ptr, pos, eps,
                   g_ok[:, None], HD).to(k_ptr.dtype.element_ty)  # rounded like a stored q
    if split == n_active - 1:  # our rows include pos: append the new token's k and v
        k_new = _norm_rope(qkv_ptr, tl.full([1, 1], HQ, tl.int32) + h, d[None, :], kw_ptr, cos_ptr,
                           sin_ptr, pos, eps, d[None, :] < HD, HD)  # [1, HD]
        v_new = tl.load(qkv_ptr + (HQ + HKV + h) * HD + d)
        tl.store(k_ptr + pos * stride_kt + h * stride_kh + d[None, :], k_new.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + pos * stride_vt + h * stride_vh + d, v_new.to(v_ptr.dtype.element_ty))
        tl.debug_barrier()     # all our threads now see row pos in the cache
    if start + BLOCK_S > pos:  # the first tile holds row pos: read it again, now written
        k0 = tl.load(k_base + t[:, None] * stride_kt, mask=(t < end)[:, None], other=0.0)
        v0 = tl.load(v_base + t[:, None] * stride_vt, mask=(t < end)[:, None], other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)   # running max (log2 domain)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_G, HD], dtype=tl.float32)            # unnormalized output
    m, l, acc = _attend_tile(q, k0, v0, t < end, m, l, acc, qk_scale)
    for t0 in range(start + BLOCK_S, end, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)                             # [BLOCK_S] cache rows
        t_ok = t < end
        k = tl.load(k_base + t[:, None] * stride_kt, mask=t_ok[:, None], other=0.0)  # [BLOCK_S, HD]
        v = tl.load(v_base + t[:, None] * stride_vt, mask=t_ok[:, None], other=0.0)
        m, l, acc = _attend_tile(q, k, v, t_ok, m, l, acc, qk_scale)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()

    if n_active == 1:  # the only split: finish here, no scratch, no atomic
        res = acc / l[:, None]
        tl.store(out_ptr + qh[:, None] * HD + d[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:
        # partial -> scratch: m, l [Hq, NSPLIT], acc [Hq, NSPLIT, HD]
        row = qh * NSPLIT + split
        tl.store(m_ptr + row, m, mask=g_ok)
        tl.store(l_ptr + row, l, mask=g_ok)
        tl.store(acc_ptr + row[:, None] * HD + d[None, :], acc, mask=g_ok[:, None])
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel")
        if arrived == n_active - 1:  # last to arrive: merge the n_active partials
            sp = tl.arange(0, MERGE_BLOCK)  # a block of partials merged at once
            for gi in tl.static_range(G):
                base = (h * G + gi) * NSPLIT
                m_max = float("-inf")
                for s0 in tl.static_range(0, NSPLIT, MERGE_BLOCK):  # masked past n_active: no loads
                    ms = tl.load(m_ptr + base + s0 + sp, mask=s0 + sp < n_active, other=float("-inf"),
                                 cache_modifier=".cg")
                    m_max = tl.maximum(m_max, tl.max(ms, axis=0))
                den = tl.zeros([MERGE_BLOCK], dtype=tl.float32)
                o = tl.zeros([MERGE_BLOCK, HD], dtype=tl.float32)
                for s0 in tl.static_range(0, NSPLIT, MERGE_BLOCK):
                    ok = s0 + sp < n_active
                    ms = tl.load(m_ptr + base + s0 + sp, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(l_ptr + base + s0 + sp, mask=ok, other=0.0, cache_modifier=".cg")
                    a = tl.load(acc_ptr + (base + s0 + sp)[:, None] * HD + d[None, :], mask=ok[:, None],
                                other=0.0, cache_modifier=".cg")
                    w = tl.exp2(ms - m_max)   # masked slots: exp2(-inf) = 0
                    den += w * ls
                    o += w[:, None] * a
                res = tl.sum(o, axis=0) / tl.sum(den, axis=0)
                tl.store(out_ptr + (h * G + gi) * HD + d, res.to(out_ptr.dtype.element_ty))
            tl.store(cnt_ptr + h, 0)


def make_attention_scratch(Hq, Hkv, hd, nsplit, device):
    """Split-KV scratch, shared by all layers: m, l [Hq, nsplit], acc [Hq, nsplit, hd] and
    the arrival counters int32[Hkv] = 0. nsplit is the grid's second dimension."""
    f32 = dict(dtype=torch.float32, device=device)
    return (torch.empty(Hq, nsplit, **f32), torch.empty(Hq, nsplit, **f32),
            torch.empty(Hq, nsplit, hd, **f32), torch.zeros(Hkv, dtype=torch.int32, device=device))


def decode_attention(qkv, q_norm_w, k_norm_w, cos, sin, pos, k_cache, v_cache, out, scratch, scale, eps,
                     BLOCK_S=64, single_max=256, use_pdl=False):
    """qkv [(Hq+2Hkv)*hd] (the qkv GEMV's output), q/k_norm_w [hd], cos/sin fp32 [max_pos, hd/2],
    pos int32[1], k_cache/v_cache [S, Hkv, hd], out [Hq*hd], scratch from make_attention_scratch.
    Writes k/v cache row pos, then attends rows 0..pos."""
    Hkv, hd = k_cache.shape[1], k_cache.shape[2]
    Hq = out.numel() // hd
    m_s, l_s, acc_s, cnt = scratch
    nsplit = m_s.shape[1]
    assert qkv.is_contiguous() and qkv.numel() == (Hq + 2 * Hkv) * hd and Hq % Hkv == 0
    assert cos.is_contiguous() and cos.shape[1] == hd // 2 and k_cache.stride(2) == v_cache.stride(2) == 1
    _decode_attn_kernel[(Hkv, nsplit)](
        qkv, q_norm_w, k_norm_w, cos, sin, pos, k_cache, v_cache, out, m_s, l_s, acc_s, cnt, scale * LOG2E, eps,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        G=Hq // Hkv, HKV=Hkv, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), BLOCK_S=BLOCK_S,
        NSPLIT=nsplit, SINGLE_MAX=single_max, MERGE_BLOCK=min(32, triton.next_power_of_2(nsplit)),
        USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=4, num_stages=4)


# --- 6. the sampler, inside the graph
#
# sample_on_gpu() makes the same 7 launches on every call, each over cdiv(V, BLOCK) programs:
# a first pass (argmax, max, the first top-k digit), two more top-k digits, three top-p digits
# and a Gumbel draw that writes token, pos, draws and a ring slot. The settings live in device
# memory; a kernel they turn off returns at once. The semantics are sample()'s (transformers'): top-k
# keeps ties with the k-th score; top-p, on the softmax over the top-k survivors, keeps a token
# iff the mass of the tokens scored strictly higher is < top_p.
#
# * Keys. key(s) is the order-preserving uint32 image of the fp32 score (negative: flip all
#   bits; positive: flip the sign bit; -0.0 counts as +0.0), so each filter becomes a
#   threshold on the key: allowed = {i : key_i >= threshold}, ties included.
# * Radix select. The threshold is found digit by digit, most significant first. Each pass
#   histograms the elements whose higher bits equal the prefix found so far (counts for top-k,
#   mass exp(s - s_max) in fixed point for top-p); the last program to finish finds the bin holding the k-th
#   element, or where the mass reaches top_p * Z_k, extends the prefix and resets bins and counter.
# * Top-p candidates. Token i cannot survive top-p if n * w_i <= (1 - top_p) * Z_k, with
#   w_i = exp(s_i - s_max) and n the size of the top-k set: the tokens at or below it hold at
#   most that mass. Leaving them out of the histograms cannot move the threshold, and for real
#   logits only a few hundred remain. Z_k >= 1 with top-k on (the max is in the set), Z_k = Z
#   (summed in the first pass) without; half that floor covers rounding.
# * Gumbel-max. argmax_i (s_i + g_i), g_i = -log(-log(u_i)), is an exact sample of the
#   softmax over the set the argmax runs over; u_i = Philox(key seed, counter (draws, i)).

# Radix digits (shift, bits), 8 + 12 + 12 = 32 key bits. The first top-k digit sees every element,
# so it is narrow (256 bins) and reduced in each program with tl.histogram; later passes see only
# the elements sharing the prefix (usually a few), so wide digits with direct atomics keep them at 3.
DIGITS = ((24, 8), (12, 12), (0, 12))
RADIX_PASSES = [(False, digit) for digit in DIGITS[1:]] + [(True, digit) for digit in DIGITS]  # (top-p?, digit)
MAX_BINS = 1 << 12

# Probability masses that programs add up with atomics are 64-bit fixed point, mass * 2^40 (at most
# V <= 2^23 terms of at most 1): integer sums do not depend on the order of the atomics, so the
# thresholds, like the residual stream, are the same on every run.
MASS_ONE = tl.constexpr(1099511627776.0)  # 2^40

# Scalar slots of DecodeState.ints (int64; key prefixes are uint32 values) and DecodeState.floats.
I_ARGMAX = tl.constexpr(0)       # argmax of the logits
I_TOPK_PREFIX = tl.constexpr(1)  # top-k key prefix found so far; after the last pass: the threshold
I_TOPK_ABOVE = tl.constexpr(2)   # number of elements with a key above the prefix range
I_TOPK_COUNT = tl.constexpr(3)   # number of elements kept by top-k (V when top-k is off)
I_TOPP_PREFIX = tl.constexpr(4)  # the same for top-p
I_ZK = tl.constexpr(5)           # mass of the top-k set, sum exp(s - s_max); atomically accumulated
I_TOPP_TARGET = tl.constexpr(6)  # top_p * Z_k, rounded up
I_TOPP_ABOVE = tl.constexpr(7)   # mass of the elements above the top-p prefix range
F_SMAX = tl.constexpr(0)         # max score, s_max = max(logits) / T
F_Z = tl.constexpr(1)            # sum exp(s - s_max) over all V (only when top-p is on, top-k off)


@triton.jit
def _load_settings(temperature_ptr, top_k_ptr, top_p_ptr, V):
    t = tl.load(temperature_ptr)
    k = tl.load(top_k_ptr)
    p = tl.maximum(tl.load(top_p_ptr), 0.0)
    sampling = t > 0.0
    topk_on = sampling & (k > 0) & (k < V)   # k >= V keeps everything, like k = 0
    topp_on = sampling & (p < 1.0)
    return t, k, p, sampling, topk_on, topp_on


@triton.jit
def _logits_block(logits_ptr, V, BLOCK: tl.constexpr):
    """Program pid's BLOCK logits [pid * BLOCK, (pid + 1) * BLOCK), -inf past the vocabulary."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    return pid, offs, valid, tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)


@triton.jit
def _scores_and_keys(x, t):
    """s = x / t rounded as torch rounds it, and key = order-preserving uint32 image of s."""
    s = tl.math.div_rn(x, t)  # plain "/" is approximate on GPU; HF's cut-offs need the exact s
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0 for torch, so both must get the same key
    bits = s.to(tl.uint32, bitcast=True)
    negative = (bits.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True)  # 0 or ~0
    key = bits ^ (negative | 0x80000000)
    return s, key


@triton.jit
def _digit(key, SHIFT: tl.constexpr, BITS: tl.constexpr):
    return ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _mass(w):  # fp32 w in [0, 1] -> fixed point
    return tl.floor(w * MASS_ONE + 0.5).to(tl.int64)


@triton.jit
def _add_to_bins(bins_ptr, digit, val, mask, NBINS: tl.constexpr):
    """bins[digit] += val for the masked elements of this block, with atomics. Atomics on one
    address serialise in L2, and ties or flat tails crowd one bin, so the block's lowest and
    highest bins are summed here and sent as one atomic each."""
    lo = tl.min(tl.where(mask, digit, NBINS), axis=0)
    hi = tl.max(tl.where(mask, digit, -1), axis=0)
    lo_sum = tl.sum(tl.where(mask & (digit == lo), val, 0), axis=0)
    hi_sum = tl.sum(tl.where(mask & (digit == hi), val, 0), axis=0)
    tl.atomic_add(bins_ptr + lo, lo_sum, mask=lo < NBINS, sem="relaxed")
    tl.atomic_add(bins_ptr + hi, hi_sum, mask=(hi >= 0) & (hi != lo), sem="relaxed")
    rest = mask & (digit != lo) & (digit != hi)
    tl.atomic_add(bins_ptr + digit, val, mask=rest, sem="relaxed")


@triton.jit
def _is_last_program(arrivals_ptr):
    """Take a ticket; True in the program that finishes last. The barrier orders every thread's
    stores and atomics before the ticket (release); the acquire half lets the last program see them all."""
    tl.debug_barrier()
    ticket = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel")
    return ticket == tl.num_programs(0) - 1


@triton.jit
def _scan_bins(bins_ptr, NBINS: tl.constexpr, above, target):
    """Find the highest digit d with above + sum(bins[d:]) >= target, then zero the bins; returns
    (d, above + sum(bins[d+1:]), bins[d]). If rounding left the target unreached, the lowest non-empty
    bin (more tokens, not none). Last program only; volatile loads bypass L1, so none is stale."""
    j = tl.arange(0, NBINS)                                   # j = NBINS-1-d: top bin first
    vals = tl.load(bins_ptr + (NBINS - 1 - j), volatile=True)
    reached = (above + tl.cumsum(vals, axis=0)) >= target     # above + sum(bins[NBINS-1-j:])
    j_hit = tl.min(tl.where(reached, j, NBINS), axis=0)
    j_low = tl.max(tl.where(vals > 0, j, 0), axis=0)
    j_hit = tl.where(j_hit < NBINS, j_hit, j_low)
    higher = tl.sum(tl.where(j < j_hit, vals, 0), axis=0)
    at = tl.sum(tl.where(j == j_hit, vals, 0), axis=0)
    tl.store(bins_ptr + j, tl.zeros([NBINS], vals.dtype))
    return NBINS - 1 - j_hit, above + higher, at


@triton.jit
def _best_of_parts(val_ptr, idx_ptr, NUM_PARTS: tl.constexpr):
    """(value, index) of the best of the programs' partial results, the lowest index among ties,
    and every part's value. Called by the last program; volatile loads bypass L1."""
    j = tl.arange(0, NUM_PARTS)
    live = j < tl.num_programs(0)
    vals = tl.load(val_ptr + j, mask=live, other=float("-inf"), volatile=True)
    idxs = tl.load(idx_ptr + j, mask=live, other=0, volatile=True)
    best, part = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    return best, tl.sum(tl.where(j == part, idxs, 0), axis=0), vals


@triton.jit
def _emit_token(token, token_ptr, pos_ptr, draws_ptr, ring_ptr, ring_size):  # the next step's input
    draws = tl.load(draws_ptr)
    tl.store(token_ptr, token)
    tl.store(ring_ptr + draws % ring_size, token)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    tl.store(draws_ptr, draws + 1)


@triton.jit
def _first_pass_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
    token_ptr, pos_ptr, draws_ptr, ring_ptr, ring_size,
    ints_ptr, floats_ptr, arrivals_ptr, count_bins_ptr, part_val_ptr, part_idx_ptr, part_z_ptr,
    V, BLOCK: tl.constexpr, NUM_PARTS: tl.constexpr,
    SHIFT: tl.constexpr, BITS: tl.constexpr, COUNTER: tl.constexpr, USE_PDL: tl.constexpr,
):
    """argmax / max of the logits (+ Z when top-p runs without top-k) and the first top-k digit."""
    _pdl_wait(USE_PDL)
    pid, offs, valid, x = _logits_block(logits_ptr, V, BLOCK)
    t, k, p, sampling, topk_on, topp_on = _load_settings(temperature_ptr, top_k_ptr, top_p_ptr, V)

    # Lowest index among equal maxima, here and across programs below.
    x_max, i_max = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_val_ptr + pid, x_max)
    tl.store(part_idx_ptr + pid, pid * BLOCK + i_max)

    if topk_on:
        _, key = _scores_and_keys(x, t)
        # Every element counts in this pass: reduce in-program first, then one atomic per bin.
        hist = tl.histogram(_digit(key, SHIFT, BITS), 1 << BITS, mask=valid)  # [1 << BITS]
        tl.atomic_add(count_bins_ptr + tl.arange(0, 1 << BITS), hist, mask=hist > 0, sem="relaxed")
    need_z = topp_on & ~topk_on
    if need_z:
        # sum exp(s - local max); the last program rescales each to the global max.
        s = tl.math.div_rn(x, t)
        s_local_max = tl.math.div_rn(x_max, t)
        w = tl.where(s > float("-inf"), tl.exp(s - s_local_max), 0.0)
        tl.store(part_z_ptr + pid, tl.sum(w, axis=0))

    if _is_last_program(arrivals_ptr + COUNTER):
        best_val, argmax, vals = _best_of_parts(part_val_ptr, part_idx_ptr, NUM_PARTS)
        tl.store(ints_ptr + I_ARGMAX, argmax)
        if t == 0.0:
            _emit_token(argmax, token_ptr, pos_ptr, draws_ptr, ring_ptr, ring_size)
        if sampling:
            s_max = tl.math.div_rn(best_val, t)
            tl.store(floats_ptr + F_SMAX, s_max)
            if need_z:
                j = tl.arange(0, NUM_PARTS)
                z_parts = tl.load(part_z_ptr + j, mask=j < tl.num_programs(0), other=0.0, volatile=True)
                s_local_max = tl.math.div_rn(vals, t)
                z = tl.sum(tl.where(s_local_max > float("-inf"),
                                    z_parts * tl.exp(s_local_max - s_max), 0.0), axis=0)
                tl.store(floats_ptr + F_Z, z)
            if topk_on:
                d, above, _ = _scan_bins(count_bins_ptr, 1 << BITS, 0, k)
                tl.store(ints_ptr + I_TOPK_PREFIX, d)
                tl.store(ints_ptr + I_TOPK_ABOVE, above)
            else:
                tl.store(ints_ptr + I_TOPK_PREFIX, 0)  # threshold 0: every key passes
                tl.store(ints_ptr + I_TOPK_COUNT, V)
        tl.store(arrivals_ptr + COUNTER, 0)


@triton.jit
def _radix_pass_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, ints_ptr, floats_ptr, arrivals_ptr, bins_ptr,
    V, BLOCK: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, COUNTER: tl.constexpr,
    TOPP: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One more digit of a threshold key. Top-k: the largest key t with count(key >= t) >= k.
    TOPP: the largest t with mass(key >= t) >= top_p * Z_k, over the top-p candidates."""
    _pdl_wait(USE_PDL)
    t, k, p, sampling, topk_on, topp_on = _load_settings(temperature_ptr, top_k_ptr, top_p_ptr, V)
    FIRST: tl.constexpr = SHIFT + BITS == 32  # top-p's first digit: no prefix yet
    PREFIX: tl.constexpr = I_TOPP_PREFIX if TOPP else I_TOPK_PREFIX
    on = topk_on
    if TOPP:
        on = topp_on
    if on:
        pid, offs, valid, x = _logits_block(logits_ptr, V, BLOCK)
        s, key = _scores_and_keys(x, t)
        cand = valid
        if TOPP:
            w = tl.exp(s - tl.load(floats_ptr + F_SMAX))  # unnormalised probability, <= 1
            in_topk = valid & (key >= tl.load(ints_ptr + I_TOPK_PREFIX).to(tl.uint32))
            z_bound = tl.where(topk_on, 1.0, tl.load(floats_ptr + F_Z))
            floor = 0.5 * (1.0 - p) * z_bound / tl.load(ints_ptr + I_TOPK_COUNT).to(tl.float32)
            cand = in_topk & (w >= floor)  # the top-p candidates (see the notes above)
            if FIRST:  # also sum Z_k, the mass of the whole top-k set
                tl.atomic_add(ints_ptr + I_ZK, tl.sum(tl.where(in_topk, _mass(w), 0), axis=0), sem="relaxed")
        if not FIRST:
            prefix = tl.load(ints_ptr + PREFIX).to(tl.uint32)
            cand = cand & ((key >> (SHIFT + BITS)) == prefix)
        if tl.max(cand.to(tl.int32), axis=0) > 0:
            if TOPP:
                _add_to_bins(bins_ptr, _digit(key, SHIFT, BITS), _mass(w), cand, 1 << BITS)
            else:
                _add_to_bins(bins_ptr, _digit(key, SHIFT, BITS), cand.to(tl.int32), cand, 1 << BITS)

        if _is_last_program(arrivals_ptr + COUNTER):
            if not TOPP:
                d, above, at = _scan_bins(bins_ptr, 1 << BITS, tl.load(ints_ptr + I_TOPK_ABOVE), k)
                tl.store(ints_ptr + I_TOPK_ABOVE, above)
                tl.store(ints_ptr + I_TOPK_COUNT, above + at)  # final after the last pass
            elif FIRST:
                z_topk = tl.load(ints_ptr + I_ZK, volatile=True)
                tl.store(ints_ptr + I_ZK, 0)
                # mass >= top_p * Z_k, in integers; top_p = 0 still keeps the top token, as HF does
                target = tl.maximum(tl.math.ceil(p.to(tl.float64) * z_topk.to(tl.float64)).to(tl.int64), 1)
                tl.store(ints_ptr + I_TOPP_TARGET, target)
                d, above, _ = _scan_bins(bins_ptr, 1 << BITS, 0, target)
                tl.store(ints_ptr + I_TOPP_ABOVE, above)
            else:
                d, above, _ = _scan_bins(bins_ptr, 1 << BITS, tl.load(ints_ptr + I_TOPP_ABOVE),
                                         tl.load(ints_ptr + I_TOPP_TARGET))
                tl.store(ints_ptr + I_TOPP_ABOVE, above)
            if FIRST:
                tl.store(ints_ptr + PREFIX, d)
            else:
                tl.store(ints_ptr + PREFIX, ((prefix << BITS) | d.to(tl.uint32)).to(tl.int64))
            tl.store(arrivals_ptr + COUNTER, 0)


@triton.jit
def _gumbel_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, seed_ptr,
    token_ptr, pos_ptr, draws_ptr, ring_ptr, ring_size,
    ints_ptr, arrivals_ptr, part_val_ptr, part_idx_ptr,
    V, BLOCK: tl.constexpr, NUM_PARTS: tl.constexpr, COUNTER: tl.constexpr, USE_PDL: tl.constexpr,
):
    """token = argmax over allowed i of (s_i + Gumbel_i); the last program writes the outputs."""
    _pdl_wait(USE_PDL)
    t, k, p, sampling, topk_on, topp_on = _load_settings(temperature_ptr, top_k_ptr, top_p_ptr, V)
    if sampling:
        pid, offs, valid, x = _logits_block(logits_ptr, V, BLOCK)
        s, key = _scores_and_keys(x, t)
        threshold = tl.where(topp_on, tl.load(ints_ptr + I_TOPP_PREFIX),
                             tl.load(ints_ptr + I_TOPK_PREFIX)).to(tl.uint32)
        allowed = valid & (key >= threshold)

        best_val = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        if tl.max(allowed.to(tl.int32), axis=0) > 0:  # with top-k/top-p most blocks skip the RNG
            draws = tl.load(draws_ptr)
            u = tl.rand(tl.load(seed_ptr), (draws << 32) + offs.to(tl.int64))
            gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-30)))  # u can be exactly 0
            score = tl.where(allowed, s + gumbel, float("-inf"))
            best_val, best_i = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            best_idx = pid * BLOCK + best_i
        tl.store(part_val_ptr + pid, best_val)
        tl.store(part_idx_ptr + pid, best_idx)

        if _is_last_program(arrivals_ptr + COUNTER):
            top_val, token, _ = _best_of_parts(part_val_ptr, part_idx_ptr, NUM_PARTS)
            # Only if every allowed score were -inf (all logits -inf): fall back to the argmax.
            token = tl.where(top_val > float("-inf"), token, tl.load(ints_ptr + I_ARGMAX))
            _emit_token(token, token_ptr, pos_ptr, draws_ptr, ring_ptr, ring_size)
            tl.store(arrivals_ptr + COUNTER, 0)


def set_sampling(st: DecodeState, temperature, top_k=0, top_p=1.0, seed=0):
    """Write the settings into st, between generations (not inside the graph), and restart the draws."""
    check_sampling(temperature, top_k, top_p)
    st.temperature.fill_(float(temperature))
    st.top_k.fill_(int(top_k))
    st.top_p.fill_(float(top_p))
    st.seed.fill_(int(seed))
    st.draws.zero_()


def sample_on_gpu(st: DecodeState, use_pdl=False):
    """Draw one token from st.logits into st.token; ring[draws % ring] = token, pos += 1, draws += 1."""
    grid, V = (st.num_blocks,), st.logits.numel()
    settings = (st.temperature, st.top_k, st.top_p)
    outputs = (st.token, st.pos, st.draws, st.ring, st.ring.numel())
    launch = dict(BLOCK=st.block, USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=4)
    parts = triton.next_power_of_2(st.num_blocks)
    _first_pass_kernel[grid](st.logits, *settings, *outputs, st.ints, st.floats, st.arrivals, st.count_bins,
                             st.part_val, st.part_idx, st.part_z, V, NUM_PARTS=parts, SHIFT=DIGITS[0][0],
                             BITS=DIGITS[0][1], COUNTER=0, **launch)
    for counter, (topp, (shift, bits)) in enumerate(RADIX_PASSES, start=1):
        _radix_pass_kernel[grid](st.logits, *settings, st.ints, st.floats, st.arrivals,
                                 st.mass_bins if topp else st.count_bins, V, SHIFT=shift, BITS=bits,
                                 COUNTER=counter, TOPP=topp, **launch)
    _gumbel_kernel[grid](st.logits, *settings, st.seed, *outputs, st.ints, st.arrivals, st.part_val, st.part_idx,
                         V, NUM_PARTS=parts, COUNTER=len(RADIX_PASSES) + 1, **launch)


# -----------------------------------------------------------------------------
# prefill on CUDA
#
# Prefill runs outside the graph, through cuBLAS and FlashInfer. Three row kernels
# replace the ~50 small torch ops per layer around them (RMSNorm, residual add, q/k norm,
# RoPE, cache write, SiLU), which cost more in launches than in work. Each repeats the
# roundings of the plain-torch code it replaces, so prefill computes what forward() does.

@triton.jit
def _round_to(x, DT: tl.constexpr):  # round fp32 x to dtype DT and back, as a torch op in DT would
    return x.to(DT).to(tl.float32)


@triton.jit
def _rms_norm_rows_kernel(x_ptr, y_ptr, w_ptr, out_ptr, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                          ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    XT: tl.constexpr = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # the residual add x += y, rounded to x's dtype like torch's
        x = _round_to(x + tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32), XT)
        tl.store(x_ptr + row * D + cols, x.to(XT), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) * (1.0 / D) + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (_round_to(x * rstd, XT) * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rows(x, w, eps, out, add=None):
    """out (T, D) = rms_norm(x + add, w) for contiguous (T, D) rows; with add, x += add in place."""
    T, D = x.shape
    BLOCK = triton.next_power_of_2(D)
    _rms_norm_rows_kernel[(T,)](x, x if add is None else add, w, out, eps, D=D, BLOCK=BLOCK, ADD=add is not None,
                                num_warps=max(1, min(16, BLOCK // 256)))
    return out


@triton.jit
def _silu_mul_rows_kernel(gu_ptr, out_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    DT: tl.constexpr = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), DT)  # torch's silu, rounded, then the product
    tl.store(out_ptr + row * I + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_rows(gate_up, out):  # (T, 2I) -> out (T, I) = silu(gate) * up
    T, I = out.shape
    BLOCK = 1024
    _silu_mul_rows_kernel[(T, triton.cdiv(I, BLOCK))](gate_up, out, I=I, BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _qk_norm_rope_rows_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos0, q_ptr, kc_ptr, vc_ptr, eps,
                              stride_kt, stride_vt, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                              BH: tl.constexpr):
    # program (t, b): heads b*BH.. of token t's qkv row (q heads, then k, then v), as the two
    # halves RoPE mixes; every intermediate rounded as apply_rope(rms_norm(...)) rounds it
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    half = tl.arange(0, HD // 2)
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    pos = t.to(tl.int64) + pos0
    is_q, is_k = heads < HQ, (heads >= HQ) & (heads < HQ + HKV)
    is_v = (heads >= HQ + HKV) & (heads < HQ + 2 * HKV)
    src = qkv_ptr + t.to(tl.int64) * (HQ + 2 * HKV) * HD + heads[:, None] * HD + half[None, :]
    x1 = tl.load(src, mask=(heads < HQ + 2 * HKV)[:, None], other=0.0)  # (BH, HD/2)
    x2 = tl.load(src + HD // 2, mask=(heads < HQ + 2 * HKV)[:, None], other=0.0)
    v_dst = vc_ptr + pos * stride_vt + (heads - HQ - HKV)[:, None] * HD + half[None, :]
    tl.store(v_dst, x1, mask=is_v[:, None])
    tl.store(v_dst + HD // 2, x2, mask=is_v[:, None])
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    qsel = is_q[:, None]
    w1 = tl.where(qsel, tl.load(qw_ptr + half)[None, :], tl.load(kw_ptr + half)[None, :]).to(tl.float32)
    w2 = tl.where(qsel, tl.load(qw_ptr + HD // 2 + half)[None, :], tl.load(kw_ptr + HD // 2 + half)[None, :])
    rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) * (1.0 / HD) + eps)[:, None]
    a = _round_to(_round_to(a * rstd, DT) * w1, DT)
    b = _round_to(_round_to(b * rstd, DT) * w2.to(tl.float32), DT)
    c = _round_to(tl.load(cos_ptr + pos * (HD // 2) + half)[None, :], DT)
    s = _round_to(tl.load(sin_ptr + pos * (HD // 2) + half)[None, :], DT)
    y1 = _round_to(_round_to(a * c, DT) - _round_to(b * s, DT), DT)
    y2 = _round_to(_round_to(b * c, DT) + _round_to(a * s, DT), DT)
    q_dst = q_ptr + t.to(tl.int64) * HQ * HD + heads[:, None] * HD + half[None, :]
    tl.store(q_dst, y1.to(DT), mask=qsel)
    tl.store(q_dst + HD // 2, y2.to(DT), mask=qsel)
    k_dst = kc_ptr + pos * stride_kt + (heads - HQ)[:, None] * HD + half[None, :]
    tl.store(k_dst, y1.to(DT), mask=is_k[:, None])
    tl.store(k_dst + HD // 2, y2.to(DT), mask=is_k[:, None])


def qk_norm_rope_rows(qkv, q_norm_w, k_norm_w, cos, sin, pos: int, q_out, k_cache, v_cache, eps):
    """qkv (T, (Hq+2Hkv) hd) of tokens at positions pos..pos+T-1 -> q_out (T, Hq, hd) normed and
    rotated; k (normed, rotated) and v into cache rows pos..pos+T-1 of the flat views."""
    T, Hq, hd = q_out.shape
    Hkv = k_cache.shape[1]
    assert pos + T <= k_cache.shape[0] and cos.is_contiguous()
    BH = max(1, min(triton.next_power_of_2(Hq + 2 * Hkv), 4096 // hd))  # ~8 KB of bf16 per program
    _qk_norm_rope_rows_kernel[(T, triton.cdiv(Hq + 2 * Hkv, BH))](
        qkv, q_norm_w, k_norm_w, cos, sin, pos, q_out, k_cache, v_cache, eps, k_cache.stride(0), v_cache.stride(0),
        HQ=Hq, HKV=Hkv, HD=hd, BH=BH, num_warps=4)
    return q_out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, K_BLOCKS, B: tl.constexpr):  # one B x B block per program
    rows = tl.program_id(0) * B + tl.arange(0, B)
    cols = tl.program_id(1) * B + tl.arange(0, B)
    offs, mask = rows.to(tl.int64)[:, None] * K + cols[None, :], (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + tl.program_id(0) * K_BLOCKS + tl.program_id(1))
    tl.store(out_ptr + offs, (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


def flashinfer_attention(q, k, v, pos):  # same contract as plain_attention, for prefill on CUDA
    import flashinfer
    # with more keys than queries FlashInfer aligns the causal mask bottom-right: query t
    # (position pos + t) sees keys 0..pos+t, so later prefill chunks attend to earlier ones
    return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True).reshape(q.shape[0], -1)


def prefill_forward(w: Weights, cfg: Config, cache: KVCache, rope, ids: list, pos: int, last_only=True,
                    attention=flashinfer_attention):
    """forward() for prefill on CUDA: the same math and roundings, in 9 launches per layer plus
    FlashInfer attention (fp8 weights: plus their dequantization, one matrix at a time). The
    residual add of each MLP is folded into the next RMSNorm."""
    T, Hq, hd, eps = len(ids), cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
    x = w.embed[torch.tensor(ids, device=w.embed.device)]  # (T, D) residual stream, updated in place
    xn = torch.empty_like(x)  # normed input of the next matmul
    q = torch.empty(T, Hq, hd, dtype=x.dtype, device=x.device)
    act = torch.empty(T, cfg.intermediate_size, dtype=x.dtype, device=x.device)
    down = None  # the previous layer's MLP output, not yet added to x
    for layer, k_cache, v_cache in zip(w.layers, cache.k, cache.v):
        rms_norm_rows(x, layer.attn_norm, eps, xn, add=down)
        qk_norm_rope_rows(xn @ dequantize(layer.qkv, x.dtype).T, layer.q_norm, layer.k_norm, rope[0], rope[1], pos,
                          q, k_cache, v_cache, eps)
        attn = attention(q, k_cache[:pos + T], v_cache[:pos + T], pos)
        rms_norm_rows(x, layer.mlp_norm, eps, xn, add=attn @ dequantize(layer.o, x.dtype).T)
        down = silu_mul_rows(xn @ dequantize(layer.gate_up, x.dtype).T, act) @ dequantize(layer.down, x.dtype).T
    cache.wrote(pos, ids)
    if last_only:
        x, xn, down = x[-1:], xn[-1:], down[-1:]
    return (rms_norm_rows(x, w.norm, eps, xn, add=down) @ w.lm_head.weight.T).float()


# -----------------------------------------------------------------------------
# fast decoder: the decode step's state, the CUDA graph, the replay loop

class DecodeState:
    """Every buffer the decode step reads or writes, besides the weights and the KV cache: allocated once,
    at addresses the graph keeps. D hidden, I intermediate, V vocabulary, Hq/Hkv heads of width hd."""

    def __init__(self, cfg: Config, dtype, device, ring: int = 64, block: int = 1024):
        D, I, V, hd, Hq, Hkv = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim,
                                cfg.num_heads, cfg.num_kv_heads)
        i32, i64, f32 = torch.int32, torch.int64, torch.float32
        zeros = lambda *shape, dtype=i32: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        # The step's input. The sampler's last kernel (_emit_token) writes the token it drew and moves
        # pos on by one, so the next replay reads both from here; the host sets them only to start.
        self.token = zeros(1)                 # (1,) int32: the token the step runs
        self.pos = zeros(1)                   # (1,) int32: its position, the cache row the step writes
        self.draws = zeros(1, dtype=i64)      # (1,) tokens drawn this generation: the Philox counter
        self.ring = zeros(ring)               # (ring,) int32: ring[draws % ring] = the token drawn
        # Sampling settings, written between generations by set_sampling.
        self.temperature = zeros(1, dtype=f32)         # 0 = greedy
        self.top_k = zeros(1)                          # 0 = off
        self.top_p = zeros(1, dtype=f32) + 1.0         # 1.0 = off
        self.seed = zeros(1, dtype=i64)
        # Activations.
        self.h = zeros(D, dtype=f32)                   # (D,) residual stream
        self.qkv = zeros((Hq + 2 * Hkv) * hd, dtype=dtype)  # fused q/k/v projection
        self.attn = zeros(Hq * hd, dtype=dtype)        # attention output, o_proj's input
        self.act = zeros(I, dtype=dtype)               # silu(gate) * up, down_proj's input
        self.logits = zeros(V, dtype=f32)              # lm_head's output, the sampler's input
        # Scratch, left as found by every step. o_proj and down_proj: split-K partials (64, D) fp32 and
        # arrivals (D,) int32. Attention: split-KV partials m, l (Hq, nsplit) and acc (Hq, nsplit, hd)
        # fp32, arrivals (Hkv,) int32, with nsplit about 2 programs per SM.
        self.add_scratch = add_scratch(D, device)
        self.attn_scratch = make_attention_scratch(Hq, Hkv, hd, max(1, triton.cdiv(2 * num_sms(), Hkv)), device)
        # The sampler: num_blocks programs of block logits each.
        self.block, self.num_blocks = block, triton.cdiv(V, block)
        self.ints, self.floats = zeros(8, dtype=i64), zeros(2, dtype=f32)  # the slots I_* and F_*
        self.arrivals = zeros(len(RADIX_PASSES) + 2)   # per sampler kernel: programs done (_is_last_program)
        self.count_bins, self.mass_bins = zeros(MAX_BINS), zeros(MAX_BINS, dtype=i64)  # top-k, top-p histograms
        self.part_val = zeros(self.num_blocks, dtype=f32)  # per program: best value (max logit or Gumbel score)
        self.part_idx = zeros(self.num_blocks)             # and its index
        self.part_z = zeros(self.num_blocks, dtype=f32)    # sum exp(s - the program's max)


class FastDecoder:
    """The CUDA path: the decode state and the graph that runs the whole step, over the weights,
    KV cache and RoPE tables it is given."""

    RING = 64  # slots of the device ring of drawn tokens (token i lands in slot i % RING)
    READ_EVERY = 8  # graph replays between two read-backs of the ring
    AHEAD = 32  # most tokens the GPU may run ahead of what the host has read (< RING)

    def __init__(self, w: Weights, cfg: Config, cache: KVCache, rope, prefill_chunk: int = 4096,
                 pdl: bool | None = None, capture: bool = True):
        self.w, self.cfg, self.cache, self.rope, self.prefill_chunk = w, cfg, cache, rope, prefill_chunk
        device = w.embed.device
        if pdl is None:  # PDL (see "GPU kernels") needs Hopper or newer
            pdl = device.type == "cuda" and not _INTERPRET and torch.cuda.get_device_capability(device) >= (9, 0)
        self.pdl = pdl
        self.st = DecodeState(cfg, w.embed.dtype, device, self.RING)
        if not capture:  # tests drive run_step by hand (on the CPU, through Triton's interpreter)
            return
        self.host_ring = torch.zeros(self.RING, dtype=torch.int32, pin_memory=True)  # host copy of the ring
        self.events = [torch.cuda.Event() for _ in range(self.AHEAD // self.READ_EVERY + 2)]  # one per copy in flight
        # prefill one full chunk now: compiles FlashInfer's kernel and lets the allocator
        # reserve the chunk's activations, so later prefills allocate nothing new
        self.prefill([0] * min(prefill_chunk, cache.data.shape[2] - 1))
        self.graph = self.capture()
        cache.wrote(0, [])  # the warm-up's rows hold nothing to reuse

    def run_step(self):
        """One decode step, exactly as the graph replays it: reads st.token at st.pos, the weights and
        the cache; writes cache row st.pos and st.logits, and through the sampler the next st.token,
        st.pos + 1, st.draws + 1 and a ring slot. forward() is its reference, line for line."""
        w, st, pdl, eps = self.w, self.st, self.pdl, self.cfg.rms_norm_eps
        (cos, sin), scale = self.rope, self.cfg.head_dim ** -0.5
        embed(st.token, w.embed, st.h, use_pdl=pdl)
        for layer, k_cache, v_cache in zip(w.layers, self.cache.k, self.cache.v):
            rmsnorm_gemv(st.h, layer.attn_norm, layer.qkv, st.qkv, eps, use_pdl=pdl)
            decode_attention(st.qkv, layer.q_norm, layer.k_norm, cos, sin, st.pos, k_cache, v_cache, st.attn,
                             st.attn_scratch, scale, eps, use_pdl=pdl)
            gemv_add(st.attn, layer.o, st.h, st.add_scratch, use_pdl=pdl)
            rmsnorm_gemv(st.h, layer.mlp_norm, layer.gate_up, st.act, eps, silu=True, use_pdl=pdl)
            gemv_add(st.act, layer.down, st.h, st.add_scratch, use_pdl=pdl)
        rmsnorm_gemv(st.h, w.norm, w.lm_head, st.logits, eps, use_pdl=pdl)
        sample_on_gpu(st, use_pdl=pdl)

    def capture(self):
        """Record run_step into a CUDA graph. Two eager steps first compile every kernel; they
        write cache row 0 and move the state on, which the next prefill sets again."""
        self.st.token.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.st.pos.zero_()
                self.run_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_step()
        torch.cuda.synchronize()
        return graph

    def prefill(self, ids: list, start: int = 0):
        """Run prompt tokens start.. through prefill_forward (the cache holds those before start) in
        chunks of at most prefill_chunk tokens, then draw the first new token into st.token (and
        ring slot 0) with the graph's sampler."""
        st = self.st
        with torch.inference_mode():
            for pos in range(start, len(ids), self.prefill_chunk):
                logits = prefill_forward(self.w, self.cfg, self.cache, self.rope, ids[pos:pos + self.prefill_chunk], pos)
            st.logits.copy_(logits[0])
            st.pos.fill_(len(ids) - 1)  # the sampler moves it on to len(ids)
            st.draws.zero_()
            sample_on_gpu(st)

    def feed(self, token: int, pos: int):
        """Teacher-forced step (tests, Engine.step): run token at pos, return the logits."""
        self.st.token.fill_(token)
        self.st.pos.fill_(pos)  # a generation that stopped early leaves the graph's position ahead
        self.graph.replay()
        self.cache.wrote(pos, [token])
        return self.st.logits.clone()

    def stream(self, limit: int):
        """Yield limit tokens, starting with the one prefill() drew (fewer if the caller stops). The host
        only replays the graph; every READ_EVERY replays it queues a copy of the ring to pinned memory
        and an event, and it reads tokens once their event has passed, at most AHEAD steps behind the
        GPU. Each token read shows that the one before it went through the step, into the cache. Tokens
        computed past the caller's stop are thrown away."""
        pending, free, pos0 = [], list(self.events), len(self.cache.tokens)  # (event, tokens made when recorded)

        def read_back(produced):
            self.host_ring.copy_(self.st.ring, non_blocking=True)
            event = free.pop()
            event.record()
            pending.append((event, produced))

        produced, done, previous = 1, 0, None
        read_back(produced)
        try:
            while done < limit:
                while produced < limit and produced - done < self.AHEAD:
                    self.graph.replay()
                    produced += 1
                    if produced % self.READ_EVERY == 0 or produced == limit:
                        read_back(produced)
                event, upto = pending.pop(0)
                event.synchronize()
                free.append(event)
                ring = self.host_ring.tolist()
                for i in range(done, upto):
                    if i:
                        self.cache.wrote(pos0 + i - 1, [previous])
                    previous = ring[i % self.RING]
                    yield previous
                done = upto
        finally:
            torch.cuda.current_stream().synchronize()  # let any overshoot finish before the next use


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanofastError("CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise NanofastError(f"no such GPU: {name} ({torch.cuda.device_count()} visible)")
    return device


def check_sampling(temperature=..., top_k=..., top_p=..., max_new_tokens=..., optional=False):
    """Raise NanofastError unless the settings passed are valid (None too, unless optional: the CLI's and
    Chat's "not given"). The CLI, generate(), Chat and the CUDA sampler all check here, so they refuse
    the same values in the same words."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    skip = lambda v: v is ... or (v is None and optional)  # noqa: E731
    for bad, message in [
            (not skip(temperature) and not (number(temperature) and temperature >= 0 and math.isfinite(temperature)),
             "--temperature must be a finite number >= 0"),
            (not skip(top_k) and not (isinstance(top_k, int) and top_k >= 0), "--top-k must be an integer >= 0"),
            (not skip(top_p) and not (number(top_p) and 0 < top_p <= 1), "--top-p must be in (0, 1]"),
            (not skip(max_new_tokens) and not (isinstance(max_new_tokens, int) and max_new_tokens >= 1),
             "--max-new-tokens must be an integer >= 1")]:
        if bad:
            raise NanofastError(message)


def check_prompt(n: int, max_seq_len: int):
    if n == 0:
        raise NanofastError("the prompt is empty")
    if n >= max_seq_len:
        raise NanofastError(f"the prompt is {n} tokens, which leaves no room with max_seq_len {max_seq_len}; "
                            "raise --max-seq-len")


# Memory: what a run will hold, from config.json alone, is set against what its device has free
# before anything large is allocated, so that a run that cannot fit stops with one line.
GIB = 2 ** 30


def memory_needed(cfg: Config, dtype: torch.dtype, max_seq_len: int, keep_fp8: bool) -> tuple:
    """(weights, KV cache, activations) in bytes on the device. Weights as load_weights leaves them: kept
    fp8, a projection is 1 byte a value plus fp32 block scales; the rest dtype; a tied lm_head once. The
    KV cache includes the RoPE tables. Activations: one 4096-token prefill chunk (and a dequantized matrix)."""
    n, D, I, hd = dtype.itemsize, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    weights = 0
    for name, shape in checkpoint_shapes(cfg).items():
        if keep_fp8 and name.endswith("_proj.weight"):
            weights += math.prod(shape) + 4 * math.prod(-(-k // FP8_BLOCK) for k in shape)
        elif not name.endswith("scale_inv") and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            weights += math.prod(shape) * n
    cache = max_seq_len * (2 * cfg.num_layers * cfg.num_kv_heads * hd * n + 4 * hd)
    acts = min(max_seq_len, 4096) * (5 * D + 2 * (cfg.num_heads + cfg.num_kv_heads) * hd + 3 * I) * n
    return weights, cache, acts + (2 * I * D * n if keep_fp8 else 0)


def free_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on device now: the CUDA driver's free count; on the CPU Linux's
    MemAvailable, else all of RAM (an upper bound, so only what can never fit is refused); else None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


class Engine:
    """A loaded model with its KV cache: prefill, step and generate.

        engine = nanofast.load("weights/Qwen3-0.6B")
        for token in engine.generate(prompt_ids, max_new_tokens=64, temperature=0.6, top_k=20):
            ...

    On CUDA with bf16/fp16 weights, Triton and FlashInfer, decoding runs as one CUDA
    graph per token (engine.fast is True); elsewhere, or with fast=False, it runs the
    plain-torch model above. An fp8 checkpoint, or quantize="fp8", keeps the projections in
    fp8 on CUDA (one byte per weight) and dequantizes them to dtype on the CPU."""

    def __init__(self, model_dir: str, device=None, dtype=None, max_seq_len: int = 4096,
                 fast: bool | None = None, quantize: str | None = None, verbose: bool = True):
        self.device = pick_device(device) if not isinstance(device, torch.device) else device
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if max_seq_len < 2:
            raise NanofastError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if quantize not in (None, "fp8"):
            raise NanofastError(f"cannot quantize to {quantize!r}; nanofast quantizes to fp8")
        self.cfg = c = load_config(model_dir)
        fp8 = c.fp8 or quantize == "fp8"  # the projections have fp8 values
        self.weight_format = "fp8" if fp8 else str(self.dtype).replace("torch.", "")
        # fp8 stays fp8 on CUDA; its kernels stack matrices, so rows come in whole 128-blocks
        rows = (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim)
        fp8_fits = self.device.type == "cuda" and all(n % FP8_BLOCK == 0 for n in rows)
        keep_fp8 = fp8 and fp8_fits
        (weights, cache, acts), free = memory_needed(c, self.dtype, max_seq_len, keep_fp8), free_memory(self.device)
        need, self.weight_bytes = weights + cache + acts, weights
        # what would make it fit: as many tokens as 90% of free memory holds, smaller weights, a smaller model
        fit = ((free or 0) * 9 // 10 - weights - acts) // (cache // max_seq_len)
        fixes = [f"a --max-seq-len of at most {fit}" if fit < max_seq_len else "a smaller --max-seq-len"] * (fit >= 2)
        fixes += ["--quantize fp8"] * (fp8_fits and not fp8) + ["--dtype bfloat16"] * (self.dtype == torch.float32)
        room = (f"the run needs {need / GIB:.2f} GiB (weights {weights / GIB:.2f} + KV cache {cache / GIB:.2f} + "
                f"activations {acts / GIB:.2f}) and {'?' if free is None else f'{free / GIB:.2f}'} GiB is free; "
                f"try {' or '.join(fixes + ['a smaller model'])}")
        if free is not None and need > free:
            raise NanofastError(f"not enough memory on {self.device}: {room}")
        self.stop_reason, self.stats = None, {}
        self.max_seq_len, self.verbose, self.decoder = max_seq_len, verbose, None
        stage = "loading the weights"  # where an allocation failed, should the estimate be off
        try:
            self.weights = load_weights(model_dir, c, self.dtype, self.device, quantize == "fp8", keep_fp8,
                                        progress=verbose and sys.stderr.isatty())
            stage = "allocating the KV cache"
            self.cache = KVCache(self.cfg, max_seq_len, self.dtype, self.device)
            self.rope = rope_tables(self.cfg, max_seq_len, self.device)
            stage = "setting up the CUDA graph"
            if self.device.type == "cuda" and fast is not False:
                self._start_fast()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise NanofastError(f"out of memory on {self.device} {stage}: {room}") from None

    @property
    def fast(self) -> bool:
        return self.decoder is not None

    def _log(self, message):
        if self.verbose:
            print(f"[nanofast] {message}", file=sys.stderr)

    def _start_fast(self):
        why = ("Triton is not installed" if not HAVE_TRITON else
               "the fast path runs bfloat16 or float16 weights" if self.dtype == torch.float32 else None)
        if why is None:
            try:
                import flashinfer  # noqa: F401
            except Exception:
                why = "FlashInfer is not installed (pip install flashinfer-python; see the README)"
        if why:
            self._log(f"warning: running the plain-torch path on CUDA: {why}")
            return
        # Triton and FlashInfer compile the kernels once per machine (and nanofast version): say so
        with open(__file__, "rb") as f:
            key = hashlib.sha1(f.read() + torch.cuda.get_device_name(self.device).encode()).hexdigest()[:16]
        marker = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanofast", key)
        if not os.path.exists(marker):
            self._log("compiling the GPU kernels: the first run on a machine takes a minute or two, "
                      "later runs start in about a second")
        t0 = time.perf_counter()
        self.decoder = FastDecoder(self.weights, self.cfg, self.cache, self.rope)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
        self._log(f"weights {self.weight_bytes / GIB:.2f} GiB, KV cache {self.cache.data.nbytes / GIB:.2f} GiB for "
                  f"{self.max_seq_len} tokens; CUDA graph captured in {time.perf_counter() - t0:.1f} s; GPU memory "
                  f"in use {torch.cuda.memory_reserved(self.device) / GIB:.2f} GiB")

    def forward(self, ids, pos: int, last_only: bool = False):  # plain path -> fp32 logits (T, V) or (1, V)
        if pos + len(ids) > self.max_seq_len:
            raise NanofastError(f"{pos + len(ids)} tokens do not fit max_seq_len {self.max_seq_len}")
        with torch.inference_mode():
            return forward(self.weights, self.cfg, self.cache, self.rope, list(ids), pos, last_only=last_only)

    def reset(self):  # forget the cache's contents: the next prompt is prefilled whole
        self.cache.wrote(0, [])

    def prefill(self, ids):  # -> fp32 logits (V,) of the last prompt token
        start = self.cache.reusable(ids)
        if not self.fast:
            return self.forward(ids[start:], start, last_only=True)[0]
        self.decoder.prefill(list(ids), start)
        return self.decoder.st.logits.clone()

    def step(self, token: int):  # -> fp32 logits (V,) after appending one token
        pos = len(self.cache.tokens)
        if pos >= self.max_seq_len:
            raise NanofastError("the KV cache is full")
        return self.forward([token], pos)[0] if not self.fast else self.decoder.feed(token, pos)

    def generate(self, prompt_ids, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=(), draft=None, spec_k: int = 4):
        """Yield new token ids. Stops at a stop id (which is yielded), after max_new_tokens, or when prompt
        plus output fill max_seq_len. Afterwards self.stop_reason says which ("eos", "max_new_tokens",
        "cache_full", or "interrupted" if the caller stopped early) and self.stats has the timings.
        The prompt's leading tokens that the cache already holds (the conversation so far, say) are
        not run again: only the rest is prefilled. draft: "lookup" or a draft Engine decodes speculatively,
        up to spec_k drafts a round (plain path only, so far); the tokens follow the same distribution."""
        P, prompt_ids = len(prompt_ids), list(prompt_ids)
        check_prompt(P, self.max_seq_len)
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        self.check_draft(draft, spec_k)
        limit = min(max_new_tokens, self.max_seq_len - P)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        start, t0 = self.cache.reusable(prompt_ids), time.perf_counter()
        spec = dict(draft="lookup" if draft == "lookup" else "model", k=spec_k, rounds=0, drafted=0, accepted=0)
        if self.fast:
            set_sampling(self.decoder.st, temperature, top_k, top_p, seed)
            self.decoder.prefill(prompt_ids, start)
            source = self.decoder.stream(limit)
        else:
            source = self._plain_stream(prompt_ids, start, limit, temperature, top_k, top_p, seed, draft, spec)
        stop, out, t_first = set(stop_ids), [], None
        self.stop_reason, self.stats = None, {}
        try:
            for token in source:
                out.append(token)
                t_first = t_first or time.perf_counter()
                yield token
                if token in stop:
                    self.stop_reason = "eos"
                    break
            else:
                self.stop_reason = "max_new_tokens" if len(out) >= max_new_tokens else "cache_full"
        finally:
            source.close()
            t_end, n = time.perf_counter(), len(out)
            self.stop_reason = self.stop_reason or "interrupted"
            self.stats = dict(weights=self.weight_format, prompt_tokens=P, reused_tokens=start,
                              prefilled_tokens=P - start, generated_tokens=n,
                              ttft_s=(t_first - t0) if t_first else None,
                              decode_tok_s=(n - 1) / (t_end - t_first) if n > 1 else None, total_s=t_end - t0)
            if draft is not None:  # tokens per round: accepted drafts plus the model's own token
                self.stats["speculation"] = dict(spec, tokens_per_round=(spec["accepted"] + spec["rounds"]) /
                                                 max(1, spec["rounds"]))

    def check_draft(self, draft, spec_k):
        """Raise NanofastError unless draft (None, "lookup" or an Engine) and spec_k can speculate here."""
        if draft is None:
            return
        if self.fast:
            raise NanofastError("speculative decoding (--draft, --lookup) runs on the plain path so far; add --plain")
        if not (isinstance(spec_k, int) and 1 <= spec_k <= 15):
            raise NanofastError("--spec-k must be an integer from 1 to 15")
        if draft != "lookup" and not isinstance(draft, Engine):
            raise NanofastError('draft must be "lookup" or an Engine')
        if draft != "lookup" and draft.cfg.vocab_size != self.cfg.vocab_size:
            raise NanofastError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs from the "
                                f"model's ({self.cfg.vocab_size}); a draft must share the model's tokenizer")
        if draft != "lookup" and draft.max_seq_len < self.max_seq_len:
            raise NanofastError(f"the draft model's max_seq_len {draft.max_seq_len} is below the model's "
                                f"{self.max_seq_len}")

    def _plain_stream(self, prompt_ids, start, limit, temperature, top_k, top_p, seed, draft, spec):
        """The plain path's tokens: one per forward, or with a draft several (see "speculative decoding");
        spec counts the rounds. Without drafts a round is one ordinary step."""
        generator = torch.Generator().manual_seed(seed)
        out = [sample(self.forward(prompt_ids[start:], start, last_only=True)[0], temperature, top_k, top_p,
                      generator)]
        yield out[0]
        while len(out) < limit:
            drafts, n = [], min(spec["k"], limit - len(out) - 1)  # room for the drafts and one more token
            if draft is not None:
                context = prompt_ids + out
                drafts = lookup_drafts(context, n) if draft == "lookup" else draft.draft_tokens(context, n)
            pos = len(prompt_ids) + len(out) - 1  # where the last token goes, before the drafts
            a, token = accept_drafts(self.forward(out[-1:] + drafts, pos), drafts, temperature, top_k, top_p,
                                     generator)
            spec.update(rounds=spec["rounds"] + 1, drafted=spec["drafted"] + len(drafts),
                        accepted=spec["accepted"] + a)
            self.cache.wrote(pos + 1, [])  # a draft's row counts as written once the caller takes the next token
            for i, t in enumerate(drafts[:a] + [token]):
                out.append(t)
                yield t
                if i < a:
                    self.cache.wrote(pos + 1 + i, [t])

    def draft_tokens(self, context: list, k: int) -> list:
        """As a draft model: k greedy tokens after context (the cache catches up on what it lacks)."""
        start, drafts = self.cache.reusable(context), []
        logits = self.forward(context[start:], start, last_only=True)[0]
        while len(drafts) < k:
            drafts.append(int(torch.argmax(logits)))
            if len(drafts) < k:
                logits = self.forward(drafts[-1:], len(context) + len(drafts) - 1)[0]
        return drafts


def load(model_dir: str, **kwargs) -> Engine:
    """Load a Qwen3 checkpoint folder; see Engine for the options."""
    return Engine(model_dir, **kwargs)


class Chat:
    """A conversation: send() streams the answer's text and keeps the history. Each turn's
    prompt is the whole conversation, and the engine prefills only what its cache lacks.

        chat = nanofast.Chat(engine, nanofast.Tokenizer(folder), system="Be brief.", temperature=0.6)
        for text in chat.send("Why is the sky blue?"):
            print(text, end="", flush=True)
    """

    def __init__(self, engine, tokenizer, system=None, think=True, max_new_tokens=2048, **sampling):
        check_sampling(sampling.get("temperature"), sampling.get("top_k"), sampling.get("top_p"), max_new_tokens,
                       optional=True)
        self.engine, self.tokenizer, self.system, self.think = engine, tokenizer, system, think
        self.max_new_tokens, self.sampling, self.messages = max_new_tokens, sampling, []

    def reset(self):
        self.messages = []

    def send(self, text: str):
        """Yield the answer as text. A too long conversation raises NanofastError and is left as it
        was; an answer the caller stops (Ctrl-C) stays in the history as far as it got."""
        messages = self.messages + [dict(role="user", content=text)]
        ids = self.tokenizer.encode(Tokenizer.template(messages, self.think, self.system))
        out = []
        try:
            yield from stream_text(self.tokenizer, self.engine.generate(
                ids, self.max_new_tokens, stop_ids=self.tokenizer.defaults["eos_ids"], **self.sampling), out)
        finally:
            if out:
                self.messages = messages + [dict(role="assistant", content=self.tokenizer.decode(out))]


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
    p.add_argument("--prompt", help="the prompt text; '-' reads it from stdin (with --chat: the first turn)")
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
    p.add_argument("--quantize", choices=["fp8"], help="quantize a bf16 checkpoint's projections to fp8 (128x128 "
                   "block scales) while loading; FP8 checkpoints load as fp8 without it")
    p.add_argument("--plain", action="store_true", help="on CUDA, run the plain-torch path instead of the CUDA graph")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, stop reason, timings) "
                   "instead of streaming text")
    p.add_argument("--draft", metavar="DIR", help="decode speculatively with this smaller Qwen3 checkpoint as the "
                   "draft (same tokenizer); plain path only, so far")
    p.add_argument("--lookup", action="store_true", help="decode speculatively with drafts looked up in the prompt "
                   "and the text so far (no draft model); plain path only, so far")
    p.add_argument("--spec-k", type=int, default=4, help="tokens drafted per round, 1 to 15 (default 4)")
    p.add_argument("--chat", action="store_true", help=f"a conversation on stdin, one turn per line, reusing the "
                   f"KV cache; commands: {CHAT_COMMANDS}")
    args = p.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, optional=True)
    except NanofastError as e:
        p.error(str(e))
    checks = [
        (args.max_seq_len < 2, "--max-seq-len must be >= 2"),
        (args.prompt is not None and args.prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (args.prompt is None and args.prompt_file is None and not args.chat, "no prompt: give --prompt TEXT, "
         "--prompt - (stdin), --prompt-file FILE or --chat"),
        (args.chat and (args.json or args.raw or args.prompt == "-"), "--chat reads its turns from stdin and "
         "streams text: it takes no --json, --raw or --prompt -"),
        (args.draft is not None and args.lookup, "give --draft or --lookup, not both"),
        (not 1 <= args.spec_k <= 15, "--spec-k must be an integer from 1 to 15"),
    ]
    for bad, message in checks:
        if bad:
            p.error(message)
    return args


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read().removesuffix("\n")  # the newline that ends the file's last line
        except (OSError, UnicodeDecodeError) as e:
            raise NanofastError(f"cannot read --prompt-file {args.prompt_file} ({e.__class__.__name__})") from None
    return sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt


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
        shutil.rmtree(partial, ignore_errors=True)  # leave nothing half-downloaded behind
        raise NanofastError(f"download failed ({e.__class__.__name__}); fetch it with: {cmd}") from None
    os.replace(partial, model_dir)


def run(args) -> int:
    prompt = read_prompt(args)
    device = pick_device(args.device)
    if args.model == DEFAULT_MODEL and not os.path.exists(args.model):
        download_default(args.model)
    load_config(args.model)  # a bad folder fails here, before the tokenizer
    tokenizer = Tokenizer(args.model)
    if not args.chat:
        text = prompt if args.raw else Tokenizer.chat(prompt, args.system, think=not args.no_think)
        prompt_ids = tokenizer.encode(text)
        check_prompt(len(prompt_ids), args.max_seq_len)  # before the slow part
    draft = "lookup" if args.lookup else None
    if args.draft is not None:  # first: it is the smaller, and fails sooner
        try:
            draft = load(args.draft, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len, fast=False,
                         verbose=False)
        except NanofastError as e:
            raise NanofastError(f"draft model: {e}") from None
    t0 = time.perf_counter()
    engine = load(args.model, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                  fast=not args.plain, quantize=args.quantize)
    engine.check_draft(draft, args.spec_k)  # (a draft model on the CUDA graph path, say)
    print(f"[nanofast] loaded {args.model} on {device} ({engine.weight_format} weights "
          f"{engine.weight_bytes / GIB:.2f} GiB, KV cache {engine.cache.data.nbytes / GIB:.2f} GiB, "
          f"{str(engine.dtype).replace('torch.', '')} activations, "
          f"{'CUDA graph' if engine.fast else 'plain torch'}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    defaults = tokenizer.defaults  # generation_config.json, for the sampling options not given
    sampling = {k: defaults[k] if vars(args)[k] is None else vars(args)[k] for k in ("temperature", "top_k", "top_p")}
    if draft is not None:
        sampling.update(draft=draft, spec_k=args.spec_k)
    if args.chat:
        return chat_loop(Chat(engine, tokenizer, args.system, not args.no_think, args.max_new_tokens, seed=args.seed,
                              **sampling), prompt)
    out_ids = []
    text = stream_text(tokenizer, engine.generate(prompt_ids, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       stop_ids=() if args.ignore_eos else defaults["eos_ids"], **sampling), out_ids)
    try:
        for piece in text:
            if not args.json:
                print(piece, end="", flush=True)
    except KeyboardInterrupt:
        text.close()
    if args.json:
        print(json.dumps(dict(prompt_ids=prompt_ids, generated_ids=out_ids, text=tokenizer.decode(out_ids),
                              stop_reason=engine.stop_reason, timings=engine.stats), ensure_ascii=False))
    else:
        print()
    print_stats(engine)
    return 130 if engine.stop_reason == "interrupted" else 0


def print_stats(engine):
    s = engine.stats
    ttft = f"{s['ttft_s'] * 1e3:.0f} ms" if s.get("ttft_s") is not None else "-"
    tps = f"{s['decode_tok_s']:.1f} tok/s" if s.get("decode_tok_s") else "-"
    print(f"[nanofast] prompt {s.get('prompt_tokens')} tokens ({s.get('reused_tokens')} reused from the cache), "
          f"generated {s.get('generated_tokens')} tokens (stop: {engine.stop_reason}), time to first token {ttft}, "
          f"decode {tps}", file=sys.stderr)
    if s.get("speculation"):
        sp = s["speculation"]
        print(f"[nanofast] speculation ({sp['draft']}, k {sp['k']}): {sp['rounds']} rounds, {sp['accepted']} of "
              f"{sp['drafted']} drafted tokens accepted, {sp['tokens_per_round']:.2f} tokens per round", file=sys.stderr)


CHAT_COMMANDS = "/reset (new conversation), /system TEXT, /think on|off, /stats, /exit"


def chat_loop(chat: Chat, first: str | None = None) -> int:
    """--chat: one user turn per line of stdin, each answer streamed. Ctrl-C stops an answer;
    Ctrl-D, /exit or Ctrl-C at the prompt ends the conversation."""
    tty = sys.stdout.isatty()  # then thinking is shown dimmed, apart from the answer
    print(f"[nanofast] chat: one message per line; {CHAT_COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = first if first is not None else input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            if sys.stdin.isatty():
                print()  # ends the prompt's line
            return 0
        first, (command, _, arg) = None, line.strip().partition(" ")
        if command == "/exit":
            return 0
        elif command == "/reset":
            chat.reset()
        elif command == "/system":  # a new system prompt starts a new conversation
            chat.system = arg or None
            chat.reset()
        elif command == "/think" and arg in ("on", "off"):
            chat.think = arg == "on"
        elif command == "/stats":
            print_stats(chat.engine)
        elif command.startswith("/"):
            print(f"unknown command {line.strip()!r}; commands: {CHAT_COMMANDS}", file=sys.stderr)
        elif line.strip():
            try:
                for text in chat.send(line):
                    if tty:
                        text = text.replace("<think>", "\033[2m<think>").replace("</think>", "</think>\033[0m")
                    sys.stdout.write(text)
                    sys.stdout.flush()
                if chat.engine.stop_reason == "cache_full":
                    print("\n[nanofast] the conversation filled --max-seq-len; /reset starts a new one", file=sys.stderr)
            except KeyboardInterrupt:
                sys.stdout.write("\033[0m" if tty else "")  # the answer so far stays in the conversation
            except NanofastError as e:
                print(f"error: {e}; /reset starts a new conversation", file=sys.stderr)
            print()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except NanofastError as e:
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # out of memory while generating: a long prompt's activations, say
        if not is_out_of_memory(e):
            raise
        print("error: out of memory while generating; try a shorter prompt or a smaller model", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
