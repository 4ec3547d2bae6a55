"""Tests for nanofast.py.

    NANOFAST_QWEN3_FILES=../shared/qwen3 python -m pytest -q test_nanofast.py

Every model here is a tiny random Qwen3 laid out exactly like a downloaded checkpoint
(config.json, safetensors with the released tensor names, tokenizer files). The plain
path is compared with transformers' Qwen3ForCausalLM loaded from the same folder in
float32. Tests that need the Qwen3 tokenizer files (NANOFAST_QWEN3_FILES: the released
tokenizer_config.json, vocab.json, merges.txt, generation_config.json, make_tokenizer.py)
skip when that variable is unset; the model-math tests always run.

CPU tests come first; GPU tests (marked requires_cuda) follow at the end of the file. The Triton
kernels run under Triton's interpreter on the CPU; on Linux x86_64, where requirements-test.txt
installs Triton, test_triton_is_installed fails without it (NANOFAST_TESTS_WITHOUT_TRITON=1 opts out).
"""
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import torch

if not torch.cuda.is_available():  # GPU kernels are tested under Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (before nanofast or triton is imported)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, Qwen3ForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import nanofast  # noqa: E402

try:
    import triton  # noqa: F401
    HAVE_TRITON, TRITON_IMPORT_ERROR = True, None
except ImportError as e:
    HAVE_TRITON, TRITON_IMPORT_ERROR = False, e
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# requirements-test.txt installs Triton on Linux x86_64 (CI): there, its absence is a broken setup,
# which test_triton_is_installed reports as a failure rather than letting the kernel tests skip.
# NANOFAST_TESTS_WITHOUT_TRITON=1 opts out (a machine meant to run without it).
TRITON_EXPECTED = (sys.platform == "linux" and platform.machine() == "x86_64"
                   and os.environ.get("NANOFAST_TESTS_WITHOUT_TRITON") != "1")

if HAVE_TRITON and INTERPRET:
    # Two work-arounds for triton 3.6's interpreter only (compiled kernels never see them):
    # 1. it turns a scalar loaded from memory into a Python int with int(ndarray), which
    #    numpy >= 2.4 refuses for shape-(1,) arrays: decode attention's loop bounds come
    #    from pos in memory;
    # 2. its tl.dot multiplies bf16 operands as their raw uint16 bits: widen them to fp32
    #    (exact) first.
    import triton.language as tl
    import triton.runtime.interpreter as _interp

    def _patch_lang_tensor(tensor, scope, _original=_interp._patch_lang_tensor):
        _original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def _create_dot(self, a, b, d, *args, _original=_interp.InterpreterBuilder.create_dot):
        def widen(x):
            if x.dtype != tl.bfloat16:
                return x
            return _interp.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return _original(self, widen(a), widen(b), d, *args)

    if not getattr(_interp, "_nanofast_test_fix", False):  # once, should this file be imported twice
        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp.InterpreterBuilder.create_dot = _create_dot
        _interp._nanofast_test_fix = True


def _fast_path_available():
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
requires_fast = pytest.mark.skipif(not _fast_path_available(), reason="needs CUDA and FlashInfer")

_files = os.environ.get("NANOFAST_QWEN3_FILES")
QWEN3_FILES = Path(_files).resolve() if _files else None
if QWEN3_FILES is not None and not (QWEN3_FILES / "vocab.json").is_file():
    raise RuntimeError(f"NANOFAST_QWEN3_FILES={_files} does not hold the Qwen3 reference files")
requires_qwen3_files = pytest.mark.skipif(QWEN3_FILES is None, reason="NANOFAST_QWEN3_FILES is not set")

EOS_IDS = {151645, 151643}  # <|im_end|>, <|endoftext|> (released generation_config.json)

# Logit tolerance for the fp32 plain path against transformers' fp32 eager model:
#     max |nanofast - transformers| <= LOGIT_RTOL * max |transformers logits|
# Both run the same math in fp32 (unit roundoff 6e-8) over 2-3 layers whose reductions
# have at most a few hundred terms, so only the order of summation differs. Measured:
# about 1e-6 of the logit scale (at most 6e-5 absolute, logits spanning about +-50).
# 1e-4 leaves ~100x headroom for other CPUs' BLAS kernels, while a real mistake (RoPE
# form or position, q/k norm, GQA head mapping, causal mask, a stale or misplaced KV
# entry) moves logits by O(1).
LOGIT_RTOL = 1e-4
# Greedy comparisons need every argmax to be decided by more than fp32 rounding: the test
# data (random weights, prompt seeds) is checked to keep the top-2 logit gap above this,
# ~20x the largest difference measured (6e-5).
MIN_TOP2_GAP = 1e-3


# -----------------------------------------------------------------------------
# checkpoints


# The released Qwen3-0.6B config.json, used only when NANOFAST_QWEN3_FILES is unset so
# that the model-math tests still run (with the files, the released file itself is read).
_QWEN3_06B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

TOKENIZER_FILES = ("generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def released_config(name="Qwen3-0.6B") -> dict:
    if QWEN3_FILES is None:
        assert name == "Qwen3-0.6B"
        return dict(_QWEN3_06B_CONFIG)
    return json.loads((QWEN3_FILES / f"{name}.config.json").read_text())


def with_rope_parameters(raw):  # config.json's RoPE as transformers 5 saves it
    raw.pop("rope_scaling", None)
    raw["rope_parameters"] = {"rope_theta": float(raw.pop("rope_theta")), "rope_type": "default"}
    return raw


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def edit_json(path, edit):  # edit(dict) changes the file's object in place
    obj = json.loads(Path(path).read_text())
    edit(obj)
    write_json(path, obj)


def random_weights(cfg, *, seed=0, resid_gain=8, store_lm_head=False, dtype=torch.bfloat16, device="cpu"):
    """{name: CPU tensor in dtype} for every tensor of cfg's checkpoint, drawn on device
    (CUDA makes the released shapes fast) from one seeded generator.

    Embeddings (and an untied lm_head) std 1, so logits have std ~sqrt(hidden) and the
    top-2 gap is large; projections std 1/sqrt(fan_in); o_proj and down_proj resid_gain
    times that, so the layers outweigh the input embedding in the residual stream (with a
    tied lm_head a weaker residual makes greedy decoding repeat the input token forever);
    norm weights 1 + 0.1 noise."""
    shapes = nanofast.checkpoint_shapes(cfg)
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    g = torch.Generator(device=device).manual_seed(seed)
    w = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g, device=device)
        if name.endswith("norm.weight"):
            x = 1 + 0.1 * x
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            x = x * (resid_gain / shape[1] ** 0.5)
        elif name.endswith("proj.weight"):
            x = x / shape[1] ** 0.5
        w[name] = x.to(dtype).cpu().contiguous()
    if cfg.tie_word_embeddings and store_lm_head:  # some tied checkpoints store a copy of the embedding
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    return w


def save_weights(d, w, shards=1):
    """Write w into folder d as model.safetensors, or as `shards` files and their
    model.safetensors.index.json, replacing any weights there."""
    d = Path(d)
    for f in [*d.glob("model*.safetensors"), *d.glob("model.safetensors.index.json")]:
        f.unlink()
    if shards == 1:
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(w)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: w[k] for k in names[s * per:(s + 1) * per]}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in w.values())
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_checkpoint(d, *, vocab=None, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    tied=True, store_lm_head=False, shards=1, seed=0, rope_form="theta", dtype=torch.bfloat16,
                    tokenizer_json=None, resid_gain=8, device="cpu"):
    """Lay out a random Qwen3 in folder d exactly like a downloaded checkpoint.

    config.json is the released 0.6B config with the sizes substituted; vocab_size stays
    151936 (so the real tokenizer works) unless vocab is given. With tokenizer_json (the
    fixture's, None without NANOFAST_QWEN3_FILES) the tokenizer files and
    generation_config.json are copied in too. The weights are random_weights'."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    cfg = released_config()
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, max_window_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
               intermediate_size=intermediate, tie_word_embeddings=tied)
    if vocab is not None:
        cfg["vocab_size"] = vocab
    assert rope_form in ("theta", "parameters")
    write_json(d / "config.json", with_rope_parameters(cfg) if rope_form == "parameters" else cfg)
    if tokenizer_json is not None:
        for f in TOKENIZER_FILES:
            shutil.copyfile(QWEN3_FILES / f, d / f)
        shutil.copyfile(tokenizer_json, d / "tokenizer.json")
    save_weights(d, random_weights(nanofast.load_config(str(d)), seed=seed, resid_gain=resid_gain,
                                   store_lm_head=store_lm_head, dtype=dtype, device=device), shards)
    return d


def hf_model(d):
    """transformers' Qwen3 from folder d in fp32 eager; asserts every tensor was loaded."""
    model, info = Qwen3ForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager",
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids):  # ids: list[int] -> fp32 logits (T, V), one full forward, no cache
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt, n):
    """n greedy tokens from transformers with its KV cache (a manual generate loop)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    ids = []
    for _ in range(n):
        ids.append(int(out.logits[0, -1].argmax()))
        if hasattr(out, "cache"):  # transformers >= 5.2x names it cache, earlier past_key_values
            out = model(torch.tensor([[ids[-1]]]), cache=out.cache, use_cache=True)
        else:
            out = model(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def assert_logits_close(got, ref, what=""):
    """fp32 logits against the transformers reference: same shape, all finite (a NaN or
    inf never passes), max abs difference within LOGIT_RTOL of the reference's scale."""
    got, ref = torch.as_tensor(got).float(), torch.as_tensor(ref).float()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: reference is not finite"
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite logits"
    scale = max(float(ref.abs().max()), 1.0)
    diff = float((got - ref).abs().max())
    assert diff <= LOGIT_RTOL * scale, f"{what}: max abs diff {diff:.3g} > {LOGIT_RTOL} * {scale:.3g}"


def load_engine(d, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("max_seq_len", 128)
    return nanofast.load(str(d), **kw)


def random_prompt(n, seed):  # ordinary (non-special) token ids
    return torch.randint(0, 151643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# The model-math configurations: tied / tied with lm_head stored / untied, single file /
# sharded, GQA ratio 2 / 1 / 4, head_dim * heads equal to or unlike hidden (as in the
# released models), both rope forms, bf16 and fp32 checkpoints.
CONFIGS = {
    "tied-gqa2-bf16": dict(ckpt=dict(heads=4, kv_heads=2, head_dim=16), prompt_seed=5),
    "tiedstored-gqa1-fp32-ropeparams": dict(
        ckpt=dict(heads=4, kv_heads=4, head_dim=32, tied=True, store_lm_head=True, rope_form="parameters",
                  dtype=torch.float32, seed=1), prompt_seed=10),
    "untied-gqa4-3shards": dict(
        ckpt=dict(heads=8, kv_heads=2, head_dim=16, layers=3, intermediate=96, tied=False, shards=3, seed=2),
        prompt_seed=29),
}
PROMPT_LEN = 11
DECODE_STEPS = 70  # > 64: a ring of 64 wraps
GREEDY_TOKENS = 64


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """tokenizer.json built once by the reference make_tokenizer.py (None without the files)."""
    if QWEN3_FILES is None:
        return None
    d = tmp_path_factory.mktemp("tokenizer")
    subprocess.run([sys.executable, str(QWEN3_FILES / "make_tokenizer.py"), str(d)], check=True,
                   capture_output=True)
    return d / "tokenizer.json"


def _reference_case(d, tokenizer_json, ckpt, prompt_seed, steps):
    """A checkpoint, its transformers model, a prompt, `steps` greedy tokens and the logits
    at every position of prompt + greedy."""
    d = make_checkpoint(d, tokenizer_json=tokenizer_json, **ckpt)
    model = hf_model(d)
    prompt = random_prompt(PROMPT_LEN, seed=prompt_seed)
    greedy = hf_greedy(model, prompt, steps)
    return dict(dir=d, model=model, prompt=prompt, greedy=greedy, logits=hf_logits(model, prompt + greedy))


@pytest.fixture(scope="session", params=list(CONFIGS))
def case(request, tmp_path_factory, tokenizer_json):
    spec = CONFIGS[request.param]
    ref = _reference_case(tmp_path_factory.mktemp(request.param), tokenizer_json, spec["ckpt"],
                          spec["prompt_seed"], DECODE_STEPS)
    return dict(ref, name=request.param, ckpt=spec["ckpt"])


@pytest.fixture(scope="session")
def tied_case(tmp_path_factory, tokenizer_json):
    """The first configuration again, with another prompt (for the stop and NaN tests)."""
    return _reference_case(tmp_path_factory.mktemp("tied"), tokenizer_json, CONFIGS["tied-gqa2-bf16"]["ckpt"],
                           prompt_seed=3, steps=40)


# -----------------------------------------------------------------------------
# model math against transformers (CPU, fp32)


def test_reference_greedy_is_not_degenerate(case):
    # guards the test data: a model that repeats one token would make greedy tests weak
    # and one whose greedy choice could flip on fp32 rounding would make them flaky
    _check_reference(case["greedy"], case["logits"])


def _check_reference(greedy, logits):
    assert len(set(greedy)) >= 10, greedy[:20]
    top2 = logits.topk(2, dim=-1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    assert gap > MIN_TOP2_GAP, f"top-2 gap {gap} too small for the test"


def test_engine_basics(case):
    eng = load_engine(case["dir"])
    cfg, ck = eng.cfg, case["ckpt"]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (ck["heads"], ck["kv_heads"], ck["head_dim"])
    assert cfg.tie_word_embeddings == ck.get("tied", True)
    assert eng.device == torch.device("cpu") and eng.dtype == torch.float32 and eng.max_seq_len == 128
    assert eng.fast is False
    assert len(eng.cache.k) == len(eng.cache.v) == cfg.num_layers
    for t in eng.cache.k + eng.cache.v:
        assert t.shape == (128, cfg.num_kv_heads, cfg.head_dim)


def test_prefill_logits_every_position(case):
    eng = load_engine(case["dir"])
    P = len(case["prompt"])
    eng.reset()
    got = eng.forward(case["prompt"], 0)
    assert got.dtype == torch.float32
    assert_logits_close(got, case["logits"][:P], "forward(prompt, 0)")
    # prefill resets the cache and returns the last position's logits
    eng.prefill(random_prompt(30, seed=99))  # longer: stale cache entries beyond the prompt
    assert_logits_close(eng.prefill(case["prompt"]), case["logits"][P - 1], "prefill after another prefill")


def test_chunked_forward(case):
    # prefill in pieces must equal one forward
    eng = load_engine(case["dir"])
    ids = case["prompt"] + case["greedy"][:20]
    eng.reset()
    parts, pos = [], 0
    for n in (5, 1, 9, 3, 13):
        parts.append(eng.forward(ids[pos:pos + n], pos))
        pos += n
    assert pos == len(ids)
    assert_logits_close(torch.cat(parts), case["logits"][:len(ids)], "chunked forward")


def test_decode_steps(case):
    # every decode step's logits, teacher-forced on transformers' greedy tokens
    eng = load_engine(case["dir"])
    P = len(case["prompt"])
    assert_logits_close(eng.prefill(case["prompt"]), case["logits"][P - 1], "prefill")
    for i, tok in enumerate(case["greedy"]):
        assert_logits_close(eng.step(tok), case["logits"][P + i], f"decode step {i} (position {P + i})")


def test_kv_cache_layout(case):
    # token t's K/V live in row t, as transformers caches them
    eng = load_engine(case["dir"])
    ids = case["prompt"] + case["greedy"][:30]
    eng.prefill(ids)
    with torch.no_grad():
        out = case["model"](torch.tensor([ids]), use_cache=True)
    for i in range(eng.cfg.num_layers):
        layer = (out.cache if hasattr(out, "cache") else out.past_key_values).layers[i]
        for name, ours, ref in (("k", eng.cache.k[i], layer.keys), ("v", eng.cache.v[i], layer.values)):
            ref = ref[0].transpose(0, 1)  # (T, Hkv, hd)
            ours = ours[:ref.shape[0]].float()
            scale = max(float(ref.abs().max()), 1.0)
            assert torch.isfinite(ours).all()
            assert float((ours - ref).abs().max()) <= LOGIT_RTOL * scale, f"layer {i} {name}"


def test_greedy_generate_matches_transformers(case):
    eng = load_engine(case["dir"])
    got = list(eng.generate(case["prompt"], max_new_tokens=GREEDY_TOKENS, temperature=0.0))
    assert got == case["greedy"][:GREEDY_TOKENS]
    assert eng.stop_reason == "max_new_tokens"
    assert eng.stats["prompt_tokens"] == PROMPT_LEN and eng.stats["generated_tokens"] == GREEDY_TOKENS
    # sampling parameters do not matter at temperature 0
    again = list(eng.generate(case["prompt"], max_new_tokens=16, temperature=0.0, top_k=5, top_p=0.5, seed=1))
    assert again == got[:16]


# bf16 on the CPU against the fp32 reference, teacher-forced over prompt + greedy (81 positions):
# max |bf16 - fp32| <= BF16_CPU_RTOL * max |fp32|. Measured 0.015, 0.020 and 0.025 for the three
# configurations (0.013-0.019 over the prompt alone): bf16 rounds every activation and cache entry to
# 8 bits of mantissa. And at least 1e-3: an engine that computed in fp32 would be ~1e-6 off.
BF16_CPU_RTOL = 0.04


def test_bf16_engine_on_cpu(case):
    eng = load_engine(case["dir"], dtype=torch.bfloat16)
    assert eng.dtype == torch.bfloat16 and eng.weight_format == "bfloat16"
    got, ref = eng.forward(case["prompt"] + case["greedy"], 0), case["logits"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    scale, diff = float(ref.abs().max()), float((got - ref).abs().max())
    assert 1e-3 * scale < diff <= BF16_CPU_RTOL * scale, f"max abs diff {diff:.3g}, {diff / scale:.4f} of the scale"
    # the greedy choice is the reference's at 95-97.5% of the positions (seen; the rest are near ties)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_assert_logits_close_rejects_nan_and_inf():
    ref = torch.randn(3, 50) * 10
    assert_logits_close(ref + 1e-5, ref)
    for bad in (float("nan"), float("inf"), -float("inf")):
        got = ref.clone()
        got[1, 7] = bad
        with pytest.raises(AssertionError):
            assert_logits_close(got, ref)
    with pytest.raises(AssertionError):
        assert_logits_close(ref + 1.0, ref)
    with pytest.raises(AssertionError):
        assert_logits_close(ref[:2], ref)


def test_nan_weights_never_pass(tmp_path, tied_case):
    # a checkpoint with a NaN in it must not produce logits the comparison accepts
    def poison(w):
        w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")

    d = tmp_path / "nan"
    shutil.copytree(tied_case["dir"], d)
    edit_tensors(poison)(d)
    try:
        eng = load_engine(d)
    except nanofast.NanofastError:
        return  # rejecting non-finite weights at load is fine too
    ref = hf_logits(tied_case["model"], tied_case["prompt"])
    with pytest.raises(AssertionError):
        assert_logits_close(eng.forward(tied_case["prompt"], 0), ref)


# -----------------------------------------------------------------------------
# generate: the behaviours every decode path shares (the plain path here; the CUDA graph too on
# a GPU), through the public API. Each test loads its own engines, since generating changes them.


class DecodePath(NamedTuple):
    name: str
    load: Callable  # load(**engine options) -> a new Engine on this path, for this path's checkpoint
    prompt: list
    greedy: list  # greedy tokens after prompt: transformers' (plain), the path's own (fast)
    exact: bool  # greedy tokens are the same whether the cache was filled by prefill or by decode steps


@pytest.fixture(params=["plain", pytest.param("fast", marks=requires_fast)])
def decode_path(request):
    if request.param == "plain":
        case = request.getfixturevalue("tied_case")
        return DecodePath("plain", lambda **kw: load_engine(case["dir"], **kw), case["prompt"],
                          case["greedy"], exact=True)
    case = request.getfixturevalue("fast_path_case")
    return DecodePath("fast", lambda **kw: nanofast.load(str(case["dir"]), device="cuda", verbose=False,
                                                         **{"max_seq_len": 128, **kw}),
                      case["prompt"], case["greedy"], exact=False)


def test_tied_case_reference(tied_case):
    _check_reference(tied_case["greedy"], tied_case["logits"])


def test_stop_on_eos_id(decode_path):
    g = decode_path.greedy
    i = next(i for i in range(3, len(g)) if g[i] not in g[:i])  # a token first produced at step i >= 3
    eng = decode_path.load()
    got = list(eng.generate(decode_path.prompt, max_new_tokens=len(g), temperature=0.0, stop_ids=[g[i], 151645]))
    assert got == g[:i + 1]  # the stop id is yielded, then generation ends
    assert eng.stop_reason == "eos" and eng.stats["generated_tokens"] == i + 1
    # the next generation starts clean (the CUDA graph ran ahead of the stop)
    assert list(eng.generate(decode_path.prompt, max_new_tokens=len(g), temperature=0.0)) == g


@pytest.mark.parametrize("n", [1, 2, 7])
def test_stop_at_max_new_tokens(decode_path, n):
    eng = decode_path.load()
    got = list(eng.generate(decode_path.prompt, max_new_tokens=n, temperature=0.0))
    assert got == decode_path.greedy[:n] and eng.stop_reason == "max_new_tokens"
    assert (eng.stats["prompt_tokens"], eng.stats["generated_tokens"]) == (len(decode_path.prompt), n)


@pytest.mark.parametrize("room", [19, 21])
def test_stop_at_full_cache(decode_path, room):
    """With max_seq_len = prompt + room, generation yields exactly room tokens: the prompt and all
    of them but the last fill the cache, and the last needs no slot. Not one more, not one fewer."""
    P = len(decode_path.prompt)
    eng = decode_path.load(max_seq_len=P + room)
    got = list(eng.generate(decode_path.prompt, max_new_tokens=100, temperature=0.0))
    assert len(got) == room and got == decode_path.greedy[:room]
    assert eng.stop_reason == "cache_full" and eng.stats["generated_tokens"] == room
    # a max_new_tokens that fits stops there, not at the cache
    assert list(eng.generate(decode_path.prompt, max_new_tokens=room - 1, temperature=0.0)) == got[:-1]
    assert eng.stop_reason == "max_new_tokens"


def test_prompt_that_fills_the_cache_is_rejected(tied_case):
    eng = load_engine(tied_case["dir"], max_seq_len=PROMPT_LEN)
    with pytest.raises(nanofast.NanofastError):
        list(eng.generate(tied_case["prompt"], max_new_tokens=4))


# the CLI's words for bad sampling settings, which the API uses too
BAD_TEMPERATURE = "--temperature must be a finite number >= 0"
BAD_TOP_K = "--top-k must be an integer >= 0"
BAD_TOP_P = "--top-p must be in (0, 1]"
BAD_MAX_NEW_TOKENS = "--max-new-tokens must be an integer >= 1"
BAD_SETTINGS = {  # name: (generate's keyword arguments, the error's words)
    "temperature-negative": (dict(temperature=-1.0), BAD_TEMPERATURE),
    "temperature-nan": (dict(temperature=math.nan), BAD_TEMPERATURE),
    "temperature-inf": (dict(temperature=math.inf), BAD_TEMPERATURE),
    "top-k-negative": (dict(temperature=1.0, top_k=-3), BAD_TOP_K),
    "top-k-fraction": (dict(temperature=1.0, top_k=2.5), BAD_TOP_K),
    "top-p-above-one": (dict(temperature=1.0, top_p=1.5), BAD_TOP_P),
    "top-p-zero": (dict(temperature=1.0, top_p=0.0), BAD_TOP_P),
    "top-p-nan": (dict(temperature=1.0, top_p=math.nan), BAD_TOP_P),
    "top-p-above-one-greedy": (dict(top_p=1.5), BAD_TOP_P),  # checked even where greedy would ignore it
    "max-new-tokens-zero": (dict(max_new_tokens=0), BAD_MAX_NEW_TOKENS),
    "max-new-tokens-negative": (dict(max_new_tokens=-5), BAD_MAX_NEW_TOKENS),
    "temperature-none": (dict(temperature=None), BAD_TEMPERATURE),  # not a number: no TypeError either
    "temperature-text": (dict(temperature="0.7"), BAD_TEMPERATURE),
    "top-k-none": (dict(temperature=1.0, top_k=None), BAD_TOP_K),
    "top-p-none": (dict(temperature=1.0, top_p=None), BAD_TOP_P),
    "max-new-tokens-none": (dict(max_new_tokens=None), BAD_MAX_NEW_TOKENS),
}


def _generate_rejects(engine, prompt, kw, words):
    """generate(prompt, **kw) raises NanofastError with words; the engine still works afterwards."""
    with raises_one_line(words):
        list(engine.generate(prompt, **{"max_new_tokens": 4, **kw}))
    assert len(list(engine.generate(prompt, max_new_tokens=2, temperature=0.0))) == 2


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_generate_rejects_bad_settings(decode_path, name):
    kw, words = BAD_SETTINGS[name]
    _generate_rejects(decode_path.load(), decode_path.prompt, kw, words)


@pytest.fixture(scope="session")
def nf_tokenizer(tok_dir):  # nanofast's Tokenizer for tok_dir (it reads nothing after loading)
    return nanofast.Tokenizer(str(tok_dir))


@requires_qwen3_files
@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_chat_rejects_bad_settings(tok_dir, nf_tokenizer, name):
    kw, words = BAD_SETTINGS[name]
    with raises_one_line(words):
        list(nanofast.Chat(load_engine(tok_dir), nf_tokenizer, **{"max_new_tokens": 4, **kw}).send("Hi"))


def test_interrupted(decode_path):
    eng = decode_path.load()
    it = eng.generate(decode_path.prompt, max_new_tokens=20, temperature=0.0)
    assert [next(it) for _ in range(3)] == decode_path.greedy[:3]
    it.close()
    assert eng.stop_reason == "interrupted" and eng.stats["generated_tokens"] == 3
    assert list(eng.generate(decode_path.prompt, max_new_tokens=10, temperature=0.0)) == decode_path.greedy[:10]


@pytest.mark.parametrize("setting", ["temperature", "top-k", "top-p", "top-k+top-p", "generation_config"])
def test_plain_seeded_runs_repeat(tied_case, setting):
    """The plain path's seeded runs repeat, with and without prefix reuse, after an early stop."""
    kw = dict(dict(temperature=0.7, top_k=50, top_p=0.9) if setting == "top-k+top-p" else
              dict(temperature=0.6, top_k=20, top_p=0.95) if setting == "generation_config" else
              dict(temperature=0.7, **({"top_k": 50} if setting == "top-k" else
                                       {"top_p": 0.9} if setting == "top-p" else {})), seed=5)
    eng = load_engine(tied_case["dir"], max_seq_len=64)
    first = list(eng.generate(tied_case["prompt"], max_new_tokens=30, **kw))
    it = eng.generate(tied_case["prompt"], max_new_tokens=30, **kw)
    assert [next(it) for _ in range(5)] == first[:5]
    it.close()
    assert list(eng.generate(tied_case["prompt"], max_new_tokens=30, **kw)) == first  # prefix reused
    eng.reset()
    assert list(eng.generate(tied_case["prompt"], max_new_tokens=30, **kw)) == first


def test_seeded_generate_is_repeatable(decode_path):
    """A seed repeats a sampled run, on the same engine and on a new one; another seed changes it."""
    def run(engine, seed):
        return list(engine.generate(decode_path.prompt, max_new_tokens=24, temperature=8.0, top_k=50, seed=seed))

    eng = decode_path.load()
    a = run(eng, 1234)
    assert len(a) == 24 and a != decode_path.greedy[:24]
    assert run(eng, 1234) == a and run(decode_path.load(), 1234) == a
    assert run(eng, 4321) != a


def test_prefix_reuse(decode_path):
    """Three turns on one engine: turns 2 and 3 prefill only the tokens the cache lacks, and give a
    fresh engine's greedy ids; then a history edited in the middle is prefilled from the edit on."""
    eng, fresh = decode_path.load(), decode_path.load()
    ids, held = list(decode_path.prompt), 0
    for turn in range(3):
        out = list(eng.generate(ids, max_new_tokens=6, temperature=0.0))
        assert (eng.stats["reused_tokens"], eng.stats["prefilled_tokens"]) == (held, len(ids) - held)
        fresh.reset()
        if decode_path.exact:  # (bf16 on the fast path: the rows cached by decode steps differ in the last bits)
            assert out == list(fresh.generate(ids, max_new_tokens=6, temperature=0.0))
        held = len(ids) + len(out) - 1  # the last token never went through the model
        ids = ids + out + random_prompt(5, seed=turn)  # the next turn: the whole history and new tokens
    if decode_path.exact:
        fresh.reset()
        assert_logits_close(eng.prefill(ids), fresh.prefill(ids), "reused prefill")
    edited = ids[:8] + random_prompt(12, seed=9)
    out = list(eng.generate(edited, max_new_tokens=4, temperature=0.0))
    assert (eng.stats["reused_tokens"], eng.stats["prefilled_tokens"]) == (8, 12)
    fresh.reset()
    if decode_path.exact:
        assert out == list(fresh.generate(edited, max_new_tokens=4, temperature=0.0))


# -----------------------------------------------------------------------------
# sampling


def allowed_set(logits, temperature, top_k, top_p):
    """Tokens transformers could sample: temperature, then top-k, then top-p (a token is
    kept while the probability of the tokens ranked above it is < top_p; the first is
    always kept). A plain loop over a float64 sort, independent of nanofast."""
    s = logits.double() / temperature
    order = torch.argsort(s, descending=True).tolist()
    if top_k > 0:
        order = order[:top_k]
    probs = torch.softmax(s[order], 0).tolist()
    kept, above = [], 0.0
    for tok, p in zip(order, probs):
        if kept and above >= top_p:
            break
        kept.append(tok)
        above += p
    return set(kept)


def _peaky_logits(n, seed, scale=3.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def test_sample_temperature_zero_is_argmax():
    for seed in range(3):
        logits = _peaky_logits(151936, seed)
        g = torch.Generator().manual_seed(seed)
        for top_k, top_p in ((0, 1.0), (5, 0.5), (1, 0.1)):
            assert nanofast.sample(logits, 0.0, top_k, top_p, g) == int(logits.argmax())


def test_sample_seeded_is_repeatable():
    logits = _peaky_logits(1000, 0, scale=1.0)
    for T, k, p in ((1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.95)):
        draws = []
        for seed in (5, 5, 6):
            g = torch.Generator().manual_seed(seed)
            draws.append([nanofast.sample(logits, T, k, p, g) for _ in range(60)])
        assert draws[0] == draws[1]
        assert draws[0] != draws[2]
        assert len(set(draws[0])) > 5


@pytest.mark.parametrize("T,top_k,top_p", [
    (1.0, 1, 1.0), (1.0, 5, 1.0), (0.5, 20, 1.0), (1.0, 0, 0.5), (2.0, 0, 0.9),
    (0.7, 40, 0.8), (1.0, 3, 0.99), (0.6, 20, 0.95), (1.0, 0, 0.01),
])
def test_sample_stays_in_allowed_set(T, top_k, top_p):
    # 1000 logits, many draws; the full vocabulary, a few (sorting 152K logits is slow on CPU)
    for n, seed, draws in ((1000, 1, 400), (151936, 2, 12)):
        logits = _peaky_logits(n, seed, scale=2.0)
        allowed = allowed_set(logits, T, top_k, top_p)
        # the boundary of the top-p set is decided in fp32 by nanofast: allow a token
        # whose cumulative probability is within 1e-5 of top_p (ties of fp32 rounding)
        loose = allowed_set(logits, T, top_k, min(top_p + 1e-5, 1.0))
        assert len(loose) <= len(allowed) * 1.05 + 2, "ambiguous test data"
        g = torch.Generator().manual_seed(seed)
        got = [nanofast.sample(logits, T, top_k, top_p, g) for _ in range(draws)]
        outside = set(got) - loose
        assert not outside, f"sampled {sorted(outside)[:5]} outside the {len(allowed)} allowed tokens"
        if len(allowed) > 1 and n == 1000:
            assert len(set(got)) > 1


def test_sample_distribution():
    # the kept tokens are drawn with their renormalized probabilities
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    T, top_k, top_p = 0.8, 5, 0.9
    allowed = allowed_set(logits, T, top_k, top_p)
    assert allowed == allowed_set(logits, T, top_k, top_p + 0.01) == allowed_set(logits, T, top_k, top_p - 0.01)
    idx = sorted(allowed)
    expected = torch.softmax(logits[idx].double() / T, 0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = [nanofast.sample(logits, T, top_k, top_p, g) for _ in range(n)]
    assert set(draws) <= allowed
    for tok, p in zip(idx, expected.tolist()):
        freq = draws.count(tok) / n
        assert abs(freq - p) < 0.035, (tok, freq, p)  # > 4 standard errors


def sampling_probs(logits, T, top_k, top_p):
    """{token: probability} of one draw with transformers' semantics: allowed_set's tokens, with
    their probabilities at temperature T renormalized over the set (float64)."""
    keep = sorted(allowed_set(logits, T, top_k, top_p))
    return dict(zip(keep, torch.softmax(logits.double()[keep] / T, 0).tolist()))


def top_p_is_ambiguous(logits, T, top_k, top_p):  # the cut moves within fp32 rounding of top_p
    return top_p < 1 and allowed_set(logits, T, top_k, top_p - 1e-4) != allowed_set(logits, T, top_k, top_p + 1e-4)


def chi2_p_value(draws, probs):
    """Pearson's chi-square test of draws (token ids) against probs {token: p}: one bin per token
    expected at least 5 times, one for the rest (merged into the last if that is expected < 5)."""
    n, counts = len(draws), {}
    for t in draws:
        counts[t] = counts.get(t, 0) + 1
    big = [t for t, p in probs.items() if p * n >= 5]
    obs, exp = [counts.get(t, 0) for t in big], [probs[t] * n for t in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5 or not big:
        obs, exp = obs + [rest_obs], exp + [rest_exp]
    else:
        obs[-1], exp[-1] = obs[-1] + rest_obs, exp[-1] + rest_exp
    if len(obs) < 2:
        return 1.0
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                        torch.tensor(chi2 / 2, dtype=torch.float64)))


# generate()'s sampling, as a user sees it: a checkpoint with a 512-token vocabulary (a draw costs
# about a millisecond) whose logits have a std of ~8, so temperature 4 spreads the probability
# over dozens of tokens (the top one gets 0.12; at temperature 1 it would get 0.96).
SAMPLING_VOCAB = 512
GENERATE_SAMPLING = {  # name: (temperature, top_k, top_p)
    "temperature": (4.0, 0, 1.0),
    "cool": (2.0, 0, 1.0),
    "top-k": (4.0, 6, 1.0),
    "top-p": (4.0, 0, 0.5),
    "top-k-and-top-p": (4.0, 12, 0.6),
}


@pytest.fixture
def one_thread():
    """For tests that run thousands of steps on tiny tensors: torch's second thread only adds a
    hand-off to each op, which costs tens of ms a step on a busy 2-core machine (seen: 15 ms a
    draw with two threads, 0.7 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sampling_case(tmp_path_factory):
    """The small-vocabulary checkpoint, a prompt, and the fp32 logits after the prompt."""
    d = make_checkpoint(tmp_path_factory.mktemp("sampling"), vocab=SAMPLING_VOCAB)
    prompt = torch.randint(0, SAMPLING_VOCAB, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    return dict(dir=d, prompt=prompt, logits=load_engine(d).forward(prompt, 0)[-1])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(GENERATE_SAMPLING))
def test_generate_first_token_distribution(sampling_case, name):
    """The first token of generate(..., seed=s) over 1500 seeds follows transformers' distribution for
    the settings: nothing outside the allowed set, every token of it expected 20 times or more drawn
    at least once (a correct draw misses one with probability e^-20), and a chi-square test. The test
    data makes each setting matter: dropping any one (temperature 1, top_k 0, top_p 1) moves the
    distribution by a total variation of at least 0.25 (seen: 0.35-0.84), which 1500 draws detect at
    a chi-square p-value far below 1e-10; and each allowed set's least likely token, the one a cut
    one place too early drops, is expected 25 times or more (seen: 30, top-p's p = 0.0199)."""
    T, top_k, top_p = GENERATE_SAMPLING[name]
    logits, prompt, n = sampling_case["logits"], sampling_case["prompt"], 1500
    assert not top_p_is_ambiguous(logits, T, top_k, top_p)
    probs = sampling_probs(logits, T, top_k, top_p)
    for variant in {(1.0, top_k, top_p), (T, 0, top_p), (T, top_k, 1.0)} - {(T, top_k, top_p)}:
        other = sampling_probs(logits, *variant)
        tv = 0.5 * sum(abs(probs.get(t, 0) - other.get(t, 0)) for t in probs.keys() | other.keys())
        assert tv >= 0.25, f"test data: {variant} is too close to {(T, top_k, top_p)} (total variation {tv:.3f})"
    if top_k or top_p < 1:
        assert min(probs.values()) * n >= 25, "test data: the least likely allowed token is too rare"
    eng = load_engine(sampling_case["dir"])
    draws = [list(eng.generate(prompt, max_new_tokens=1, temperature=T, top_k=top_k, top_p=top_p, seed=s))[0]
             for s in range(n)]
    outside = set(draws) - set(probs)
    assert not outside, f"drew {sorted(outside)[:5]} outside the {len(probs)} allowed tokens"
    missing = {t for t, p in probs.items() if p * n >= 20} - set(draws)
    assert not missing, f"never drew {sorted(missing)[:5]}, each expected >= 20 times"
    p_value = chi2_p_value(draws, probs)
    assert p_value > 1e-3, p_value  # seeded: deterministic


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(GENERATE_SAMPLING))
def test_generate_samples_every_step(sampling_case, name):
    """300 tokens of one seeded generation: each is in the allowed set of the logits it was drawn
    from (a teacher-forced forward of the output), and together they are as surprising as those
    distributions say. Summed over the steps, the surprise -log p(token) of draws that follow them
    has mean sum(H) and variance sum(Var) (H: each distribution's entropy), so
    z = (surprise - sum H) / sqrt(sum Var) is about N(0, 1). Tokens drawn at temperature 1 instead
    gave z from -7 to -15 here, uniform ones +45 and more; correct draws -1.7 to +0.6. |z| < 4.5
    (seeded: deterministic)."""
    T, top_k, top_p = GENERATE_SAMPLING[name]
    n, prompt = 300, sampling_case["prompt"]
    eng = load_engine(sampling_case["dir"], max_seq_len=512)
    out = list(eng.generate(prompt, max_new_tokens=n, temperature=T, top_k=top_k, top_p=top_p, seed=1))
    assert len(out) == n and eng.stop_reason == "max_new_tokens"
    logits = eng.forward(prompt + out[:-1], 0)[len(prompt) - 1:]  # row i: the logits out[i] was drawn from
    surprise = entropy = variance = 0.0
    for i, tok in enumerate(out):
        if top_p_is_ambiguous(logits[i], T, top_k, top_p):
            continue
        probs = sampling_probs(logits[i], T, top_k, top_p)
        assert tok in probs, f"step {i}: token {tok} is outside the {len(probs)} allowed tokens"
        logp = {t: math.log(p) for t, p in probs.items()}
        h = -sum(p * logp[t] for t, p in probs.items())
        surprise, entropy = surprise - logp[tok], entropy + h
        variance += sum(p * logp[t] ** 2 for t, p in probs.items()) - h * h
    z = (surprise - entropy) / math.sqrt(variance)
    assert abs(z) < 4.5, f"surprise {surprise:.1f} against {entropy:.1f} +- {math.sqrt(variance):.1f} (z = {z:.1f})"


# -----------------------------------------------------------------------------
# config


def _expected_config(raw):
    return nanofast.Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"], head_dim=raw["head_dim"], rms_norm_eps=raw["rms_norm_eps"],
        rope_theta=1e6, tie_word_embeddings=raw["tie_word_embeddings"])


@pytest.mark.parametrize("rope_form", ["theta", "parameters"])
def test_config_rope_forms(tmp_path, rope_form):
    raw = released_config()
    write_json(tmp_path / "config.json", with_rope_parameters(raw) if rope_form == "parameters" else raw)
    cfg = nanofast.load_config(str(tmp_path))
    assert cfg == _expected_config(released_config())
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 1e6


@requires_qwen3_files
@pytest.mark.parametrize("name,tied", [("Qwen3-0.6B", True), ("Qwen3-1.7B", True), ("Qwen3-4B", True),
                                       ("Qwen3-8B", False)])
def test_config_released(tmp_path, name, tied):
    shutil.copyfile(QWEN3_FILES / f"{name}.config.json", tmp_path / "config.json")
    raw = released_config(name)
    cfg = nanofast.load_config(str(tmp_path))
    assert cfg == _expected_config(raw)
    assert cfg.tie_word_embeddings is tied and cfg.head_dim == 128


@contextlib.contextmanager
def raises_one_line(*needles):
    """The block raises NanofastError with a one-line message that contains every needle
    (`with raises_one_line() as got:` leaves the message in got[0])."""
    got = []
    with pytest.raises(nanofast.NanofastError) as e:
        yield got
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    got.append(msg)


@pytest.mark.parametrize("change", [
    dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]),
    dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    dict(architectures=["LlamaForCausalLM"]),
    dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
], ids=["llama", "qwen3_moe", "qwen2", "llama-arch", "yarn-rope_scaling", "yarn-rope_parameters"])
def test_config_rejects_other_models(tmp_path, change):
    write_json(tmp_path / "config.json", {**released_config(), **change})
    with raises_one_line():
        nanofast.load_config(str(tmp_path))


def test_config_bad_files(tmp_path):
    with raises_one_line():
        nanofast.load_config(str(tmp_path / "nowhere"))
    with raises_one_line():
        nanofast.load_config(str(tmp_path))  # folder without config.json
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    with raises_one_line():
        nanofast.load_config(str(tmp_path))


# -----------------------------------------------------------------------------
# weights: loading and checking


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, tokenizer_json):
    """A very small checkpoint to break in different ways (with tokenizer files if available)."""
    return make_checkpoint(tmp_path_factory.mktemp("small"), hidden=32, layers=1, heads=2, kv_heads=1,
                           head_dim=16, intermediate=64, tokenizer_json=tokenizer_json)


@pytest.fixture(scope="session")
def sharded_small(tmp_path_factory, tokenizer_json):
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), hidden=32, layers=2, heads=2, kv_heads=1,
                           head_dim=16, intermediate=64, shards=3, tied=False, tokenizer_json=tokenizer_json)


class Broken(NamedTuple):
    """A way to break a copy of a checkpoint folder."""
    edit: Callable  # edit(folder)
    needles: tuple = ()  # strings the error must contain
    sharded: bool = False  # a copy of sharded_small, else of small_ckpt


def broken_copy(broken, small, sharded, dst):
    shutil.copytree(sharded if broken.sharded else small, dst)
    broken.edit(dst)
    return dst


def edit_tensors(edit):  # -> a folder edit that applies edit(dict) to model.safetensors
    def edit_folder(d):
        w = load_file(str(d / "model.safetensors"))
        edit(w)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit_folder


def _without(name):
    return Broken(edit_tensors(lambda w: w.pop(name)), ("missing", name))


def _zeros(name, shape, *words):  # an unexpected tensor, or one of the wrong shape
    return Broken(edit_tensors(lambda w: w.__setitem__(name, torch.zeros(shape, dtype=torch.bfloat16))),
                  (name, *words))


def _config(edit):  # -> a folder edit that applies edit(dict) to config.json
    return lambda d: edit_json(d / "config.json", edit)


def _weights_file(write):  # -> a folder edit that rewrites model.safetensors as write(its bytes)
    def edit(d):
        f = d / "model.safetensors"
        f.write_bytes(write(f.read_bytes()))
    return edit


SHARD2 = "model-00002-of-00003.safetensors"
DAMAGED = ("model.safetensors", "corrupt or truncated")  # the words for a damaged weights file

# Checkpoint folders that pass load_config but whose weights do not load
BROKEN_WEIGHTS = {
    "missing-tensor": _without("model.layers.0.mlp.up_proj.weight"),
    "missing-norm": _without("model.norm.weight"),
    "unexpected-tensor": _zeros("model.layers.0.mlp.extra_proj.weight", (4, 4), "unexpected"),
    "unexpected-layer": _zeros("model.layers.1.input_layernorm.weight", (32,), "unexpected"),
    "misshaped-tensor": _zeros("model.layers.0.self_attn.k_proj.weight", (32, 32), "(32, 32)", "expected (16, 32)"),
    "misshaped-embed": _zeros("model.embed_tokens.weight", (1000, 32), "(1000, 32)", "expected (151936, 32)"),
    "truncated-file": Broken(_weights_file(lambda data: data[:len(data) // 2]), DAMAGED),
    "garbage-file": Broken(_weights_file(lambda data: os.urandom(4096)), DAMAGED),
    # a plausible header length followed by junk
    "garbage-header": Broken(_weights_file(lambda data: (64).to_bytes(8, "little") + b"{not json at all"
                                           + os.urandom(200)), DAMAGED),
    "empty-file": Broken(_weights_file(lambda data: b""), DAMAGED),
    "no-weights": Broken(lambda d: (d / "model.safetensors").unlink(), ("no model.safetensors",)),
    "missing-shard": Broken(lambda d: (d / SHARD2).unlink(), (SHARD2, "missing"), sharded=True),
    "index-missing-a-tensor": Broken(lambda d: edit_json(d / "model.safetensors.index.json",
                                                         lambda index: index["weight_map"].pop("lm_head.weight")),
                                     ("lm_head.weight", "index"), sharded=True),
    "untied-without-lm-head": Broken(_config(lambda cfg: cfg.update(tie_word_embeddings=False)),
                                     ("missing", "lm_head.weight")),
}


@pytest.mark.parametrize("name", list(BROKEN_WEIGHTS))
def test_load_rejects_broken_weights(tmp_path, small_ckpt, sharded_small, name):
    broken = BROKEN_WEIGHTS[name]
    d = broken_copy(broken, small_ckpt, sharded_small, tmp_path / name)
    with raises_one_line(*broken.needles):
        load_engine(d)


# -----------------------------------------------------------------------------
# tokenizer, chat template, streaming (need the Qwen3 tokenizer files)


@pytest.fixture(scope="session")
def tok_dir(small_ckpt):
    if QWEN3_FILES is None:
        pytest.skip("NANOFAST_QWEN3_FILES is not set")
    return small_ckpt


@pytest.fixture(scope="session")
def ref_tok(tok_dir):
    """The reference tokenizer: tokenizer.json through the `tokenizers` library."""
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """transformers' tokenizer, for the released chat template (tokenizer_config.json)."""
    return AutoTokenizer.from_pretrained(str(tok_dir))


def template(hf_tok, prompt, system=None, think=True):
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    kw = {} if think else {"enable_thinking": False}
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


PROMPTS = [
    "Why is the sky blue?",
    "line one\nline two\n\n  indented\tand tabbed\r\nwindows line\n",
    "  leading and trailing spaces  ",
    "中文：你好，世界！日本語のテキスト。한국어 😀👍🏽👨‍👩‍👧 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 émoji",
    "quotes ' \" `backticks` {braces} {{jinja}} {% raw %} <think> </think> <|im_end|>",
    "",
]
SYSTEMS = [None, "You are a helpful assistant.", "Be terse.\nAnswer in 中文 😀.", ""]


@requires_qwen3_files
@pytest.mark.parametrize("think", [True, False], ids=["think", "no-think"])
@pytest.mark.parametrize("system", SYSTEMS, ids=["no-system", "system", "system-unicode", "system-empty"])
def test_chat_template_matches_released(hf_tok, system, think):
    for prompt in PROMPTS:
        expected = template(hf_tok, prompt, system, think)
        got = nanofast.Tokenizer.chat(prompt, system=system, think=think)
        assert got == expected, (prompt, system, think)


TEXTS = [
    "Hello world",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "中文测试：你好，世界！生僻字龘靐齉爩，丶鬱鬱，𠀀𪚥。",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇯🇵🫠🪿🧌 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and ünïcödé",
    "code:\n```python\ndef f(x):\n    return x ** 2  # square\n```\n",
    "  spaces   and\n\n\nnewlines\r\n",
]


@requires_qwen3_files
def test_tokenizer_encode_decode(tok_dir, ref_tok, hf_tok):
    tok = nanofast.Tokenizer(str(tok_dir))
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    for text in TEXTS + PROMPTS:
        ids = tok.encode(text)
        assert ids == ref_tok.encode(text, add_special_tokens=False).ids
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True)


@requires_qwen3_files
def test_tokenizer_eos_ids(tok_dir):
    tok = nanofast.Tokenizer(str(tok_dir))
    assert set(tok.defaults["eos_ids"]) == EOS_IDS


def _stream(tok, ids):
    got = []
    pieces = list(nanofast.stream_text(tok, (i for i in ids), got))
    assert got == ids
    return pieces


@requires_qwen3_files
@pytest.mark.parametrize("text", TEXTS[2:4] + [
    "<think>\n让我想想……🤔 龘靐</think>\n\n答案是 42。🫠<|im_end|>",
    "🫠" * 5 + "鬱" * 5 + "🇯🇵👨‍👩‍👧",
], ids=["chinese", "emoji", "think-chinese-specials", "repeated"])
def test_stream_decoder_multibyte(tok_dir, ref_tok, text):
    tok = nanofast.Tokenizer(str(tok_dir))
    ids = tok.encode(text)
    # the test only means something if some tokens are partial UTF-8 characters
    assert any("\ufffd" in ref_tok.decode([i]) for i in ids), "no token splits a character"
    pieces = _stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces), pieces
    full = ref_tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    assert full == text.replace("<|im_end|>", "")


@requires_qwen3_files
def test_stream_decoder_odd_sequences(tok_dir, ref_tok):
    tok = nanofast.Tokenizer(str(tok_dir))
    ids = tok.encode("ab😀cd中")
    for cut in range(len(ids) + 1):  # stopping anywhere, even inside a character
        assert "".join(_stream(tok, ids[:cut])) == ref_tok.decode(ids[:cut], skip_special_tokens=True)
    rand = random_prompt(400, seed=7)  # random tokens: invalid UTF-8 everywhere
    assert "".join(_stream(tok, rand)) == ref_tok.decode(rand, skip_special_tokens=True)


# -----------------------------------------------------------------------------
# CLI. Each case is a real `python nanofast.py ...` subprocess; importing torch costs
# ~2.5 s of CPU per process, so they are all launched at once by session fixtures and
# the tests only inspect the results. Extra bad inputs beyond the required list run
# through nanofast.main(argv) in this process, with the same checks on its output.


def _run_all(jobs, workers=4):
    """Run {name: (argv, stdin)} as `python nanofast.py ...` in the repo; -> {name: CompletedProcess}."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")

    def run(item):
        name, (argv, stdin) = item
        return name, subprocess.run([sys.executable, "nanofast.py", *argv], cwd=REPO, input=stdin,
                                    capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(run, jobs.items()))


def _assert_cli_error(rc, out, err, needles=()):
    """Non-zero exit; stderr is one non-empty line "error: ..." (exit 1), or argparse's own
    usage line + error line (exit 2); never a traceback."""
    assert rc != 0, f"exit 0; stdout {out[-300:]!r}"
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    lines = err.splitlines()
    if rc == 2 and len(lines) == 2 and lines[0].startswith("usage:"):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {err[-2000:]!r}"
    if rc != 2:
        assert rc == 1 and lines[0].startswith("error:"), (rc, lines[0])
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


OK = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3", "--temperature", "0"]
HI = ("--prompt", "hi")


class CliError(NamedTuple):
    """A bad invocation: --model M, then args, OK and flags (the later flag wins)."""
    args: tuple = HI  # an entry that is a function gets a scratch folder and returns the argument
    flags: tuple = ()
    broken: Broken = None  # M is a copy of the checkpoint broken so; else small_ckpt
    tok: bool = False  # needs the tokenizer files (the CLI reads them before the weights)
    needles: tuple = ()  # strings the error line must contain
    subprocess: bool = False  # one of the required cases: a real `python nanofast.py` run


def _latin1_file(tmp):
    f = tmp / "latin1.txt"
    f.write_bytes("caf\xe9 \xff\xfe".encode("latin-1"))
    return f


# a --max-seq-len whose KV cache no machine holds (175 TiB for small_ckpt, at 192 bytes a token)
BEYOND_MEMORY = 10 ** 12
MEMORY_NEEDLES = ("not enough memory on cpu", "GiB is free", "KV cache", "--max-seq-len")

# the broken checkpoints among the required cases
SUBPROCESS_WEIGHTS = {"missing-tensor", "unexpected-tensor", "misshaped-tensor", "truncated-file", "garbage-file",
                      "missing-shard"}

BAD_MAX_SEQ_LEN = "--max-seq-len must be >= 2"
NO_SUCH_CUDA = ("no such GPU", "cuda:99") if torch.cuda.is_available() else ("CUDA is not available",)

CLI_ERRORS = {
    "missing-model-dir": CliError(broken=Broken(shutil.rmtree), subprocess=True,  # a copy, deleted
                                  needles=("model folder not found", "missing-model-dir")),
    "config-not-json": CliError(broken=Broken(lambda d: (d / "config.json").write_text("{this is not json")),
                                subprocess=True, needles=("config.json", "not valid JSON")),
    "wrong-architecture": CliError(broken=Broken(_config(lambda cfg: cfg.update(
        model_type="llama", architectures=["LlamaForCausalLM"]))), subprocess=True,
        needles=("'llama'", "LlamaForCausalLM", "not supported", "Qwen3")),
    **{name: CliError(broken=b, tok=True, needles=b.needles, subprocess=name in SUBPROCESS_WEIGHTS)
       for name, b in BROKEN_WEIGHTS.items()},
    **{name: CliError(flags=flags, subprocess=True, needles=needles) for name, (flags, needles) in {
        "temperature-negative": (("--temperature", "-1"), (BAD_TEMPERATURE,)),
        "top-p-zero": (("--top-p", "0"), (BAD_TOP_P,)),
        "top-p-above-one": (("--top-p", "1.5"), (BAD_TOP_P,)),
        "top-k-negative": (("--top-k", "-1"), (BAD_TOP_K,)),
        "max-new-tokens-zero": (("--max-new-tokens", "0"), (BAD_MAX_NEW_TOKENS,)),
        "max-seq-len-one": (("--max-seq-len", "1"), (BAD_MAX_SEQ_LEN,)),
        "dtype-int8": (("--dtype", "int8"), ("--dtype", "'int8'", "float32")),
        "device-bogus": (("--device", "bogus"), ("'bogus'", "cpu, cuda or cuda:N")),
    }.items()},
    "prompt-file-missing": CliError(("--prompt-file", lambda tmp: tmp / "missing.txt"), subprocess=True,
                                    needles=("--prompt-file", "missing.txt", "FileNotFoundError")),
    "no-prompt": CliError(args=(), subprocess=True, needles=("no prompt", "--prompt")),
    "prompt-too-long": CliError(flags=("--prompt", "word " * 200, "--max-seq-len", "64"), tok=True, subprocess=True,
                                needles=("the prompt is", "max_seq_len 64", "--max-seq-len")),
    # issue 27: refused before loading, in one line with the figures (see "memory" for the checks in-process)
    "max-seq-len-beyond-memory": CliError(flags=("--max-seq-len", BEYOND_MEMORY), tok=True, needles=MEMORY_NEEDLES,
                                          subprocess=True),
    "chat-max-seq-len-beyond-memory": CliError(args=("--chat",), flags=("--max-seq-len", BEYOND_MEMORY), tok=True,
                                               needles=MEMORY_NEEDLES, subprocess=True),
    # more bad flags and prompts, through nanofast.main in this process
    **{name: CliError(flags=flags, needles=needles) for name, (flags, needles) in {
        "temperature-nan": (("--temperature", "nan"), (BAD_TEMPERATURE,)),
        "temperature-inf": (("--temperature", "inf"), (BAD_TEMPERATURE,)),
        "temperature-text": (("--temperature", "hot"), ("--temperature", "'hot'")),
        "top-p-negative": (("--top-p", "-0.5"), (BAD_TOP_P,)),
        "max-new-tokens-negative": (("--max-new-tokens", "-5"), (BAD_MAX_NEW_TOKENS,)),
        "max-seq-len-zero": (("--max-seq-len", "0"), (BAD_MAX_SEQ_LEN,)),
        "dtype-bogus": (("--dtype", "fp8"), ("--dtype", "'fp8'", "bfloat16")),
        "device-tpu": (("--device", "tpu"), ("'tpu'", "cpu, cuda or cuda:N")),
        "device-cuda-index": (("--device", "cuda:99"), NO_SUCH_CUDA),
        "unknown-flag": (("--frobnicate",), ("unrecognized", "--frobnicate")),
        "quantize-int4": (("--quantize", "int4"), ("--quantize", "'int4'", "fp8")),
        "chat-json": (("--chat", "--json"), ("--chat", "--json")),
        "chat-raw": (("--chat", "--raw"), ("--chat", "--raw")),
        "chat-prompt-stdin": (("--chat", "--prompt", "-"), ("--chat", "--prompt -")),
    }.items()},
    **{name: CliError(args, tok=True, needles=needles) for name, (args, needles) in {
        "prompt-too-long-raw": (("--raw", "--prompt", "x " * 64, "--max-seq-len", "64"),
                                ("the prompt is 65 tokens", "max_seq_len 64")),
        "prompt-fills-cache": (("--raw", "--prompt", "Hello world", "--max-seq-len", "2"),
                               ("the prompt is 2 tokens", "max_seq_len 2")),
        "empty-raw-prompt": (("--raw", "--prompt", ""), ("the prompt is empty",)),
        "prompt-and-prompt-file": (("--prompt", "hi", "--prompt-file", __file__),
                                   ("--prompt", "--prompt-file", "not both")),
        "prompt-file-is-dir": (("--prompt-file", REPO), ("--prompt-file", "IsADirectoryError")),
        "prompt-file-not-utf8": (("--prompt-file", _latin1_file),
                                 ("--prompt-file", "latin1.txt", "UnicodeDecodeError")),
    }.items()},
}


def _cli_error_argv(name, small, sharded, tmp):
    """The argv of one bad-input case, building under tmp what it needs."""
    case = CLI_ERRORS[name]
    model = broken_copy(case.broken, small, sharded, tmp / name) if case.broken else small
    args = [a(tmp) if callable(a) else a for a in case.args]
    return [str(a) for a in ("--model", model, *args, *OK, *case.flags)]


@pytest.fixture(scope="session")
def cli_errors(small_ckpt, sharded_small, tmp_path_factory):
    """The subprocess cases, all launched at once."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    jobs = {name: (_cli_error_argv(name, small_ckpt, sharded_small, tmp), None) for name, case in CLI_ERRORS.items()
            if case.subprocess and (QWEN3_FILES is not None or not case.tok)}
    return _run_all(jobs)


def _main(argv, capsys):  # nanofast.main in this process -> (exit code, stdout, stderr)
    try:
        rc = nanofast.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", list(CLI_ERRORS))
def test_cli_error(cli_errors, small_ckpt, sharded_small, tmp_path, capsys, name):
    case = CLI_ERRORS[name]
    assert case.needles, "every case names the words its error must contain"
    if case.tok and QWEN3_FILES is None:
        pytest.skip("needs NANOFAST_QWEN3_FILES")
    if case.subprocess:
        r = cli_errors[name]
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        rc, out, err = _main(_cli_error_argv(name, small_ckpt, sharded_small, tmp_path), capsys)
    _assert_cli_error(rc, out, err, case.needles)


def test_cli_help(capsys):
    rc, out, err = _main(["--help"], capsys)
    assert rc == 0
    for opt in ("--model", "--prompt", "--prompt-file", "--system", "--no-think", "--raw", "--max-new-tokens",
                "--temperature", "--top-k", "--top-p", "--seed", "--max-seq-len", "--dtype", "--device",
                "--ignore-eos", "--json", "--plain", "--quantize", "--chat", "--draft", "--lookup", "--spec-k"):
        assert opt in out, opt


FILE_PROMPT = "line one\nline two 中文 😀\n  indented"
SEEDED = ["--temperature", "3", "--top-k", "40", "--top-p", "0.6", "--seed", "7", "--ignore-eos"]


@pytest.fixture(scope="session")
def cli_runs(tok_dir, tmp_path_factory):
    """Successful CLI runs on a tiny checkpoint, all launched at once."""
    tmp = tmp_path_factory.mktemp("cli")
    m = ["--model", str(tok_dir), "--device", "cpu", "--dtype", "float32"]
    greedy = [*m, "--prompt", "Hello there", "--max-new-tokens", "9", "--temperature", "0"]
    (tmp / "prompt.txt").write_text(FILE_PROMPT, encoding="utf-8")
    short = ["--max-new-tokens", "2", "--json"]
    jobs = {
        "text": (greedy, None),
        "json": ([*greedy, "--json"], None),
        "stdin": ([*m, "--prompt", "-", *short], "Hello there"),
        "file": ([*m, "--prompt-file", str(tmp / "prompt.txt"), *short], None),
        "raw": ([*m[:-2], "--dtype", "bfloat16", "--raw", "--prompt", "The capital of France is", *short], None),
        "system": ([*m, "--system", "You are terse.", "--prompt", "Hello there", *short], None),
        "no-think": ([*m, "--no-think", "--prompt", "日本語 🗾\nok", *short], None),
        "seeded": ([*m, "--prompt", "Hi", "--max-new-tokens", "12", *SEEDED, "--json"], None),
        "quantize": ([*greedy, "--quantize", "fp8", "--json"], None),
        "chat": ([*m, "--chat", "--max-new-tokens", "3", "--temperature", "0"], CHAT_SCRIPT),
        "chat-overflow": ([*m, "--chat", "--max-seq-len", "48", "--max-new-tokens", "3", "--temperature", "0",
                           "--prompt", "word " * 200], "Hi\n"),
    }
    return _run_all(jobs)


def _json(r):
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-1000:]
    return json.loads(lines[0])


def _template_ids(ref_tok, hf_tok, prompt, system=None, think=True):
    return ref_tok.encode(template(hf_tok, prompt, system, think), add_special_tokens=False).ids


@requires_qwen3_files
def test_cli_text_matches_json(cli_runs, ref_tok, hf_tok, tok_dir):
    r, j = cli_runs["text"], _json(cli_runs["json"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert set(j) >= {"prompt_ids", "generated_ids", "text", "stop_reason", "timings"}
    ids = j["generated_ids"]
    assert j["prompt_ids"] == _template_ids(ref_tok, hf_tok, "Hello there")
    assert 1 <= len(ids) <= 9
    assert j["stop_reason"] == ("max_new_tokens" if len(ids) == 9 else "eos")
    text = ref_tok.decode(ids, skip_special_tokens=True)
    assert j["text"] == text
    assert r.stdout in (text, text + "\n")
    t = j["timings"]
    assert set(t) >= {"ttft_s", "decode_tok_s", "total_s", "prompt_tokens", "generated_tokens"}
    assert t["prompt_tokens"] == len(j["prompt_ids"]) and t["generated_tokens"] == len(ids)
    # the stderr stats line gives both token counts
    P, G = len(j["prompt_ids"]), len(ids)
    assert P != G
    assert any(re.search(rf"\b{P}\b", line) and re.search(rf"\b{G}\b", line) for line in r.stderr.splitlines()), \
        r.stderr
    # and the Python API gives the same ids (greedy, stopping at the released eos ids)
    eng = load_engine(tok_dir)
    assert list(eng.generate(j["prompt_ids"], max_new_tokens=9, temperature=0.0, stop_ids=EOS_IDS)) == ids


@requires_qwen3_files
@pytest.mark.parametrize("name,prompt,system,think", [
    ("stdin", "Hello there", None, True),
    ("file", FILE_PROMPT, None, True),
    ("system", "Hello there", "You are terse.", True),
    ("no-think", "日本語 🗾\nok", None, False),
])
def test_cli_prompt_options(cli_runs, ref_tok, hf_tok, name, prompt, system, think):
    j = _json(cli_runs[name])
    assert j["prompt_ids"] == _template_ids(ref_tok, hf_tok, prompt, system, think)
    assert 1 <= len(j["generated_ids"]) <= 2


# a conversation piped into --chat: (kind, text), kind "user" for a turn, "command" for a slash command
CHAT_TURNS = [("user", "Hello there"), ("command", "/stats"), ("user", "Why is the sky blue?"), ("command", "/stats"),
              ("command", "/think off"), ("user", "And now?"), ("command", "/system Be brief."), ("user", "Hi again"),
              ("command", "/frobnicate"), ("command", "/reset"), ("user", "Hello there"), ("command", "/exit"),
              ("user", "never read")]
CHAT_SCRIPT = "".join(text + "\n" for _, text in CHAT_TURNS)


@requires_qwen3_files
def test_cli_chat(cli_runs, tok_dir):
    """--chat on piped stdin: the answers are the Chat API's for the same conversation (with the
    commands applied), /stats reports the cache reuse, an unknown command gets a one-line hint,
    and /exit ends the session."""
    r = cli_runs["chat"]
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    chat = nanofast.Chat(load_engine(tok_dir), nanofast.Tokenizer(str(tok_dir)), max_new_tokens=3, temperature=0.0)
    expected = ""
    for kind, text in CHAT_TURNS[:CHAT_TURNS.index(("command", "/exit"))]:
        if kind == "user":
            expected += "".join(chat.send(text)) + "\n"
        elif text.startswith("/think"):
            chat.think = text == "/think on"
        elif text.startswith("/system"):
            chat.system, chat.messages = "Be brief.", []
        elif text == "/reset":
            chat.reset()
    assert r.stdout == expected
    reused = [int(n) for n in re.findall(r"\((\d+) reused from the cache\)", r.stderr)]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 0, r.stderr
    hints = [line for line in r.stderr.splitlines() if "/frobnicate" in line]
    assert len(hints) == 1 and "/reset" in hints[0]


@requires_qwen3_files
def test_cli_chat_overflow(cli_runs):
    # a turn that does not fit --max-seq-len is refused in one line, and the session goes on
    r = cli_runs["chat-overflow"]
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "max-seq-len" in errors[0] and "/reset" in errors[0]
    assert r.stdout.startswith("\n") and len(r.stdout.strip()) > 0  # no answer to the long turn, then one to "Hi"


@requires_qwen3_files
def test_cli_quantize_fp8(cli_runs, tok_dir):
    # --quantize fp8 reaches the engine: its ids are the Python API's with quantize="fp8", and it says so
    r, j = cli_runs["quantize"], _json(cli_runs["quantize"])
    assert "fp8 weights" in r.stderr and j["timings"]["weights"] == "fp8"
    eng = load_engine(tok_dir, quantize="fp8")
    assert list(eng.generate(j["prompt_ids"], max_new_tokens=9, temperature=0.0, stop_ids=EOS_IDS)) == j["generated_ids"]


@requires_qwen3_files
def test_cli_load_line_reports_memory(cli_runs, tok_dir):
    # where the memory goes: the weights' GiB (as the memory check counts them) and the KV cache's (4096 tokens)
    line = next(x for x in cli_runs["text"].stderr.splitlines() if x.startswith("[nanofast] loaded"))
    cfg = nanofast.load_config(str(tok_dir))
    weights = nanofast.memory_needed(cfg, torch.float32, 4096, False)[0]
    kv = 4096 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32
    assert f"(float32 weights {weights / 2 ** 30:.2f} GiB, KV cache {kv / 2 ** 30:.2f} GiB, " in line, line


@requires_qwen3_files
def test_cli_raw_bf16(cli_runs, ref_tok):
    r, j = cli_runs["raw"], _json(cli_runs["raw"])
    assert j["prompt_ids"] == ref_tok.encode("The capital of France is", add_special_tokens=False).ids
    assert 1 <= len(j["generated_ids"]) <= 2
    # --dtype reaches the engine: the load line and the timings name the format (float32 without it)
    assert re.search(r"\(bfloat16 weights [\d.]+ GiB, KV cache [\d.]+ GiB, bfloat16 activations", r.stderr)
    assert j["timings"]["weights"] == "bfloat16"
    assert _json(cli_runs["json"])["timings"]["weights"] == "float32"


@requires_qwen3_files
def test_cli_seeded_sampling(cli_runs, tok_dir):
    """The CLI passes its sampling flags through: the Python API with the same seed agrees, and
    each flag matters (the released defaults, or the setting off, in its place give other ids)."""
    j = _json(cli_runs["seeded"])
    assert len(j["generated_ids"]) == 12 and j["stop_reason"] == "max_new_tokens"
    eng = load_engine(tok_dir)

    def api(T, k, p):
        return list(eng.generate(j["prompt_ids"], max_new_tokens=12, temperature=T, top_k=k, top_p=p, seed=7))

    assert api(3.0, 40, 0.6) == j["generated_ids"]
    for other in [(0.6, 40, 0.6), (1.0, 40, 0.6), (3.0, 20, 0.6), (3.0, 0, 0.6), (3.0, 40, 0.95), (3.0, 40, 1.0)]:
        assert api(*other) != j["generated_ids"], f"test data: {other} gives the same ids"


def _cli_json(argv, capsys):  # nanofast.main(argv) in this process with --json -> (its object, stderr)
    rc, out, err = _main([str(a) for a in argv] + ["--json"], capsys)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    return json.loads(out), err


@requires_qwen3_files
def test_cli_stops_at_eos_unless_ignore_eos(tok_dir, ref_tok, hf_tok, tmp_path, capsys):
    """The CLI stops at generation_config.json's eos_token_id (printing it), and --ignore-eos runs
    on to --max-new-tokens. The eos id here is a token the random model produces greedily at a
    step >= 2, which the released eos ids never are."""
    d = shutil.copytree(tok_dir, tmp_path / "ckpt")
    prompt_ids = _template_ids(ref_tok, hf_tok, "Hello there")
    greedy = list(load_engine(d).generate(prompt_ids, max_new_tokens=12, temperature=0.0))
    j = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    edit_json(d / "generation_config.json", lambda g: g.update(eos_token_id=[151645, greedy[j]]))
    argv = ["--model", d, "--device", "cpu", "--prompt", "Hello there", "--max-new-tokens", "12", "--temperature", "0"]
    out, _ = _cli_json(argv, capsys)
    assert out["generated_ids"] == greedy[:j + 1] and out["stop_reason"] == "eos"
    out, _ = _cli_json(argv + ["--ignore-eos"], capsys)
    assert out["generated_ids"] == greedy and out["stop_reason"] == "max_new_tokens"


# generation_config.json's sampling fields; the (temperature, top_k, top_p) the CLI must then use; and
# the settings of a CLI that ignored one of the fields, which the test data makes give other ids
GENERATION_CONFIGS = {
    "temperature": (dict(do_sample=True, temperature=2.0, top_k=0, top_p=1.0), (2.0, 0, 1.0),
                    [(1.0, 0, 1.0), (0.0, 0, 1.0)]),
    "top-k": (dict(do_sample=True, temperature=2.0, top_k=5, top_p=1.0), (2.0, 5, 1.0),
              [(2.0, 0, 1.0), (1.0, 5, 1.0), (0.0, 0, 1.0)]),
    "top-p": (dict(do_sample=True, temperature=2.0, top_k=0, top_p=0.5), (2.0, 0, 0.5),
              [(2.0, 0, 1.0), (1.0, 0, 0.5), (0.0, 0, 1.0)]),
    "top-k-1-is-greedy": (dict(do_sample=True, temperature=2.0, top_k=1, top_p=1.0), (0.0, 0, 1.0),
                          [(2.0, 0, 1.0)]),
    "no-sampling-is-greedy": (dict(do_sample=False, temperature=2.0, top_k=5, top_p=0.5), (0.0, 0, 1.0),
                              [(2.0, 5, 0.5)]),
}


@requires_qwen3_files
@pytest.mark.parametrize("name", list(GENERATION_CONFIGS))
def test_cli_generation_config_defaults(tok_dir, ref_tok, hf_tok, tmp_path, capsys, name):
    """Without sampling flags the CLI samples as generation_config.json says (do_sample, temperature,
    top_k, top_p): its ids are the Python API's with those settings and the same seed, and not those
    it would give with one of the fields ignored."""
    fields, expected, ignored = GENERATION_CONFIGS[name]
    d = shutil.copytree(tok_dir, tmp_path / "ckpt")
    edit_json(d / "generation_config.json", lambda g: g.update(fields))
    out, _ = _cli_json(["--model", d, "--device", "cpu", "--prompt", "Hello there", "--max-new-tokens", "12",
                        "--seed", "3"], capsys)
    eng, prompt_ids = load_engine(d), _template_ids(ref_tok, hf_tok, "Hello there")

    def api(T, k, p):
        return list(eng.generate(prompt_ids, max_new_tokens=12, temperature=T, top_k=k, top_p=p, seed=3))

    assert out["generated_ids"] == api(*expected)
    for other in ignored:
        assert api(*other) != out["generated_ids"], f"test data: {other} gives the ids of {expected}"


@requires_qwen3_files
def test_cli_chat_think_on_and_off(tok_dir, ref_tok, hf_tok, monkeypatch, capsys):
    """--no-think, then /think on, then /think off, each on a new conversation: each turn's prompt is
    the released template with thinking as set (its length, from /stats, tells them apart)."""
    script = "Hi\n/stats\n/think on\n/reset\nHi\n/stats\n/think off\n/reset\nHi\n/stats\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc, out, err = _main(["--model", tok_dir, "--device", "cpu", "--chat", "--no-think", "--max-new-tokens", "3",
                          "--temperature", "0"], capsys)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    lengths = [int(n) for n in re.findall(r"prompt (\d+) tokens", err)]
    off, on = (len(_template_ids(ref_tok, hf_tok, "Hi", think=think)) for think in (False, True))
    assert off != on and lengths == [off, on, off], err


# -----------------------------------------------------------------------------
# conversations: the multi-turn template, prefix reuse in the engine, Chat and --chat

ANSWERS = ["Because of Rayleigh scattering.", "<think>\nShort waves scatter more.\n</think>\n\nBlue light scatters.",
           "<think>\n\n</think>\n\nAn answer without thoughts.", "  an answer\nin two lines  "]


@requires_qwen3_files
@pytest.mark.parametrize("think", [True, False], ids=["think", "no-think"])
@pytest.mark.parametrize("system", [None, "You are terse."], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", [1, 2, 3, 4])
def test_multi_turn_template_matches_released(hf_tok, system, think, turns):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i in range(turns):  # user turns, and before each later one an assistant turn (some with <think>)
        messages.append({"role": "user", "content": PROMPTS[i]})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": ANSWERS[i]})
    kw = {} if think else {"enable_thinking": False}
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    assert nanofast.Tokenizer.template(messages, think=think) == expected


@requires_qwen3_files
def test_chat_api(tok_dir):
    """Three turns through Chat: each prompt is the templated conversation, of which the engine
    prefills only what its cache does not hold; a stopped answer stays in the history."""
    eng, tok = load_engine(tok_dir, max_seq_len=256), nanofast.Tokenizer(str(tok_dir))
    chat = nanofast.Chat(eng, tok, system="Be brief.", max_new_tokens=4, temperature=0.0)
    system = [{"role": "system", "content": "Be brief."}]
    for i, text in enumerate(["Hello", "Why is the sky blue?", "Thanks!"]):
        prompt = tok.encode(nanofast.Tokenizer.template(system + chat.messages + [{"role": "user", "content": text}]))
        held = eng.cache.reusable(prompt)
        assert (held > 0) == (i > 0)
        answer = "".join(chat.send(text))
        assert chat.messages[-2:] == [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        assert (eng.stats["prompt_tokens"], eng.stats["reused_tokens"]) == (len(prompt), held)
    tokens = chat.send("One more")  # stopped after the first piece: the answer so far is kept
    next(tokens)
    tokens.close()
    assert chat.messages[-2]["content"] == "One more" and chat.messages[-1]["role"] == "assistant"
    chat.reset()
    assert chat.messages == []


def test_load_progress_only_on_a_terminal(tied_case, monkeypatch, capsys):
    load_engine(tied_case["dir"])
    assert "loading layer" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_engine(tied_case["dir"])
    assert "loading layer 2 of 2" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# fp8 weights: checkpoints in the layout of Qwen's Qwen3-*-FP8 releases (config.json's
# quantization_config; each projection stored as float8_e4m3fn with weight_scale_inv, one
# scale per 128x128 block), and quantization on load. The reference is transformers on the
# same weights dequantized (w * scale_inv, in fp32), which nanofast's CPU path computes too.

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def fp8_quantize(w):  # the test's own block quantizer: (e4m3 values, scale_inv) with w ~ q * scale_inv
    (N, K), B = w.shape, 128
    x = torch.zeros(-(-N // B) * B, -(-K // B) * B)
    x[:N, :K] = w.float()
    blocks = x.view(x.shape[0] // B, B, x.shape[1] // B, B)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).view(x.shape)[:N, :K].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def fp8_dequantize(q, scale_inv):
    """The convention of Qwen's FP8 checkpoints, as their config.json gives it (quant_method fp8,
    weight_block_size [128, 128]), written out plainly: block (i, j) of the weight, rows 128i to
    128i + 127 and columns 128j to 128j + 127 (fewer at the bottom and right edges), times
    weight_scale_inv[i, j]. In fp32, where each product is exact."""
    B, out = 128, torch.empty(q.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = slice(B * i, B * i + B), slice(B * j, B * j + B)
            out[block] = q[block].float() * scale_inv[i, j].float()
    return out


def read_weights(d):
    w = {}
    for f in sorted(Path(d).glob("model*.safetensors")):
        w.update(load_file(str(f)))
    return w


def make_fp8_checkpoint(src, d, scale_dtype=torch.bfloat16, shards=1, quantize=fp8_quantize):
    """Copy checkpoint src to folder d in the FP8 layout, and to d-dequantized with the fp8
    weights dequantized in fp32 (for transformers). Returns (d, d-dequantized)."""
    ref = d.parent / (d.name + "-dequantized")
    shutil.copytree(src, d)
    shutil.copytree(src, ref)
    edit_json(d / "config.json", lambda c: c.update(quantization_config=dict(FP8_CONFIG)))
    fp8, deq = {}, {}
    for name, t in read_weights(src).items():
        fp8[name], deq[name] = t, t.float()
        if name.endswith("_proj.weight"):
            q, s = quantize(t)
            fp8[name], fp8[name[:-6] + "weight_scale_inv"] = q, s.to(scale_dtype)
            deq[name] = fp8_dequantize(q, s.to(scale_dtype))
    save_weights(d, fp8, shards)
    save_weights(ref, deq)
    return d, ref


# the model-math configurations, each with another scale dtype and layout
FP8_CASES = {"tied-gqa2-bf16": (torch.bfloat16, 1), "tiedstored-gqa1-fp32-ropeparams": (torch.float32, 1),
             "untied-gqa4-3shards": (torch.float16, 3)}


@pytest.fixture(scope="session", params=list(FP8_CASES))
def fp8_case(request, tmp_path_factory, tokenizer_json):
    spec, (scale_dtype, shards) = CONFIGS[request.param], FP8_CASES[request.param]
    src = make_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_json=tokenizer_json, **spec["ckpt"])
    d, ref = make_fp8_checkpoint(src, tmp_path_factory.mktemp("fp8") / request.param, scale_dtype, shards)
    model = hf_model(ref)
    prompt = random_prompt(PROMPT_LEN, seed=spec["prompt_seed"])
    greedy = hf_greedy(model, prompt, 40)
    return dict(src=src, dir=d, prompt=prompt, greedy=greedy, logits=hf_logits(model, prompt + greedy))


def test_fp8_checkpoint_matches_transformers(fp8_case):
    _check_reference(fp8_case["greedy"], fp8_case["logits"])
    eng = load_engine(fp8_case["dir"])
    assert eng.cfg.fp8 and eng.weight_format == "fp8"
    assert eng.weights.layers[0].qkv.weight.dtype == torch.float32 and not eng.weights.layers[0].qkv.fp8  # CPU
    P, prompt = PROMPT_LEN, fp8_case["prompt"]
    assert_logits_close(eng.forward(prompt + fp8_case["greedy"], 0), fp8_case["logits"], "fp8 forward")
    assert list(eng.generate(prompt, max_new_tokens=40, temperature=0.0)) == fp8_case["greedy"]
    assert eng.stats["weights"] == "fp8"
    assert P == len(prompt)


def _random_fp8(w):  # e4m3 values and a scale per block with nothing in common with w but its shape
    (N, K), g = w.shape, torch.Generator().manual_seed(w.numel())
    q = (torch.randn(N, K, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, 1e-4 + 1e-3 * torch.rand(-(-N // 128), -(-K // 128), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_weights_are_blocks_times_scale_inv(tmp_path, dtype):
    """The matrices nanofast computes with on the CPU are fp8_dequantize's (the released convention,
    written out independently of nanofast), exactly (rounded once to bf16). The shapes span several
    blocks, square and not, with partial edge blocks: q_proj and o_proj 256 x 256 (2 x 2 blocks),
    k/v 128 x 256 (1 x 2), gate/up 320 x 256 (3 x 2), down 256 x 320 (2 x 3); every block has its
    own random scale, so a transposed or shifted scale grid, or a division, shows."""
    src = make_checkpoint(tmp_path / "src", hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64, intermediate=320)
    d, ref = make_fp8_checkpoint(src, tmp_path / "fp8", torch.bfloat16, quantize=_random_fp8)
    want, layer = read_weights(ref), load_engine(d, dtype=dtype).weights.layers[0]
    p = "model.layers.0."
    for field, names in {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                         "o": ["self_attn.o_proj"], "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
                         "down": ["mlp.down_proj"]}.items():
        expected = torch.cat([want[p + n + ".weight"] for n in names]).to(dtype)
        assert torch.equal(getattr(layer, field).weight, expected), field


def test_quantize_on_load_round_trip(fp8_case, tmp_path):
    """quantize="fp8" on a bf16 checkpoint computes with exactly the weights of the FP8
    checkpoint that nanofast.quantize_fp8 writes, and the quantizer agrees with ours."""
    w = read_weights(fp8_case["src"])["model.layers.0.mlp.gate_proj.weight"]
    p = nanofast.quantize_fp8(w)
    (q, s), (q_ref, s_ref) = (p.weight, p.scale), fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == s_ref.shape
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    rel = float((nanofast.dequantize(p, torch.float32) - w.float()).norm() / w.float().norm())
    assert 0 < rel < 0.05, rel  # e4m3 keeps 3 mantissa bits
    d, _ = make_fp8_checkpoint(fp8_case["src"], tmp_path / "fp8", torch.float32,
                               quantize=lambda t: (nanofast.quantize_fp8(t).weight, nanofast.quantize_fp8(t).scale))
    prompt = fp8_case["prompt"]
    quantized = load_engine(fp8_case["src"], quantize="fp8")
    assert quantized.weight_format == "fp8"
    assert torch.equal(quantized.forward(prompt, 0), load_engine(d).forward(prompt, 0))
    assert not torch.equal(quantized.forward(prompt, 0), load_engine(fp8_case["src"]).forward(prompt, 0))


@pytest.mark.parametrize("edit,needles", [
    (lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(quant_method="awq")), ["awq"]),
    (lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(fmt="e5m2")), ["e5m2"]),
    (lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(weight_block_size=[64, 64])),
     ["64"]),
    (lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(activation_scheme="static")),
     ["static"]),
    (lambda d: edit_json(d / "config.json", lambda c: c.update(quantization_config="fp8")), ["quantization_config"]),
    (lambda d: save_weights(d, {k: v for k, v in read_weights(d).items()
                                if k != "model.layers.0.mlp.up_proj.weight_scale_inv"}),
     ["model.layers.0.mlp.up_proj.weight_scale_inv"]),
    (lambda d: save_weights(d, {**read_weights(d), "model.layers.0.self_attn.o_proj.weight_scale_inv":
                                torch.ones(3, 3)}), ["model.layers.0.self_attn.o_proj.weight_scale_inv"]),
    (lambda d: save_weights(d, {**read_weights(d), "model.layers.0.self_attn.k_proj.weight":
                                torch.zeros(16, 32, dtype=torch.bfloat16)}), ["model.layers.0.self_attn.k_proj.weight"]),
    (lambda d: edit_json(d / "config.json", lambda c: c.pop("quantization_config")),
     ["weight_scale_inv"]),  # fp8 tensors under a bf16 config
], ids=["quant-method", "fmt", "block-size", "static-activations", "not-a-dict", "missing-scale", "misshaped-scale",
        "bf16-weight", "no-quantization-config"])
def test_load_rejects_bad_fp8(tmp_path, small_ckpt, edit, needles):
    d, _ = make_fp8_checkpoint(small_ckpt, tmp_path / "fp8")
    edit(d)
    with raises_one_line(*needles):
        load_engine(d)


def test_quantize_option_rejects_other_formats(small_ckpt):
    with raises_one_line("int4"):
        load_engine(small_ckpt, quantize="int4")


# -----------------------------------------------------------------------------
# memory (issue 27): a run that cannot fit is refused before anything large is allocated, and
# an allocation that fails anyway becomes the same kind of one-line error


MEMORY_LINE = re.compile(r"needs (\d+\.\d\d) GiB \(weights (\d+\.\d\d) \+ KV cache (\d+\.\d\d) \+ activations "
                         r"(\d+\.\d\d)\) and (\d+\.\d\d) GiB is free")


def no_large_allocations(monkeypatch):
    """-> the list of calls to the functions that allocate the weights, the KV cache and the RoPE tables,
    each of which raises: a memory check made after them fails the test."""
    calls = []

    def refuse(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called before the memory check")
        return called
    for name in ("load_weights", "KVCache", "rope_tables"):
        monkeypatch.setattr(nanofast, name, refuse(name))
    return calls


def check_memory_figures(message, cfg, dtype=torch.float32):
    """The figures of a "not enough memory" line: they add up, the KV cache's is BEYOND_MEMORY tokens'
    and exceeds what is free, and the --max-seq-len suggested fits where the one asked for did not."""
    figures = MEMORY_LINE.search(message).groups()
    assert figures[2] == f"{nanofast.memory_needed(cfg, dtype, BEYOND_MEMORY, False)[1] / 2 ** 30:.2f}"
    need, weights, cache, acts, free = (float(x) for x in figures)
    assert abs(weights + cache + acts - need) <= 0.02 and need > free > 0
    fit = int(re.search(r"--max-seq-len of at most (\d+)", message).group(1))
    assert 0 < fit < BEYOND_MEMORY and fit * cache / BEYOND_MEMORY < free


def test_beyond_memory_refused_before_loading(small_ckpt, monkeypatch):
    calls = no_large_allocations(monkeypatch)
    with raises_one_line(*MEMORY_NEEDLES) as got:
        load_engine(small_ckpt, max_seq_len=BEYOND_MEMORY)
    assert calls == []
    check_memory_figures(got[0], nanofast.load_config(str(small_ckpt)))


@pytest.mark.parametrize("mode", [HI, ("--chat",)], ids=["one-shot", "chat"])
def test_cli_beyond_memory_refused_before_loading(tok_dir, monkeypatch, capsys, mode):
    calls = no_large_allocations(monkeypatch)
    rc, out, err = _main(["--model", tok_dir, *mode, *OK, "--max-seq-len", BEYOND_MEMORY], capsys)
    _assert_cli_error(rc, out, err, MEMORY_NEEDLES)
    assert calls == []
    check_memory_figures(err, nanofast.load_config(str(tok_dir)))


def test_suggested_max_seq_len_fits(small_ckpt, monkeypatch):
    """With free memory set so that 90% of it (what the suggestion may use) holds a 10,000-token
    run, the line suggests 10,000 tokens, and the suggestion loads."""
    cfg = nanofast.load_config(str(small_ckpt))
    need = sum(nanofast.memory_needed(cfg, torch.float32, 10_000, False))
    monkeypatch.setattr(nanofast, "free_memory", lambda device: need * 10 // 9 + 10)
    with raises_one_line("not enough memory", "--max-seq-len of at most") as got:
        load_engine(small_ckpt, max_seq_len=1_000_000)
    fit = int(re.search(r"at most (\d+)", got[0]).group(1))
    assert 10_000 - 16 <= fit <= 10_000, fit
    assert load_engine(small_ckpt, max_seq_len=fit).max_seq_len == fit


def weights_nbytes(w):  # every distinct tensor of a nanofast.Weights (a tied lm_head is the embedding)
    fields = [w.embed, w.norm, w.lm_head, *(t for layer in w.layers for t in vars(layer).values())]
    tensors = [t for f in fields for t in ((f.weight, f.scale) if isinstance(f, nanofast.Proj) else (f,))
               if t is not None]
    return sum(t.nbytes for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("load", ["dense", "quantize-kept-fp8", "fp8-checkpoint-kept", "fp8-checkpoint-dequantized"])
@pytest.mark.parametrize("ckpt", ["tied", "untied"])
def test_memory_estimate_is_what_loads(small_ckpt, sharded_small, tmp_path, ckpt, load, dtype):
    """memory_needed's weights are exactly the bytes load_weights leaves (fp8 kept: 1 byte a value plus fp32
    scales, as on CUDA), and its KV cache is exactly the KVCache's plus the RoPE tables."""
    d = small_ckpt if ckpt == "tied" else sharded_small
    if load.startswith("fp8-checkpoint"):
        d, _ = make_fp8_checkpoint(d, tmp_path / "fp8")
    cfg, keep_fp8 = nanofast.load_config(str(d)), load.endswith("kept")
    w = nanofast.load_weights(str(d), cfg, dtype, "cpu", quantize=load.startswith("quantize"), keep_fp8=keep_fp8)
    assert (w.layers[0].qkv.weight.dtype == torch.float8_e4m3fn) == w.layers[0].qkv.fp8 == keep_fp8
    weights, cache, _ = nanofast.memory_needed(cfg, dtype, 256, keep_fp8)
    assert weights == weights_nbytes(w)
    kv, rope = nanofast.KVCache(cfg, 256, dtype, "cpu"), nanofast.rope_tables(cfg, 256, "cpu")
    assert cache == kv.data.nbytes + rope[0].nbytes + rope[1].nbytes


class FailingHandle:
    """A safetensors handle whose tensors cannot be read, as when the allocator gives up."""

    def __init__(self, handle, error):
        self.handle, self.error = handle, error

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def get_tensor(self, name):
        raise self.error


CPU_ALLOCATOR_ERROR = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 1024000000000 bytes. Error code 12")
ALLOCATION_ERRORS = {"cpu-allocator": CPU_ALLOCATOR_ERROR, "memory-error": MemoryError(),
                     "windows-allocator": RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                                                       "1024000000000 bytes."),
                     "os-enomem": OSError(12, "Cannot allocate memory"),
                     "cuda-oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee docs")}


def fail_allocation(monkeypatch, where, error):
    """Make the allocation at where (weights, cache or generate) raise error."""
    if where == "weights":
        import safetensors
        real = safetensors.safe_open
        monkeypatch.setattr(safetensors, "safe_open", lambda *a, **kw: FailingHandle(real(*a, **kw), error))
    else:
        def fail(*args, **kwargs):
            raise error
        monkeypatch.setattr(nanofast, {"cache": "KVCache", "generate": "forward"}[where], fail)


@pytest.mark.parametrize("error", list(ALLOCATION_ERRORS))
@pytest.mark.parametrize("where,stage", [("weights", "loading the weights"), ("cache", "allocating the KV cache")])
def test_out_of_memory_while_loading(small_ckpt, monkeypatch, where, stage, error):
    fail_allocation(monkeypatch, where, ALLOCATION_ERRORS[error])
    with raises_one_line(f"out of memory on cpu {stage}", "GiB is free", "a smaller model") as got:
        load_engine(small_ckpt)
    assert MEMORY_LINE.search(got[0])


def test_other_errors_while_loading_are_not_memory(small_ckpt, monkeypatch):
    fail_allocation(monkeypatch, "cache", RuntimeError("some bug"))
    with pytest.raises(RuntimeError, match="some bug"):
        load_engine(small_ckpt)


@pytest.mark.parametrize("where,needle", [("weights", "loading the weights"), ("cache", "allocating the KV cache"),
                                          ("generate", "out of memory while generating")])
def test_cli_out_of_memory(tok_dir, monkeypatch, capsys, where, needle):
    fail_allocation(monkeypatch, where, CPU_ALLOCATOR_ERROR)
    rc, out, err = _main(["--model", tok_dir, *HI, *OK], capsys)
    if where == "generate":  # the model loaded and said so first
        loaded, err = err.split("\n", 1)
        assert loaded.startswith("[nanofast] loaded")
    _assert_cli_error(rc, out, err, ("out of memory", needle))


# -----------------------------------------------------------------------------
# speculative decoding on the plain path: drafts from prompt lookup or a draft model, verified
# k + 1 rows per forward. Greedy runs must be the model's own greedy tokens, sampled runs must
# follow its distribution, and stops and the cache must be as without speculation.

def test_lookup_drafts():
    ctx = [5, 6, 7, 8, 9, 6, 7, 1, 2, 3, 6, 7]
    assert nanofast.lookup_drafts(ctx, 3) == [1, 2, 3]  # "6 7" last occurred before "1 2 3" (latest match wins)
    assert nanofast.lookup_drafts(ctx, 1) == [1]
    assert nanofast.lookup_drafts([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3]  # stops at the end of the context
    assert nanofast.lookup_drafts([4, 1, 2, 3, 4, 7, 1, 2, 3], 2) == [4, 7]  # the longest n-gram: "1 2 3"
    assert nanofast.lookup_drafts([1, 2, 3, 4], 4) == []  # no earlier occurrence
    assert nanofast.lookup_drafts([1, 1], 3) == [1]


@pytest.fixture(scope="session")
def draft_ckpt(tmp_path_factory):
    """Another random model with the test configurations' vocabulary: it drafts, mostly wrongly."""
    return make_checkpoint(tmp_path_factory.mktemp("draft"), hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                           intermediate=64, seed=11)


def _drafts(case, source, **kw):  # "lookup", "self" (the model drafts for itself: all accepted) or "other"
    if source == "lookup":
        return "lookup"
    return load_engine(case["dir"] if source == "self" else case["draft_dir"], **kw)


@pytest.mark.parametrize("k", [1, 4, 15])
@pytest.mark.parametrize("source", ["lookup", "self", "other"])
def test_speculative_greedy_is_the_models_greedy(case, draft_ckpt, source, k):
    """With any draft source and k, greedy ids are transformers' greedy ids, and the stats add up."""
    eng, P = load_engine(case["dir"]), len(case["prompt"])
    want = case["greedy"][:40]
    got = list(eng.generate(case["prompt"], max_new_tokens=40, draft=_drafts(dict(case, draft_dir=draft_ckpt),
                                                                          source), spec_k=k))
    assert got == want
    sp = eng.stats["speculation"]
    assert sp["k"] == k and sp["draft"] == ("lookup" if source == "lookup" else "model")
    assert 0 <= sp["accepted"] <= sp["drafted"] <= k * sp["rounds"]
    assert sp["accepted"] + sp["rounds"] == 40 - 1  # every token after the first comes from a round
    if source == "self":
        assert sp["accepted"] == sp["drafted"] > 0 and sp["rounds"] < 40 // (k + 1) + 2
    assert eng.cache.tokens == case["prompt"] + got[:-1]
    assert_logits_close(eng.prefill(case["prompt"] + got), case["logits"][P + 39], "the cache after speculation")


@pytest.mark.parametrize("source", ["lookup", "self", "other"])
def test_speculative_seeded_runs_are_the_plain_runs(case, draft_ckpt, source):
    """Each position's token is drawn as without speculation, so a seeded sampled run gives the same
    tokens with drafts as without (the plain path, fp32), whatever was accepted."""
    settings = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    plain = list(load_engine(case["dir"]).generate(case["prompt"], **settings))
    eng = load_engine(case["dir"])
    got = list(eng.generate(case["prompt"], draft=_drafts(dict(case, draft_dir=draft_ckpt), source), spec_k=4,
                            **settings))
    assert got == plain
    assert source != "self" or eng.stats["speculation"]["accepted"] > 0


@pytest.mark.parametrize("source", ["lookup", "self", "other"])
def test_speculative_stops_are_exact(tied_case, draft_ckpt, source):
    """A stop id inside an accepted block ends the output there; max_new_tokens and a full cache stop at
    the same token as without speculation; a caller's early stop leaves the cache as the plain path does."""
    prompt, greedy = tied_case["prompt"], tied_case["greedy"]
    stop = greedy[7]
    want = greedy[:greedy.index(stop) + 1]
    for kw, expected, reason in [(dict(stop_ids=[stop]), want, "eos"), (dict(max_new_tokens=13), greedy[:13],
                                 "max_new_tokens"), (dict(max_new_tokens=40, max_seq_len=len(prompt) + 17),
                                                     greedy[:17], "cache_full")]:
        eng = load_engine(tied_case["dir"], max_seq_len=kw.pop("max_seq_len", 128))
        draft = _drafts(dict(tied_case, draft_dir=draft_ckpt), source, max_seq_len=eng.max_seq_len)
        got = list(eng.generate(prompt, **{"max_new_tokens": 40, **kw}, draft=draft, spec_k=6))
        assert (got, eng.stop_reason) == (expected, reason), kw
        assert eng.cache.tokens == prompt + got[:-1], kw
    tokens = eng.generate(prompt, max_new_tokens=40, draft=draft, spec_k=6)
    taken = [next(tokens) for _ in range(9)]
    tokens.close()
    assert taken == greedy[:9] and eng.cache.tokens == prompt + taken[:-1] and eng.stop_reason == "interrupted"


def test_speculative_prefix_reuse(tied_case, draft_ckpt):
    """A second generation reuses the cache after a speculative one, and both engines' caches catch up."""
    eng, draft = load_engine(tied_case["dir"]), load_engine(draft_ckpt)
    prompt, greedy = tied_case["prompt"], tied_case["greedy"]
    first = list(eng.generate(prompt, max_new_tokens=10, draft=draft))
    longer = prompt + first + greedy[10:12]
    again = list(eng.generate(longer, max_new_tokens=8, draft=draft))
    assert eng.stats["reused_tokens"] == len(prompt) + 9
    assert again == list(load_engine(tied_case["dir"]).generate(longer, max_new_tokens=8))


def _chi2_critical(df, z=3.0902):  # the 0.999 quantile of chi-squared (Wilson-Hilferty)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_marginals(eng, prompt, n, probs):
    """The distributions of the first n generated tokens, by enumerating every sequence (tiny vocab)."""
    marg, frontier = [], {(): 1.0}
    for _ in range(n):
        nxt, dist = {}, torch.zeros(eng.cfg.vocab_size, dtype=torch.float64)
        for seq, w in frontier.items():
            p = probs(eng.forward(prompt + list(seq), 0)[-1]).double()
            dist += w * p
            nxt.update({seq + (t,): w * float(p[t]) for t in range(len(p)) if p[t] > 0})
        marg.append(dist)
        frontier = nxt
    return marg


@pytest.mark.parametrize("settings", [dict(temperature=2.0), dict(temperature=3.0, top_k=6, top_p=0.9)],
                         ids=["temperature", "top-k-top-p"])
def test_speculative_sampling_follows_the_model(tmp_path, settings):
    """At temperature > 0 each of the first four tokens, drawn with speculation (lookup drafts over a
    prompt that repeats the model's greedy text, and a draft model that disagrees often), follows the
    model's exact marginal distribution, computed by enumeration over a 12-token vocabulary: chi-squared
    at the 0.1% level. Untied, so that the tiny model's distributions are spread."""
    V, tiny = 12, dict(hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, tied=False)
    eng = load_engine(make_checkpoint(tmp_path / "m", vocab=V, **tiny), max_seq_len=20)
    other = load_engine(make_checkpoint(tmp_path / "d", vocab=V, seed=5, **tiny), max_seq_len=20)
    prompt = [1, 2] + list(eng.generate([1, 2], max_new_tokens=4)) + [1, 2]
    probs = lambda logits: nanofast.sampling_probs(logits, settings["temperature"], settings.get("top_k", 0),  # noqa: E731
                                                    settings.get("top_p", 1.0))
    exact = _exact_marginals(eng, prompt, 4, probs)
    for draft in ("lookup", other):
        N, counts, accepted, rejected = 1500, torch.zeros(4, V), 0, 0
        for seed in range(N):
            out = list(eng.generate(prompt, max_new_tokens=4, seed=seed, draft=draft, spec_k=3, **settings))
            sp = eng.stats["speculation"]
            accepted, rejected = accepted + sp["accepted"], rejected + sp["drafted"] - sp["accepted"]
            for i, t in enumerate(out):
                counts[i, t] += 1
        assert min(accepted, rejected) > N // 10  # both ways taken often enough to be tested
        for i in range(4):
            expected = N * exact[i]
            keep = expected >= 5  # cells too small for the test are pooled into one
            assert keep.sum() >= 3, exact[i]  # a spread distribution, or the test proves nothing
            obs = torch.cat([counts[i][keep].double(), counts[i][~keep].sum().reshape(1).double()])
            exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
            obs, exp = obs[exp > 0], exp[exp > 0]
            chi2 = float(((obs - exp) ** 2 / exp).sum())
            assert chi2 < _chi2_critical(len(exp) - 1), (i, chi2, obs.tolist(), exp.tolist())


def test_speculative_bad_settings(tied_case, draft_ckpt, tmp_path):
    eng = load_engine(tied_case["dir"])
    wide = make_checkpoint(tmp_path / "wide", vocab=151937, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                           intermediate=64)
    for kw, needle in [(dict(draft="lookup", spec_k=0), "--spec-k"), (dict(draft="lookup", spec_k=16), "--spec-k"),
                       (dict(draft="ngram"), "lookup"), (dict(draft=load_engine(wide)), "151937"),
                       (dict(draft=load_engine(draft_ckpt, max_seq_len=64)), "max_seq_len")]:
        with pytest.raises(nanofast.NanofastError, match=needle):
            list(eng.generate(tied_case["prompt"], max_new_tokens=4, **kw))


def test_cli_speculative(tok_dir, draft_ckpt, tmp_path, capsys):
    """--lookup and --draft give the plain run's ids and report the rounds; bad input gets one line."""
    m = ["--model", tok_dir, "--device", "cpu", "--dtype", "float32", "--prompt", "Hello there, hello there",
         "--max-new-tokens", "12", "--temperature", "0", "--json"]
    rc, out, _ = _main(m, capsys)
    assert rc == 0
    plain = json.loads(out)["generated_ids"]
    for flags in (["--lookup"], ["--draft", draft_ckpt, "--spec-k", "3"]):
        rc, out, err = _main(m + flags, capsys)
        assert rc == 0, err
        got = json.loads(out)
        assert got["generated_ids"] == plain
        assert got["timings"]["speculation"]["rounds"] > 0 and "[nanofast] speculation" in err
    broken = tmp_path / "broken-draft"
    shutil.copytree(draft_ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    for flags, needles in [(["--draft", tmp_path / "nothing"], ("draft model", "not found")),
                           (["--draft", broken], ("draft model", "safetensors")),
                           (["--draft", draft_ckpt, "--lookup"], ("--draft or --lookup",)),
                           (["--lookup", "--spec-k", "0"], ("--spec-k",)),
                           (["--lookup", "--spec-k", "16"], ("--spec-k",))]:
        rc, out, err = _main(m + flags, capsys)
        _assert_cli_error(rc, out, err, needles)


# -----------------------------------------------------------------------------
# --- GPU kernels, checked against plain torch (Triton's interpreter on the CPU, compiled on CUDA)
#
# Each Triton kernel of the decode step is run against the plain-torch code it replaces
# (nanofast.rms_norm, apply_rope, plain_attention, F.silu, matmuls; nanofast.sample's
# semantics for the sampler). On a machine without CUDA the kernels run under Triton's
# CPU interpreter (TRITON_INTERPRET=1, set at the top of this file), on CUDA compiled.
# The interpreter runs a grid's programs one after another at ~10-20 ms per program
# whatever its size, so shapes are tiny and grids small.
#
# Every output is filled with NaN before a launch, so an element the kernel forgets to
# write fails the test. References are computed in fp32 from the same (possibly bf16)
# inputs, so the only differences are the order of summation and the final rounding:
#     fp32 outputs: max |kernel - reference| <= 1e-4 * max |reference|  (seen: <= 5e-7)
#     bf16 outputs: max |kernel - reference| <= 2e-2 * max |reference|  (seen: <= 7e-3)
# One bf16 rounding is at most 2^-9 relative on the GPU (round to nearest) and 2^-8 in the
# interpreter, which truncates fp32 -> bf16.
# Attention rounds its probabilities to the cache dtype before the second product, so
# bf16 caches get the bf16 tolerance.

KDEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KDT = torch.bfloat16 if KDEV.type == "cuda" else torch.float32  # default weight/activation dtype
KHD = 128 if KDEV.type == "cuda" else 16  # head_dim: Qwen3's on CUDA, small in the interpreter
KTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
NAN = float("nan")
# checkpoints with a small vocabulary, so that lm_head and the sampler stay cheap in the interpreter
SMALL_VOCAB = dict(vocab=512, intermediate=96)


def poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, NAN, dtype=dtype, device=KDEV)


def krandn(*shape, std=1.0, dtype=None):  # seeded on the CPU, so both modes see the same data
    return (torch.randn(*shape) * std).to(dtype or KDT).to(KDEV)


def i32(value):
    return torch.tensor([value], dtype=torch.int32, device=KDEV)


def assert_kernel_close(got, ref, dtype, what="", rtol=None):
    """got: a kernel's output; ref: fp32 plain torch from the same inputs; dtype: the
    output's precision (see the section comment for the tolerances), or rtol given.
    Returns the max abs difference."""
    got, ref = got.float().reshape(-1).cpu(), ref.float().reshape(-1).cpu()
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} unwritten/non-finite elements"
    rtol = rtol or KTOL[dtype]
    scale = float(ref.abs().max()) + 1e-6
    diff = float((got - ref).abs().max())
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol} * {scale:.3g}"
    return diff


@pytest.fixture
def kseed():
    torch.manual_seed(0)


def test_triton_is_installed():
    if not HAVE_TRITON:
        if not TRITON_EXPECTED:
            pytest.skip("Triton is not installed (not expected on this platform, or opted out)")
        pytest.fail(f"Triton is expected on Linux x86_64 (requirements-test.txt) but does not import "
                    f"({TRITON_IMPORT_ERROR}); the kernel tests would all skip. Set "
                    f"NANOFAST_TESTS_WITHOUT_TRITON=1 to run without it")


@requires_triton
def test_kernel_embed(kseed):
    V, D = 50, 40  # D below the kernel's block: masked tail
    E = krandn(V, D)
    for t in (0, 7, V - 1):
        h = poisoned(D)
        nanofast.embed(i32(t), E, h)
        assert torch.equal(h, E[t].float()), t  # a copy: exact


@requires_triton
@pytest.mark.parametrize("N,K,BN,BK,wdt,odt", [
    (64, 64, None, None, KDT, torch.float32),           # the default launch config, fp32 out (logits)
    (37, 200, 8, 64, torch.bfloat16, torch.bfloat16),   # ragged N and K, bf16 out (qkv)
    (48, 100, 16, 128, KDT, torch.float32),             # BLOCK_K > K: one masked tile
], ids=["default", "ragged-bf16", "wide-block"])
def test_kernel_rmsnorm_gemv(kseed, N, K, BN, BK, wdt, odt):
    x = krandn(K, std=3.0, dtype=torch.float32)  # the fp32 residual stream
    norm_w = (1 + 0.1 * torch.randn(K)).to(wdt).to(KDEV)
    W = krandn(N, K, std=K ** -0.5, dtype=wdt)
    out = poisoned(N, dtype=odt)
    nanofast.rmsnorm_gemv(x, norm_w, nanofast.Proj(W), out, 1e-6, BLOCK_N=BN, BLOCK_K=BK)
    ref = nanofast.rms_norm(x, norm_w.float(), 1e-6) @ W.float().T
    assert_kernel_close(out, ref, odt)


@requires_triton
@pytest.mark.parametrize("I,K,BN,BK,wdt", [
    (32, 64, None, None, KDT),          # default launch config
    (50, 200, 16, 64, torch.bfloat16),  # ragged I and K
], ids=["default", "ragged-bf16"])
def test_kernel_rmsnorm_gemv_silu(kseed, I, K, BN, BK, wdt):
    x = krandn(K, std=3.0, dtype=torch.float32)
    norm_w = (1 + 0.1 * torch.randn(K)).to(wdt).to(KDEV)
    W_gu = krandn(2 * I, K, std=2 * K ** -0.5, dtype=wdt)  # gate rows, then up rows
    out = poisoned(I, dtype=wdt)
    nanofast.rmsnorm_gemv(x, norm_w, nanofast.Proj(W_gu), out, 1e-6, silu=True, BLOCK_N=BN, BLOCK_K=BK)
    gate, up = (nanofast.rms_norm(x, norm_w.float(), 1e-6) @ W_gu.float().T).chunk(2, dim=-1)
    assert_kernel_close(out, F.silu(gate) * up, wdt)


@requires_triton
@pytest.mark.parametrize("SK", [1, 3], ids=["no-split", "split-k"])
def test_kernel_gemv_add(kseed, SK):
    # K = 300 is ragged for BLOCK_K 64; SPLIT_K 3 -> 3 ranges of 128 columns, summed by the last program
    N, K = 40, 300
    a = krandn(K)
    W = krandn(N, K, std=K ** -0.5)
    h = krandn(N, dtype=torch.float32)  # the output too: every element is compared
    ref, scratch = h.clone(), nanofast.add_scratch(N, KDEV)
    scratch[0].fill_(NAN)  # every partial summed must have been written
    for _ in range(2):  # accumulates
        nanofast.gemv_add(a, nanofast.Proj(W), h, scratch, BLOCK_N=16, BLOCK_K=64, SPLIT_K=SK)
        ref = ref + W.float() @ a.float()
        assert_kernel_close(h, ref, torch.float32)
        assert not scratch[1].any(), "arrival counters not reset"


FP8_TILE_CASES = [(n, K) for N, K in sorted(nanofast.FP8_TILES) for n in (N, N // 2)]


@requires_triton
@pytest.mark.parametrize("N,K,BN,BK,SK", [(256, 384, None, None, None), (200, 300, 4, 128, 2), (256, 384, 8, 128, 2)]
                         + [pytest.param(N, K, None, None, None, marks=requires_cuda) for N, K in FP8_TILE_CASES],
                         ids=["default", "ragged", "short-split"] + [f"{N}x{K}" for N, K in FP8_TILE_CASES])
def test_kernel_gemvs_fp8(kseed, N, K, BN, BK, SK):
    """The three GEMVs on fp8 weights with their 128x128 block scales, against plain torch on the
    dequantized matrices (K = 300: a partial last block and tile; N = 200: a partial row block;
    K = 384 in 2 splits: 256 columns, then 128), and prefill's one-pass dequantization. On a GPU,
    also at the full Qwen3 shapes of FP8_TILES, whose tiles and loop unrolling differ from the rule's
    (N rows for rmsnorm_gemv's entry, N / 2 for rmsnorm_gemv_silu's: its matrix has 2N rows)."""
    x = krandn(K, std=3.0, dtype=torch.float32)
    norm_w = (1 + 0.1 * torch.randn(K)).to(KDT).to(KDEV)
    W, W_gu = [nanofast.quantize_fp8(torch.randn(n, K) * K ** -0.5) for n in (N, 2 * N)]
    dense = [nanofast.dequantize(p, torch.float32) for p in (W, W_gu)]
    assert all(torch.equal(x, fp8_dequantize(p.weight, p.scale)) for x, p in zip(dense, (W, W_gu)))
    W, W_gu = [nanofast.Proj(p.weight.to(KDEV), p.scale.to(KDEV)) for p in (W, W_gu)]
    assert torch.equal(nanofast.dequantize(W, torch.float32).cpu(), dense[0])  # on CUDA: the one-pass kernel
    xn = nanofast.rms_norm(x, norm_w.float(), 1e-6).cpu()
    out = poisoned(N)
    nanofast.rmsnorm_gemv(x, norm_w, W, out, 1e-6, BLOCK_N=BN, BLOCK_K=BK)
    assert_kernel_close(out, xn @ dense[0].T, torch.float32, "rmsnorm_gemv")
    act = poisoned(N, dtype=KDT)
    nanofast.rmsnorm_gemv(x, norm_w, W_gu, act, 1e-6, silu=True, BLOCK_N=BN, BLOCK_K=BK)
    gate, up = (xn @ dense[1].T).chunk(2)
    assert_kernel_close(act, F.silu(gate) * up, KDT, "rmsnorm_gemv silu")
    a, h = krandn(K), krandn(N, dtype=torch.float32)
    ref = h.cpu() + dense[0] @ a.float().cpu()
    nanofast.gemv_add(a, W, h, nanofast.add_scratch(N, KDEV), BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SK)
    assert_kernel_close(h, ref, torch.float32, "gemv_add")


def _tiny_config(Hq, Hkv, hd, vocab=64):
    return nanofast.Config(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=Hq,
                           num_kv_heads=Hkv, head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6,
                           tie_word_embeddings=True)


@requires_triton
@pytest.mark.parametrize("G,nsplit,single_max,dtype,BLOCK_S", [
    (2, 3, 16, KDT, 16),  # one program up to L = 16, then 2 and 3 active splits (some left empty)
    (1, 1, 128, KDT, 16),  # the default: one program per kv head writes the output itself
    (4, 5, 0, torch.bfloat16, 16),  # always split
    (1, 2, 0, KDT, 64),  # the default tile: pos 63/64 cross it
], ids=["gqa2-3splits", "gqa1-single", "gqa4-5splits-bf16", "gqa1-2splits-tile64"])
def test_kernel_decode_attention(kseed, G, nsplit, single_max, dtype, BLOCK_S):
    """q/k norm + RoPE + KV append + attention in one launch, token after token, against
    forward()'s plain code: the new row must be written and used, later rows untouched."""
    Hkv, hd, eps, S = 2, KHD, 1e-6, 72
    Hq = G * Hkv
    cfg = _tiny_config(Hq, Hkv, hd)
    cos, sin = nanofast.rope_tables(cfg, S, KDEV)
    q_norm, k_norm = [(1 + 0.1 * torch.randn(hd)).to(dtype).to(KDEV) for _ in range(2)]
    cache = nanofast.KVCache(cfg, max_seq_len=S, dtype=dtype, device=KDEV)
    cache.data.fill_(NAN)  # a row read before it is written fails
    k_cache, v_cache = cache.k[0], cache.v[0]
    k_ref, v_ref = torch.zeros(S, Hkv, hd), torch.zeros(S, Hkv, hd)
    scratch = nanofast.make_attention_scratch(Hq, Hkv, hd, nsplit, KDEV)
    for p in [*range(0, 40), 47, 48, 63, 64, 65]:
        if p > 0 and torch.isnan(k_cache[p - 1]).any():  # skipped positions: fill in reference rows
            k_cache[:p].copy_(k_ref[:p].to(dtype))
            v_cache[:p].copy_(v_ref[:p].to(dtype))
        qkv = krandn((Hq + 2 * Hkv) * hd, std=2.0, dtype=dtype)
        out = poisoned(Hq * hd, dtype=dtype)
        for t in scratch[:3]:
            t.fill_(NAN)  # every partial the merge reads must have been written
        nanofast.decode_attention(qkv, q_norm, k_norm, cos, sin, i32(p), k_cache, v_cache, out, scratch,
                                  hd ** -0.5, eps, BLOCK_S=BLOCK_S, single_max=single_max)
        q, k, v = qkv.float().cpu().split([Hq * hd, Hkv * hd, Hkv * hd])
        c, s_ = cos[p:p + 1].cpu(), sin[p:p + 1].cpu()
        q = nanofast.apply_rope(nanofast.rms_norm(q.view(1, Hq, hd), q_norm.float().cpu(), eps), c, s_)
        k_ref[p] = nanofast.apply_rope(nanofast.rms_norm(k.view(1, Hkv, hd), k_norm.float().cpu(), eps), c, s_)[0]
        v_ref[p] = v.view(Hkv, hd)
        assert_kernel_close(k_cache[p], k_ref[p], dtype, f"k row {p}")
        assert_kernel_close(v_cache[p], v_ref[p], dtype, f"v row {p}")
        kk, vv = k_cache[:p + 1].float().cpu(), v_cache[:p + 1].float().cpu()
        ref = nanofast.plain_attention(q.to(dtype).float(), kk, vv, p)
        assert_kernel_close(out, ref, dtype, f"L={p + 1}")
        assert not scratch[3].any(), "combine counter not reset"
        assert k_cache[p + 1:].isnan().all(), "rows past pos were written"


# the sampler: small vocabularies, several programs per grid (block < V, ragged last block)

POISON_TOK = -7


def _sampler(V, block, ring=8):  # a DecodeState with a tiny model's activations, all but the sampler unused
    return nanofast.DecodeState(_tiny_config(2, 1, 16, vocab=V), torch.float32, KDEV, ring=ring, block=block)


def _sample(logits, st):
    """One sample_on_gpu with a poisoned token; checks it was written and the scratch left clean."""
    st.token.fill_(POISON_TOK)
    st.logits.copy_(logits.reshape(-1))
    nanofast.sample_on_gpu(st)
    tok = int(st.token)
    assert 0 <= tok < logits.numel()
    assert not st.arrivals.any() and not st.count_bins.any() and not st.mass_bins.any()
    return tok


def kernel_allowed_set(logits, sampler):
    """The tokens the last sample_on_gpu could draw: keys of logits / T at or above the threshold
    it left in its scratch (top-p's if top-p was on, else top-k's; 0 = all). The key is the
    order-preserving uint32 image of the fp32 score, as the kernels compute it."""
    T, top_p = float(sampler.temperature), float(sampler.top_p)
    slot = nanofast.I_TOPP_PREFIX if top_p < 1.0 else nanofast.I_TOPK_PREFIX
    threshold = int(sampler.ints[slot.value]) & 0xFFFFFFFF  # the slots are tl.constexpr
    s = (logits.float().cpu() / T)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 and +0.0 share a key
    bits = s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return set((keys >= threshold).nonzero().flatten().tolist())


@requires_triton
def test_kernel_sampler_greedy_is_argmax(kseed):
    V = 300
    sampler = _sampler(V, block=128)
    nanofast.set_sampling(sampler, 0.0, top_k=5, top_p=0.5)  # filters are ignored when greedy
    for logits in (torch.randn(V) * 3, torch.round(torch.randn(V) * 2), torch.randn(V) - 60):  # 2nd: ties
        expected = nanofast.sample(logits, 0.0, 5, 0.5)  # the plain sampler; ties -> lowest index
        assert expected == int(torch.argmax(logits))
        assert _sample(logits.to(KDEV), sampler) == expected


@requires_triton
def test_kernel_sampler_allowed_set(kseed):
    """The set sample_on_gpu draws from is exactly transformers' (the sort-based allowed_set of
    the sampling section), for a few (T, top_k, top_p); one sampler for all of them,
    so each call must also find the scratch clean after a call with other settings."""
    V = 300
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 3
    sampler = _sampler(V, block=128)
    for i, (T, k, p) in enumerate([(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.8, 20, 0.7),
                                   (1.0, 1, 1.0), (2.0, 0, 0.3)]):
        s = logits / T
        assert len(set(s.tolist())) == V  # test data: no ties in fp32 scores
        expected = allowed_set(logits, T, k, p)
        if p < 1.0:  # test data: the top-p cut is not a rounding call
            assert allowed_set(logits, T, k, p - 1e-4) == expected == allowed_set(logits, T, k, p + 1e-4)
        nanofast.set_sampling(sampler, T, k, p, seed=i)
        tok = _sample(logits.to(KDEV), sampler)
        assert kernel_allowed_set(logits, sampler) == expected, (T, k, p)
        assert tok in expected


@requires_triton
def test_kernel_sampler_seeded_ring_pos_step():
    V, R = 100, 4
    logits = (1.0 + 0.01 * torch.randn(V, generator=torch.Generator().manual_seed(7))).to(KDEV)  # ~uniform

    def generate(seed, n):
        sampler = _sampler(V, block=64, ring=R)
        nanofast.set_sampling(sampler, 1.0, 0, 0.9, seed)
        sampler.pos.fill_(40)
        sampler.ring.fill_(POISON_TOK)
        tokens = []
        for i in range(n):
            tokens.append(_sample(logits, sampler))
            assert (int(sampler.draws), int(sampler.pos)) == (i + 1, 41 + i), f"call {i}: draws/pos"
            assert int(sampler.ring[i % R]) == tokens[-1], f"call {i}: ring"
        if n == 6:
            assert sampler.ring.tolist() == [tokens[4], tokens[5], tokens[2], tokens[3]]
        return tokens

    first = generate(1234, 6)
    assert generate(1234, 6) == first  # same seed, same tokens
    assert len(set(first)) > 2  # the step changes the draw
    assert generate(1235, 3) != first[:3]  # the seed changes it


@requires_triton
def test_kernel_sampler_frequencies():
    """Temperature 4 on logits 4 * log(probs): the draws follow probs, by a chi-square test at
    p > 1e-3; the -inf token is never drawn. 160 draws in the interpreter (~35 ms a draw: seven
    launches), 4000 compiled. Simulated over 200,000 seeds, 160 draws pass for no seed when the
    draw ignores the temperature (probs^4) or is uniform, for 1e-4 of them when it divides by T
    twice or by 2 instead of 4, and fail for 0.1% of seeds when correct (this seed passes)."""
    probs = torch.tensor([0.6, 0.2, 0.1, 0.1], dtype=torch.float64)
    logits = torch.cat([4 * probs.log(), torch.tensor([-math.inf], dtype=torch.float64)]).float().to(KDEV)
    n = 160 if INTERPRET else 4000
    sampler = _sampler(5, block=16)
    nanofast.set_sampling(sampler, 4.0, 0, 1.0, seed=2024)
    draws = [_sample(logits, sampler) for _ in range(n)]
    assert 4 not in draws
    p_value = chi2_p_value(draws, dict(enumerate(probs.tolist())))
    assert p_value > 1e-3, ([draws.count(t) for t in range(4)], p_value)  # seeded: deterministic


@requires_triton
def test_kernel_sampler_rejects_bad_settings():
    # set_params (the fast path's) refuses what generate and the CLI refuse, in the same words
    sampler = _sampler(8, block=16)
    for name, (kw, words) in BAD_SETTINGS.items():
        if "max_new_tokens" not in kw:
            with raises_one_line(words):
                nanofast.set_sampling(sampler, kw.get("temperature", 0.0), kw.get("top_k", 0), kw.get("top_p", 1.0))


# FastDecoder.run_step against the plain model, max |diff| <= RUN_STEP_RTOL * max |reference|
# for the logits and the K/V rows written: fp32 in the interpreter, where only the order of
# summation differs (as LOGIT_RTOL; seen <= 7e-7); bf16 on CUDA, against an fp32 engine on the
# same bf16 weights, where the kernels round qkv, q, K/V, the attention output and the MLP
# activation to bf16 (with bf16 weights in the interpreter, which truncates to bf16, seen
# 8e-3 for the logits and 1e-2 for K/V; the GPU rounds to nearest). A wrong position, cache
# row, head mapping or missing projection moves logits by O(1).
RUN_STEP_RTOL = 1e-4 if KDT == torch.float32 else 3e-2


@requires_triton
def test_fast_decoder_run_step(tmp_path, monkeypatch):
    """FastDecoder.run_step driven by hand, teacher-forced over 10 positions,
    against engine.forward([tok], pos) of a separate plain engine with its own cache."""
    if INTERPRET:  # size the grids for a 2-SM device: 2 KV splits and few GEMV programs
        monkeypatch.setattr(nanofast, "num_sms", lambda: 2)
    V, steps = SMALL_VOCAB["vocab"], 10
    d = make_checkpoint(tmp_path / "ckpt", **SMALL_VOCAB, head_dim=KHD, dtype=KDT)
    engine = nanofast.load(str(d), device=KDEV, dtype=KDT, max_seq_len=16, fast=False, verbose=False)
    ref = nanofast.load(str(d), device=KDEV, dtype=torch.float32, max_seq_len=16, fast=False, verbose=False)
    decoder = nanofast.FastDecoder(engine.weights, engine.cfg, engine.cache, engine.rope, capture=False)
    st = decoder.st
    nanofast.set_sampling(st, 0.0)  # greedy
    engine.cache.data.fill_(NAN)  # rows not yet written must never be read
    tokens = torch.randint(0, V, (steps,), generator=torch.Generator().manual_seed(1)).tolist()
    for pos, tok in enumerate(tokens):
        for buf in (st.h, st.qkv, st.attn, st.act, st.logits):
            buf.fill_(NAN)
        st.token.fill_(tok)
        st.pos.fill_(pos)
        with torch.inference_mode():
            decoder.run_step()
        got = st.logits.cpu()
        want = ref.forward([tok], pos)[0].cpu()
        diff = assert_kernel_close(got, want, KDT, f"logits at position {pos}", rtol=RUN_STEP_RTOL)
        best = int(torch.argmax(got))
        assert int(st.token) == best and int(st.ring[pos]) == best, f"position {pos}: token"
        assert (int(st.pos), int(st.draws)) == (pos + 1, pos + 1), f"position {pos}: pos/draws"
        top2 = want.topk(2).values
        if top2[0] - top2[1] > 2 * diff:  # the reference's choice is beyond the difference
            assert best == int(torch.argmax(want)), f"position {pos}"
    # the cache rows the kernels wrote, against the plain model's
    for i in range(engine.cfg.num_layers):
        for got, want in ((engine.cache.k[i], ref.cache.k[i]), (engine.cache.v[i], ref.cache.v[i])):
            assert_kernel_close(got[:steps], want[:steps], KDT, f"layer {i} cache", rtol=RUN_STEP_RTOL)
            assert got[steps:].isnan().all()


# Compiled for a Hopper GPU on any machine. The interpreter runs kernels as Python and misses what
# only the compiler checks (types, constexpr branches, every return typed alike); bench.py --sass
# compiles the decode step's kernels and prefill's for sm_90a in a subprocess, launching none.

@requires_triton
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_kernels_compile_for_hopper(fmt):
    """Every kernel of a decode step (embedding, the layer's five, lm_head, the sampler's seven) and of
    prefill compiles for sm_90a with PDL, at Qwen3-0.6B's shapes, here as on a GPU, and spills nothing."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    import bench
    kernels = bench.sass_report(nanofast.__file__, "0.6B", fmt)
    assert len(kernels) == 17 + (fmt == "fp8"), [k["kernel"] for k in kernels]
    assert all(k["spill_bytes"] == 0 for k in kernels), kernels


@requires_triton
# bf16 on CUDA only: Triton's interpreter truncates fp32 -> bf16 where the GPU (and torch) round
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=requires_cuda)],
                         ids=["fp32", "bf16"])
def test_prefill_forward_matches_forward(tmp_path, dtype):
    """Prefill's row kernels repeat forward()'s roundings: same logits and the same cache,
    over two chunks (the second at pos > 0). The attention is the plain one here, so only
    the kernels differ."""
    d = make_checkpoint(tmp_path / "ckpt", **SMALL_VOCAB, head_dim=KHD, dtype=torch.float32)
    engines = [nanofast.load(str(d), device=KDEV, dtype=dtype, max_seq_len=32, fast=False, verbose=False)
               for _ in range(2)]
    ids = torch.randint(0, 512, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    want = [nanofast.forward(engines[0].weights, engines[0].cfg, engines[0].cache, engines[0].rope, ids[a:b], a,
                             last_only=True) for a, b in ((0, 11), (11, 19))]
    e = engines[1]
    got = [nanofast.prefill_forward(e.weights, e.cfg, e.cache, e.rope, ids[a:b], a, attention=nanofast.plain_attention)
           for a, b in ((0, 11), (11, 19))]
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, w_ in zip(got, want):
        assert_kernel_close(g, w_, torch.float32, "logits", rtol=rtol)
    assert_kernel_close(e.cache.data[:, :, :19], engines[0].cache.data[:, :, :19], torch.float32, "cache", rtol=rtol)
    assert e.cache.tokens == engines[0].cache.tokens == ids


# -----------------------------------------------------------------------------
# the CUDA fast path: one graph per decode step, against the plain path and transformers
# (bf16 on the GPU; skipped without CUDA and FlashInfer)


# Released shapes (random bf16 weights, tied lm_head, drawn on the GPU) and a tiny one;
# head_dim 128 as in every Qwen3.
_GPU = dict(head_dim=128, resid_gain=2, device="cuda")
GPU_SHAPES = {
    "tiny": dict(_GPU, hidden=512, layers=2, heads=8, kv_heads=4, intermediate=1024, resid_gain=8),
    "0.6B": dict(_GPU, hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072),
    "4B": dict(_GPU, hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728),
}

# bf16 tolerance. Every bf16 implementation rounds activations to 8 bits of mantissa at
# each op, so after dozens of layers its logits sit a few percent (relative L2) from the
# fp32 result. The fast path keeps the residual stream and all norms in fp32, so it must be
# at least as close to the fp32 reference as transformers' own bf16 model is, up to
# BF16_SLACK; and it must stay within BF16_RTOL of the plain bf16 path and of transformers.
BF16_SLACK = 1.25
BF16_RTOL = 0.06


@pytest.fixture(scope="module", params=list(GPU_SHAPES))
def gpu_case(request, tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp(f"gpu-{request.param}"), **GPU_SHAPES[request.param])
    engine = nanofast.load(str(d), device="cuda", max_seq_len=1024, verbose=False)
    assert engine.fast, "the fast path did not start"
    yield request.param, d, engine
    del engine
    torch.cuda.empty_cache()


def rel_err(a, b):  # per row: ||a - b|| / ||b||
    a, b = a.float(), b.float()
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@requires_fast
def test_fast_logits_match_plain_and_transformers(gpu_case):
    """Prefill and 256 replayed decode steps, teacher-forced with the
    fast path's greedy tokens, against the plain bf16 path, transformers' bf16 model and the
    plain path in fp32."""
    name, d, engine = gpu_case
    prompt = random_prompt(100, seed=5)
    fast = [engine.prefill(prompt)]
    for _ in range(256):
        fast.append(engine.step(int(fast[-1].argmax())))
    fast = torch.stack(fast)  # (257, V): logits after the prompt and after each step
    seq = prompt + fast[:-1].argmax(-1).tolist()
    rows = slice(len(prompt) - 1, None)  # positions whose logits the fast path produced
    plain = engine.forward(seq, 0)[rows]
    hf = Qwen3ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref_hf = hf(torch.tensor([seq], device="cuda")).logits[0, rows].float()
    del hf
    fp32 = nanofast.load(str(d), device="cuda", dtype=torch.float32, max_seq_len=1024, fast=False, verbose=False)
    exact = fp32.forward(seq, 0)[rows]
    del fp32
    assert torch.isfinite(fast).all() and torch.isfinite(exact).all()
    err_fast, err_hf, err_plain = rel_err(fast, exact), rel_err(ref_hf, exact), rel_err(plain, exact)
    print(f"\n{name}: relative L2 error vs fp32, max over 257 positions: fast {err_fast.max():.4f}, "
          f"transformers bf16 {err_hf.max():.4f}, plain bf16 {err_plain.max():.4f}; fast vs plain "
          f"{rel_err(fast, plain).max():.4f}, fast vs transformers {rel_err(fast, ref_hf).max():.4f}")
    assert err_fast.max() <= BF16_SLACK * max(err_hf.max(), err_plain.max())
    assert rel_err(fast, plain).max() <= BF16_RTOL
    assert rel_err(fast, ref_hf).max() <= BF16_RTOL


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@requires_fast
def test_fast_greedy_matches_plain(gpu_case):
    """128 greedy tokens from the graph's replay loop equal the plain path's. If they part,
    it must be at a bf16 near tie: the plain path's two candidates within the fast path's
    measured error of each other."""
    name, d, engine = gpu_case
    prompt = random_prompt(64, seed=11)
    fast = list(engine.generate(prompt, max_new_tokens=128, temperature=0.0))
    assert engine.stop_reason == "max_new_tokens" and len(fast) == 128
    plain_engine = nanofast.load(str(d), device="cuda", max_seq_len=1024, fast=False, verbose=False)
    plain = list(plain_engine.generate(prompt, max_new_tokens=128, temperature=0.0))
    del plain_engine
    j = first_divergence(fast, plain)
    if j is not None:
        logits = engine.forward(prompt + plain[:j], 0)[-1]
        gap = float(logits[plain[j]] - logits[fast[j]])
        scale = float(logits.norm() / logits.numel() ** 0.5)
        print(f"\n{name}: greedy ids part at step {j}: plain {plain[j]} vs fast {fast[j]}, gap {gap:.4f} "
              f"({gap / scale:.4f} of the logits' rms)")
        assert gap <= 0.02 * scale, f"divergence at step {j} is not a near tie"


@requires_fast
def test_fast_decode_at_16k_context(tmp_path):
    """A 16,500-token prompt (five prefill chunks), then decode steps at 16K+ context,
    against the plain path on the same cache."""
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES["0.6B"])
    engine = nanofast.load(str(d), device="cuda", max_seq_len=16600, verbose=False)
    prompt = random_prompt(16500, seed=3)
    fast_first = engine.prefill(prompt)
    for start in range(0, len(prompt), 2048):  # plain prefill, in chunks to bound memory
        plain_first = engine.forward(prompt[start:start + 2048], start, last_only=True)[0]
    assert rel_err(fast_first, plain_first) <= BF16_RTOL
    token, pos = int(plain_first.argmax()), len(prompt)
    for _ in range(8):
        fast = engine.step(token)
        plain = engine.forward([token], pos)[0]  # rewrites row pos of the cache with its own K/V
        err = float(rel_err(fast, plain))
        assert err <= BF16_RTOL, f"position {pos}: relative error {err:.4f}"
        token, pos = int(plain.argmax()), pos + 1


@pytest.fixture(scope="module")
def fast_path_case(tmp_path_factory):
    """decode_path's checkpoint for the fast path: the tiny shape, a prompt and 50 greedy tokens."""
    d = make_checkpoint(tmp_path_factory.mktemp("gpu-paths"), **GPU_SHAPES["tiny"])
    prompt = random_prompt(8, seed=2)
    engine = nanofast.load(str(d), device="cuda", max_seq_len=128, verbose=False)
    greedy = list(engine.generate(prompt, max_new_tokens=50, temperature=0.0))
    del engine
    return dict(dir=d, prompt=prompt, greedy=greedy)


@pytest.fixture(scope="module")
def tiny_fast(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("gpu-small"), **GPU_SHAPES["tiny"])
    return nanofast.load(str(d), device="cuda", max_seq_len=64, verbose=False)


@requires_fast
def test_fast_eos_overshoot_is_dropped(tiny_fast):
    """The GPU runs ahead of the tokens the host has read; what it computed past the stop
    token is thrown away, and the next generation starts clean."""
    prompt = random_prompt(8, seed=2)
    full = list(tiny_fast.generate(prompt, max_new_tokens=50, temperature=0.0))
    j = max(i for i in range(50) if full[i] not in full[:i])  # the last token seen for the first time
    assert j >= 3, "degenerate test model"
    out = list(tiny_fast.generate(prompt, max_new_tokens=50, temperature=0.0, stop_ids=[full[j]]))
    assert out == full[:j + 1] and tiny_fast.stop_reason == "eos"
    # a step after it continues at the right position, though the graph ran ahead
    stepped = tiny_fast.step(out[-1])
    assert rel_err(stepped, tiny_fast.forward(prompt + out, 0)[-1]) <= BF16_RTOL
    assert list(tiny_fast.generate(prompt, max_new_tokens=50, temperature=0.0)) == full


@requires_fast
def test_fast_prefix_reuse(tiny_fast):
    """Three turns on the fast path with 16-token prefill chunks: later turns prefill only the
    tokens the cache lacks (across a chunk boundary), and their logits match a fresh prefill's."""
    decoder, chunk = tiny_fast.decoder, tiny_fast.decoder.prefill_chunk
    decoder.prefill_chunk = 16
    try:
        ids, held = random_prompt(20, seed=7), 0
        for turn in range(3):
            out = list(tiny_fast.generate(ids, max_new_tokens=5, temperature=0.0))
            assert (tiny_fast.stats["reused_tokens"], tiny_fast.stats["prefilled_tokens"]) == (held, len(ids) - held)
            held = len(ids) + len(out) - 1
            ids = ids + out + random_prompt(9, seed=turn)
        reused = tiny_fast.prefill(ids)
        tiny_fast.reset()
        assert rel_err(reused, tiny_fast.prefill(ids)) <= BF16_RTOL
    finally:
        decoder.prefill_chunk = chunk


@requires_fast
def test_first_run_says_it_compiles(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a machine that has not run nanofast
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES["tiny"])
    nanofast.load(str(d), device="cuda", max_seq_len=64)
    err = capfd.readouterr().err
    assert err.count("first run on a machine") == 1 and err.index("first run") < err.index("CUDA graph captured")
    nanofast.load(str(d), device="cuda", max_seq_len=64)
    assert "first run" not in capfd.readouterr().err


@requires_fast
def test_fast_sampling_in_graph(tiny_fast):
    """Seeded sampling repeats; new settings need no new capture; top-k 1 and a tiny top-p
    both reduce to greedy."""
    graph = tiny_fast.decoder.graph
    prompt = random_prompt(8, seed=4)
    run = lambda **kw: list(tiny_fast.generate(prompt, max_new_tokens=40, **kw))  # noqa: E731
    a = run(temperature=8.0, top_k=50, top_p=0.9, seed=7)  # logits' std is ~20: T 8 spreads them
    assert a == run(temperature=8.0, top_k=50, top_p=0.9, seed=7)
    assert a != run(temperature=8.0, top_k=50, top_p=0.9, seed=8)
    greedy = run(temperature=0.0)
    assert run(temperature=1.0, top_k=1, seed=3) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert tiny_fast.decoder.graph is graph


@requires_fast
@pytest.mark.parametrize("name", ["tiny", "0.6B"])
def test_fast_fp8_matches_plain(tmp_path, name):
    """fp8 projections (quantized on load) on the fast path, prefill and 128 teacher-forced
    decode steps, against the plain path on the same fp8 weights, dequantized: the tolerance
    rule of bf16 (its error against fp32 at most BF16_SLACK times the plain bf16 path's)."""
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES[name])
    load = lambda **kw: nanofast.load(str(d), device="cuda", max_seq_len=512, quantize="fp8", verbose=False, **kw)  # noqa: E731
    engine = load()
    L = engine.weights.layers[0]
    assert engine.fast and engine.weight_format == "fp8" and L.qkv.fp8 and L.qkv.weight.dtype == torch.float8_e4m3fn
    prompt = random_prompt(100, seed=5)
    fast = [engine.prefill(prompt)]
    for _ in range(128):
        fast.append(engine.step(int(fast[-1].argmax())))
    fast = torch.stack(fast)
    seq = prompt + fast[:-1].argmax(-1).tolist()
    rows = slice(len(prompt) - 1, None)
    plain = engine.forward(seq, 0)[rows]  # the plain path in bf16 on the same engine's fp8 weights
    exact = load(dtype=torch.float32, fast=False).forward(seq, 0)[rows]
    err_fast, err_plain = rel_err(fast, exact), rel_err(plain, exact)
    print(f"\nfp8 {name}: relative L2 error vs fp32, max over 129 positions: fast {err_fast.max():.4f}, "
          f"plain bf16 {err_plain.max():.4f}; fast vs plain {rel_err(fast, plain).max():.4f}")
    assert torch.isfinite(fast).all()
    assert err_fast.max() <= BF16_SLACK * err_plain.max()
    assert rel_err(fast, plain).max() <= BF16_RTOL


@requires_fast
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_fast_decode_allocates_nothing(tmp_path, quantize):
    """Around a 1,000-token generation the CUDA allocator's counters do not move."""
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES["tiny"])
    engine = nanofast.load(str(d), device="cuda", max_seq_len=1100, quantize=quantize, verbose=False)
    tokens = engine.generate(random_prompt(16, seed=6), max_new_tokens=1000, temperature=0.7, top_k=20,
                             top_p=0.95, seed=1)
    next(tokens)  # prefill is done and the first token is back

    def counters():
        torch.cuda.synchronize()
        s = torch.cuda.memory_stats()
        return (torch.cuda.memory_allocated(), s["allocation.all.allocated"], s["segment.all.allocated"],
                s["num_alloc_retries"])

    before = counters()
    rest = list(tokens)
    assert len(rest) == 999 and counters() == before


# The seed: the same seed, prompt and settings give the same tokens, call after call, however
# the previous call ended. The shape is GQA-3 with head_dim 128, a full vocabulary and short
# enough to run many calls; the cache holds 240 tokens, so some runs fill it.
SEED_SETTINGS = {
    "temperature": dict(temperature=0.7),
    "top-k": dict(temperature=0.7, top_k=50),
    "top-p": dict(temperature=0.7, top_p=0.9),
    "top-k+top-p": dict(temperature=0.7, top_k=50, top_p=0.9),
    "generation_config": dict(temperature=0.6, top_k=20, top_p=0.95),
}


@pytest.fixture(scope="module", params=[None, "fp8"])
def seed_engine(request, tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("gpu-seed"), **dict(_GPU, hidden=1536, layers=3, heads=12,
                                                                      kv_heads=4, intermediate=4096))
    engine = nanofast.load(str(d), device="cuda", max_seq_len=240, quantize=request.param, verbose=False)
    yield engine, random_prompt(37, seed=3)
    del engine
    torch.cuda.empty_cache()


@requires_fast
def test_fast_decode_is_deterministic(seed_engine):
    """The root of a repeatable seed: the decode step's logits are bit for bit the same on every run."""
    engine, prompt = seed_engine
    tokens = random_prompt(150, seed=9)
    runs = []
    for _ in range(3):
        engine.reset()
        runs.append(torch.stack([engine.prefill(prompt)] + [engine.step(t) for t in tokens]))
    assert torch.isfinite(runs[0]).all()
    for r in runs[1:]:
        assert torch.equal(r, runs[0]), f"{int((r != runs[0]).any(-1).sum())} of 151 steps differ"


@requires_cuda
@requires_triton
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fast_split_k_is_deterministic(fp8):
    """gemv_add at 8B's down_proj shape (split K, partials summed by the last program) gives the same
    bits on every call, however its programs happen to be scheduled."""
    N, K = 4096, 12288
    W = torch.randn(N, K, device="cuda") * K ** -0.5
    W = nanofast.quantize_fp8(W) if fp8 else nanofast.Proj(W.bfloat16())
    a = torch.randn(K, device="cuda").bfloat16()
    h0, scratch = torch.randn(N, device="cuda") * 10, nanofast.add_scratch(N, "cuda")
    assert nanofast.gemv_tiles("add", N, K, fp8)[2] > 1
    outs = []
    for _ in range(50):
        h = h0.clone()
        nanofast.gemv_add(a, W, h, scratch)
        outs.append(h)
    assert all(torch.equal(o, outs[0]) for o in outs)
    ref = h0.double() + nanofast.dequantize(W, torch.float32).double() @ a.double()
    assert rel_err(outs[0], ref) < 1e-5


@requires_fast
@pytest.mark.parametrize("setting", list(SEED_SETTINGS))
def test_fast_seeded_runs_repeat(seed_engine, setting):
    """Ten seeded runs on one engine, with and without reset() (so with and without prefix
    reuse), to 200 tokens and to a full cache, after runs that the caller or a stop id ended
    early: every run gives the first run's tokens."""
    engine, prompt = seed_engine
    kw = dict(SEED_SETTINGS[setting], seed=1)
    engine.reset()
    first = list(engine.generate(prompt, max_new_tokens=200, **kw))
    full = list(engine.generate(prompt, max_new_tokens=1000, **kw))
    assert engine.stop_reason == "cache_full" and full[:200] == first
    for i in range(8):
        if i % 2:
            engine.reset()
        if i % 4 == 1:  # the caller stops early
            it = engine.generate(prompt, max_new_tokens=200, **kw)
            assert [next(it) for _ in range(50)] == first[:50]
            it.close()
        elif i % 4 == 3:  # a stop id ends the run
            out = list(engine.generate(prompt, max_new_tokens=200, stop_ids=[first[120]], **kw))
            assert out == first[:first.index(first[120]) + 1]
        got = list(engine.generate(prompt, max_new_tokens=1000 if i % 3 == 0 else 200, **kw))
        assert got == (full if i % 3 == 0 else first), f"run {i}: first differing token at {first_divergence(got, first)}"
    assert list(engine.generate(prompt, max_new_tokens=200, **dict(kw, seed=2))) != first


@requires_cuda
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_plain_seeded_runs_repeat_on_gpu(tmp_path, quantize):
    """The plain path on the GPU (bf16, and fp8 dequantized) repeats a seeded run, reset or not."""
    d = make_checkpoint(tmp_path / "ckpt", **dict(_GPU, hidden=1536, layers=3, heads=12, kv_heads=4,
                                                  intermediate=4096))
    engine = nanofast.load(str(d), device="cuda", max_seq_len=240, quantize=quantize, fast=False, verbose=False)
    kw = dict(SEED_SETTINGS["generation_config"], seed=1, max_new_tokens=120)
    prompt = random_prompt(37, seed=3)
    first = list(engine.generate(prompt, **kw))
    assert list(engine.generate(prompt, **kw)) == first
    engine.reset()
    assert list(engine.generate(prompt, **kw)) == first
    assert list(engine.generate(prompt, **dict(kw, seed=2))) != first  # the sampler has choices


@requires_fast
@requires_qwen3_files
def test_fast_cli_seed_repeats_across_processes(tmp_path, tokenizer_json):
    """The CLI with --seed, in two processes, at generation_config.json's sampling defaults."""
    d = make_checkpoint(tmp_path / "ckpt", tokenizer_json=tokenizer_json,
                        **dict(_GPU, hidden=1536, layers=3, heads=12, kv_heads=4, intermediate=4096))
    argv = [sys.executable, str(REPO / "nanofast.py"), "--model", str(d), "--prompt", "Tell me a story",
            "--seed", "11", "--max-new-tokens", "150", "--ignore-eos", "--json"]
    runs = [subprocess.run(argv, capture_output=True, text=True, timeout=900) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    ids = [json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"] for r in runs]
    assert len(ids[0]) == 150
    assert ids[0] == ids[1], f"first differing token at {first_divergence(*ids)}"


@requires_cuda
def test_gpu_beyond_memory_refused_before_loading(tmp_path, monkeypatch):
    """On CUDA, a max_seq_len whose KV cache is twice what the card has free is refused before
    anything is loaded, with the driver's free figure; and where the estimate is off (free memory
    faked), the KV cache's real out-of-memory error becomes the same kind of line."""
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES["tiny"])
    cfg = nanofast.load_config(str(d))
    free = torch.cuda.mem_get_info()[0]
    too_many = 2 * free // nanofast.memory_needed(cfg, torch.bfloat16, 1, False)[1]
    allocated = torch.cuda.memory_allocated()
    with monkeypatch.context() as m:
        calls = no_large_allocations(m)
        with raises_one_line("not enough memory on cuda", "GiB is free", "--max-seq-len of at most") as got:
            nanofast.load(str(d), device="cuda", max_seq_len=too_many, verbose=False)
    assert calls == [] and torch.cuda.memory_allocated() == allocated
    assert abs(float(MEMORY_LINE.search(got[0]).group(5)) - free / 2 ** 30) < 0.5
    monkeypatch.setattr(nanofast, "free_memory", lambda device: 2 ** 60)  # the estimate says it fits
    with raises_one_line("out of memory on cuda allocating the KV cache", "GiB is free"):
        nanofast.load(str(d), device="cuda", max_seq_len=too_many, verbose=False)
    torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_gpu_weight_bytes_are_what_loads(tmp_path, quantize):
    # the estimate the memory check uses, against the weights on the card (fp8 kept as fp8 there)
    d = make_checkpoint(tmp_path / "ckpt", **GPU_SHAPES["tiny"])
    engine = nanofast.load(str(d), device="cuda", max_seq_len=64, quantize=quantize, fast=False, verbose=False)
    assert engine.weights.layers[0].qkv.fp8 == (quantize == "fp8")
    assert engine.weight_bytes == weights_nbytes(engine.weights)
