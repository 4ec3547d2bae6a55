"""Tests for nanofast.py.

    NANOFAST_QWEN3_FILES=../shared/qwen3 python -m pytest -q test_nanofast.py

Every model here is a tiny random Qwen3 laid out exactly like a downloaded checkpoint
(config.json, safetensors with the released tensor names, tokenizer files). The plain
path is compared with transformers' Qwen3ForCausalLM loaded from the same folder in
float32. Tests that need the Qwen3 tokenizer files (NANOFAST_QWEN3_FILES: the released
tokenizer_config.json, vocab.json, merges.txt, generation_config.json, make_tokenizer.py)
skip when that variable is unset; the model-math tests always run.

CPU tests come first; GPU tests (marked requires_cuda) follow at the end of the file.
"""
import os

import torch

if not torch.cuda.is_available():  # GPU kernels are tested under Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import nanofast  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

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


def make_checkpoint(d, *, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    tied=True, store_lm_head=False, shards=1, seed=0, rope_form="theta",
                    dtype=torch.bfloat16, tokenizer_json=None):
    """Lay out a random tiny Qwen3 in folder d exactly like a downloaded checkpoint.

    config.json is the released 0.6B config with the sizes substituted (vocab_size stays
    151936 so the real tokenizer works). With NANOFAST_QWEN3_FILES set, the tokenizer
    files and generation_config.json are copied in and tokenizer.json is copied from
    tokenizer_json, or built with make_tokenizer.py when that is None.

    Weights: embeddings (and an untied lm_head) std 1, so logits have std ~sqrt(hidden)
    and the top-2 gap is large; projections std 1/sqrt(fan_in); o_proj and down_proj 8x
    that, so the layers outweigh the input embedding in the residual stream (with a
    tied lm_head a weaker residual makes greedy decoding repeat the input token forever);
    norm weights 1 + 0.1 noise."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    cfg = released_config()
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, max_window_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
               intermediate_size=intermediate, tie_word_embeddings=tied)
    if rope_form == "parameters":  # as transformers 5 saves it
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"rope_theta": float(cfg.pop("rope_theta")), "rope_type": "default"}
    else:
        assert rope_form == "theta"
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if QWEN3_FILES is not None:
        for f in TOKENIZER_FILES:
            shutil.copyfile(QWEN3_FILES / f, d / f)
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, d / "tokenizer.json")
        else:
            subprocess.run([sys.executable, str(QWEN3_FILES / "make_tokenizer.py"), str(d)],
                           check=True, capture_output=True)

    V = cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def norm_weight(n):
        return 1.0 + 0.1 * randn(n)

    q, kv = heads * head_dim, kv_heads * head_dim
    w = {"model.embed_tokens.weight": randn(V, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight(hidden)
        w[p + "self_attn.q_proj.weight"] = randn(q, hidden, std=hidden ** -0.5)
        w[p + "self_attn.k_proj.weight"] = randn(kv, hidden, std=hidden ** -0.5)
        w[p + "self_attn.v_proj.weight"] = randn(kv, hidden, std=hidden ** -0.5)
        w[p + "self_attn.o_proj.weight"] = randn(hidden, q, std=8 * q ** -0.5)
        w[p + "self_attn.q_norm.weight"] = norm_weight(head_dim)
        w[p + "self_attn.k_norm.weight"] = norm_weight(head_dim)
        w[p + "post_attention_layernorm.weight"] = norm_weight(hidden)
        w[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden, std=hidden ** -0.5)
        w[p + "mlp.up_proj.weight"] = randn(intermediate, hidden, std=hidden ** -0.5)
        w[p + "mlp.down_proj.weight"] = randn(hidden, intermediate, std=8 * intermediate ** -0.5)
    w["model.norm.weight"] = norm_weight(hidden)
    if not tied:
        w["lm_head.weight"] = randn(V, hidden)
    elif store_lm_head:  # some tied checkpoints store a copy of the embedding
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    w = {k: v.to(dtype).contiguous() for k, v in w.items()}
    for f in list(d.glob("model*.safetensors")) + list(d.glob("model.safetensors.index.json")):
        f.unlink()
    if shards == 1:
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(w)
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: w[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(d / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in w.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return d


def hf_model(d):
    """transformers' Qwen3 from folder d in fp32 eager; asserts every tensor was loaded."""
    from transformers import Qwen3ForCausalLM

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
        out = model(torch.tensor([[ids[-1]]]), cache=out.cache, use_cache=True)
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
# released models), both rope forms, bf16 and fp32 checkpoints, page sizes 16 and 4.
CONFIGS = {
    "tied-gqa2-bf16": dict(ckpt=dict(heads=4, kv_heads=2, head_dim=16), page_size=16, prompt_seed=24),
    "tiedstored-gqa1-fp32-ropeparams": dict(
        ckpt=dict(heads=4, kv_heads=4, head_dim=32, tied=True, store_lm_head=True, rope_form="parameters",
                  dtype=torch.float32, seed=1), page_size=4, prompt_seed=102),
    "untied-gqa4-3shards": dict(
        ckpt=dict(heads=8, kv_heads=2, head_dim=16, layers=3, intermediate=96, tied=False, shards=3, seed=2),
        page_size=4, prompt_seed=29),
}
PROMPT_LEN = 11
DECODE_STEPS = 70  # > 64, and crosses many pages of 4 (and several of 16)
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


@pytest.fixture(scope="session", params=list(CONFIGS))
def case(request, tmp_path_factory, tokenizer_json):
    """A checkpoint, its transformers model and reference outputs, shared by the session."""
    spec = CONFIGS[request.param]
    d = make_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_json=tokenizer_json, **spec["ckpt"])
    model = hf_model(d)
    prompt = random_prompt(PROMPT_LEN, seed=spec["prompt_seed"])
    greedy = hf_greedy(model, prompt, DECODE_STEPS)
    logits = hf_logits(model, prompt + greedy)  # (PROMPT_LEN + DECODE_STEPS, V)
    return dict(name=request.param, dir=d, model=model, prompt=prompt, greedy=greedy, logits=logits,
                page_size=spec["page_size"], ckpt=spec["ckpt"])


@pytest.fixture(scope="session")
def tied_case(tmp_path_factory, tokenizer_json):
    """The first configuration again, with another prompt (for the stop and NaN tests)."""
    spec = CONFIGS["tied-gqa2-bf16"]
    d = make_checkpoint(tmp_path_factory.mktemp("tied"), tokenizer_json=tokenizer_json, **spec["ckpt"])
    model = hf_model(d)
    prompt = random_prompt(PROMPT_LEN, seed=3)
    greedy = hf_greedy(model, prompt, 40)
    return dict(dir=d, model=model, prompt=prompt, greedy=greedy, logits=hf_logits(model, prompt + greedy))


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
    eng = load_engine(case["dir"], page_size=case["page_size"])
    cfg, ck = eng.cfg, case["ckpt"]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (ck["heads"], ck["kv_heads"], ck["head_dim"])
    assert cfg.tie_word_embeddings == ck.get("tied", True)
    assert eng.device == torch.device("cpu") and eng.dtype == torch.float32 and eng.max_seq_len == 128
    assert eng.fast is False
    ps = case["page_size"]
    assert len(eng.cache.k) == len(eng.cache.v) == cfg.num_layers
    for t in eng.cache.k + eng.cache.v:
        assert t.shape[1:] == (ps, cfg.num_kv_heads, cfg.head_dim)
        assert t.shape[0] * ps >= 128


def test_prefill_logits_every_position(case):
    eng = load_engine(case["dir"], page_size=case["page_size"])
    P = len(case["prompt"])
    eng.reset()
    got = eng.forward(case["prompt"], 0)
    assert got.dtype == torch.float32
    assert_logits_close(got, case["logits"][:P], "forward(prompt, 0)")
    # prefill resets the cache and returns the last position's logits
    eng.prefill(random_prompt(30, seed=99))  # longer: stale cache entries beyond the prompt
    assert_logits_close(eng.prefill(case["prompt"]), case["logits"][P - 1], "prefill after another prefill")


def test_chunked_forward(case):
    # prefill in pieces (crossing page boundaries) must equal one forward
    eng = load_engine(case["dir"], page_size=case["page_size"])
    ids = case["prompt"] + case["greedy"][:20]
    eng.reset()
    parts, pos = [], 0
    for n in (5, 1, 9, 3, 13):
        parts.append(eng.forward(ids[pos:pos + n], pos))
        pos += n
    assert pos == len(ids)
    assert_logits_close(torch.cat(parts), case["logits"][:len(ids)], "chunked forward")


def test_decode_steps_cross_pages(case):
    # every decode step's logits, teacher-forced on transformers' greedy tokens
    eng = load_engine(case["dir"], page_size=case["page_size"])
    P = len(case["prompt"])
    assert_logits_close(eng.prefill(case["prompt"]), case["logits"][P - 1], "prefill")
    for i, tok in enumerate(case["greedy"]):
        assert_logits_close(eng.step(tok), case["logits"][P + i], f"decode step {i} (position {P + i})")
    assert (P + DECODE_STEPS) // case["page_size"] >= 5  # really crossed pages


def test_kv_cache_layout(case):
    # token t's K/V live at page t // page_size, slot t % page_size, as transformers caches them
    eng = load_engine(case["dir"], page_size=case["page_size"])
    ids = case["prompt"] + case["greedy"][:30]
    eng.prefill(ids)
    with torch.no_grad():
        out = case["model"](torch.tensor([ids]), use_cache=True)
    for i in range(eng.cfg.num_layers):
        layer = out.cache.layers[i]
        for name, ours, ref in (("k", eng.cache.k[i], layer.keys), ("v", eng.cache.v[i], layer.values)):
            ref = ref[0].transpose(0, 1)  # (T, Hkv, hd)
            T, ps = ref.shape[0], ours.shape[1]
            ours = torch.stack([ours[t // ps, t % ps] for t in range(T)]).float()
            scale = max(float(ref.abs().max()), 1.0)
            assert torch.isfinite(ours).all()
            assert float((ours - ref).abs().max()) <= LOGIT_RTOL * scale, f"layer {i} {name}"


def test_greedy_generate_matches_transformers(case):
    eng = load_engine(case["dir"], page_size=case["page_size"])
    got = list(eng.generate(case["prompt"], max_new_tokens=GREEDY_TOKENS, temperature=0.0))
    assert got == case["greedy"][:GREEDY_TOKENS]
    assert eng.stop_reason == "max_new_tokens"
    assert eng.stats["prompt_tokens"] == PROMPT_LEN and eng.stats["generated_tokens"] == GREEDY_TOKENS
    # sampling parameters do not matter at temperature 0
    again = list(eng.generate(case["prompt"], max_new_tokens=16, temperature=0.0, top_k=5, top_p=0.5, seed=1))
    assert again == got[:16]


def test_bf16_engine_on_cpu(case):
    # bf16 weights and cache: finite, and close to fp32 (bf16 has 8 bits of mantissa)
    eng = load_engine(case["dir"], dtype=torch.bfloat16, page_size=case["page_size"])
    assert eng.dtype == torch.bfloat16
    P = len(case["prompt"])
    got = eng.forward(case["prompt"], 0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = case["logits"][:P]
    assert float((got - ref).abs().max()) <= 0.1 * float(ref.abs().max())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


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
    from safetensors.torch import load_file

    d = tmp_path / "nan"
    shutil.copytree(tied_case["dir"], d)
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    try:
        eng = load_engine(d)
    except nanofast.NanofastError:
        return  # rejecting non-finite weights at load is fine too
    ref = hf_logits(tied_case["model"], tied_case["prompt"])
    with pytest.raises(AssertionError):
        assert_logits_close(eng.forward(tied_case["prompt"], 0), ref)


# -----------------------------------------------------------------------------
# generate: stopping


def test_tied_case_reference(tied_case):
    _check_reference(tied_case["greedy"], tied_case["logits"])


def test_stop_on_eos_id(tied_case):
    g = tied_case["greedy"]
    i = next(i for i in range(3, len(g)) if g[i] not in g[:i])
    eng = load_engine(tied_case["dir"])
    got = list(eng.generate(tied_case["prompt"], max_new_tokens=30, temperature=0.0, stop_ids=[g[i], 151645]))
    assert got == g[:i + 1]  # the stop id is yielded, then generation ends
    assert eng.stop_reason == "eos"
    assert eng.stats["generated_tokens"] == i + 1


def test_stop_at_max_new_tokens(tied_case):
    eng = load_engine(tied_case["dir"])
    for n in (1, 2, 7):
        got = list(eng.generate(tied_case["prompt"], max_new_tokens=n, temperature=0.0))
        assert got == tied_case["greedy"][:n]
        assert eng.stop_reason == "max_new_tokens"
        assert eng.stats["prompt_tokens"] == PROMPT_LEN and eng.stats["generated_tokens"] == n


@pytest.mark.parametrize("max_seq_len", [30, 32])
def test_stop_at_full_cache(tied_case, max_seq_len):
    eng = load_engine(tied_case["dir"], max_seq_len=max_seq_len, page_size=4)
    got = list(eng.generate(tied_case["prompt"], max_new_tokens=100, temperature=0.0))
    room = max_seq_len - PROMPT_LEN
    assert len(got) in (room, room + 1)  # room + 1: the last token needs no cache slot
    assert got == tied_case["greedy"][:len(got)]
    assert eng.stop_reason == "cache_full"
    assert eng.stats["generated_tokens"] == len(got)


def test_prompt_that_fills_the_cache_is_rejected(tied_case):
    eng = load_engine(tied_case["dir"], max_seq_len=PROMPT_LEN)
    with pytest.raises(nanofast.NanofastError):
        list(eng.generate(tied_case["prompt"], max_new_tokens=4))


def test_interrupted(tied_case):
    eng = load_engine(tied_case["dir"])
    it = eng.generate(tied_case["prompt"], max_new_tokens=20, temperature=0.0)
    assert [next(it) for _ in range(3)] == tied_case["greedy"][:3]
    it.close()
    assert eng.stop_reason == "interrupted"


def test_seeded_generate_is_repeatable(tied_case):
    eng = load_engine(tied_case["dir"])
    kw = dict(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0)
    a = list(eng.generate(tied_case["prompt"], seed=1234, **kw))
    b = list(eng.generate(tied_case["prompt"], seed=1234, **kw))
    c = list(eng.generate(tied_case["prompt"], seed=4321, **kw))
    assert a == b and len(a) == 24
    assert a != c


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


# -----------------------------------------------------------------------------
# config


def _expected_config(raw):
    return nanofast.Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"], head_dim=raw["head_dim"], rms_norm_eps=raw["rms_norm_eps"],
        rope_theta=1e6, tie_word_embeddings=raw["tie_word_embeddings"],
        max_position_embeddings=raw["max_position_embeddings"])


@pytest.mark.parametrize("rope_form", ["theta", "parameters"])
def test_config_rope_forms(tmp_path, rope_form):
    raw = released_config()
    if rope_form == "parameters":
        raw.pop("rope_scaling")
        raw["rope_parameters"] = {"rope_theta": float(raw.pop("rope_theta")), "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
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


def _assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.mark.parametrize("change", [
    dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]),
    dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    dict(architectures=["LlamaForCausalLM"]),
    dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
], ids=["llama", "qwen3_moe", "qwen2", "llama-arch", "yarn-rope_scaling", "yarn-rope_parameters"])
def test_config_rejects_other_models(tmp_path, change):
    raw = released_config()
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(nanofast.NanofastError) as e:
        nanofast.load_config(str(tmp_path))
    _assert_one_line_error(e)


def test_config_bad_files(tmp_path):
    with pytest.raises(nanofast.NanofastError) as e:
        nanofast.load_config(str(tmp_path / "nowhere"))
    _assert_one_line_error(e)
    with pytest.raises(nanofast.NanofastError) as e:
        nanofast.load_config(str(tmp_path))  # folder without config.json
    _assert_one_line_error(e)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises(nanofast.NanofastError) as e:
        nanofast.load_config(str(tmp_path))
    _assert_one_line_error(e)


# -----------------------------------------------------------------------------
# weights: loading and checking


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, tokenizer_json):
    """A very small checkpoint to break in different ways (with tokenizer files if available)."""
    return make_checkpoint(tmp_path_factory.mktemp("small"), hidden=32, layers=1, heads=2, kv_heads=1,
                           head_dim=16, intermediate=64, tokenizer_json=tokenizer_json)


def _edit_tensors(d, edit):
    from safetensors.torch import load_file

    w = load_file(str(d / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})


def _drop(name):
    return lambda w: w.pop(name)


def _add(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape, dtype=torch.bfloat16))


def _reshape(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape, dtype=torch.bfloat16))


def _truncate(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])


def _garbage(d):
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _garbage_header(d):  # a plausible header length followed by junk
    (d / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json at all" + os.urandom(200))


def _empty(d):
    (d / "model.safetensors").write_bytes(b"")


# name -> (how to break a copy of small_ckpt, strings the error must contain)
BROKEN_WEIGHTS = {
    "missing-tensor": (lambda d: _edit_tensors(d, _drop("model.layers.0.mlp.up_proj.weight")),
                       ["model.layers.0.mlp.up_proj.weight"]),
    "missing-norm": (lambda d: _edit_tensors(d, _drop("model.norm.weight")), ["model.norm.weight"]),
    "unexpected-tensor": (lambda d: _edit_tensors(d, _add("model.layers.0.mlp.extra_proj.weight", (4, 4))),
                          ["model.layers.0.mlp.extra_proj.weight"]),
    "unexpected-layer": (lambda d: _edit_tensors(d, _add("model.layers.1.input_layernorm.weight", (32,))),
                         ["model.layers.1.input_layernorm.weight"]),
    "misshaped-tensor": (lambda d: _edit_tensors(d, _reshape("model.layers.0.self_attn.k_proj.weight", (32, 32))),
                         ["model.layers.0.self_attn.k_proj.weight"]),
    "misshaped-embed": (lambda d: _edit_tensors(d, _reshape("model.embed_tokens.weight", (1000, 32))),
                        ["model.embed_tokens.weight"]),
    "truncated-file": (_truncate, []),
    "garbage-file": (_garbage, []),
    "garbage-header": (_garbage_header, []),
    "empty-file": (_empty, []),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), []),
}


def _broken_copy(src, dst, name):
    shutil.copytree(src, dst)
    BROKEN_WEIGHTS[name][0](dst)
    return dst


@pytest.mark.parametrize("name", list(BROKEN_WEIGHTS))
def test_load_rejects_broken_weights(tmp_path, small_ckpt, name):
    d = _broken_copy(small_ckpt, tmp_path / name, name)
    with pytest.raises(nanofast.NanofastError) as e:
        load_engine(d)
    _assert_one_line_error(e, *BROKEN_WEIGHTS[name][1])


@pytest.fixture(scope="session")
def sharded_small(tmp_path_factory, tokenizer_json):
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), hidden=32, layers=2, heads=2, kv_heads=1,
                           head_dim=16, intermediate=64, shards=3, tied=False, tokenizer_json=tokenizer_json)


def test_load_rejects_missing_shard(tmp_path, sharded_small):
    d = tmp_path / "c"
    shutil.copytree(sharded_small, d)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(nanofast.NanofastError) as e:
        load_engine(d)
    _assert_one_line_error(e, "model-00002-of-00003.safetensors")


def test_load_rejects_index_missing_a_tensor(tmp_path, sharded_small):
    d = tmp_path / "c"
    shutil.copytree(sharded_small, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(nanofast.NanofastError) as e:
        load_engine(d)
    _assert_one_line_error(e)


def test_untied_needs_lm_head(tmp_path, small_ckpt):
    d = tmp_path / "c"
    shutil.copytree(small_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nanofast.NanofastError) as e:
        load_engine(d)
    _assert_one_line_error(e, "lm_head.weight")


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
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """transformers' tokenizer, for the released chat template (tokenizer_config.json)."""
    from transformers import AutoTokenizer

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
    assert set(tok.eos_ids) == EOS_IDS


def _stream(tok, ids):
    s = nanofast.StreamDecoder(tok)
    pieces = [s.push(i) for i in ids]
    pieces.append(s.flush())
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
LONG_PROMPT = "word " * 200

# name -> (needs the tokenizer files, strings the error line must contain)
CLI_ERRORS = {
    "missing-model-dir": (False, []),
    "config-not-json": (False, []),
    "wrong-architecture": (False, []),
    "missing-tensor": (True, BROKEN_WEIGHTS["missing-tensor"][1]),
    "unexpected-tensor": (True, BROKEN_WEIGHTS["unexpected-tensor"][1]),
    "misshaped-tensor": (True, BROKEN_WEIGHTS["misshaped-tensor"][1]),
    "truncated-file": (True, []),
    "garbage-file": (True, []),
    "missing-shard": (True, ["model-00002-of-00003.safetensors"]),
    "temperature-negative": (False, []),
    "top-p-zero": (False, []),
    "top-p-above-one": (False, []),
    "top-k-negative": (False, []),
    "max-new-tokens-zero": (False, []),
    "max-seq-len-one": (False, []),
    "dtype-int8": (False, []),
    "device-bogus": (False, []),
    "prompt-file-missing": (False, []),
    "no-prompt": (False, []),
    "prompt-too-long": (True, []),
}


def _cli_error_argv(name, small, sharded, tmp):
    """The argv of one bad-input case, building the broken folder it needs under tmp."""
    m = ["--model", str(small), "--prompt", "hi"]

    def broken_copy(edit, src=small):
        d = tmp / name
        shutil.copytree(src, d)
        edit(d)
        return ["--model", str(d), "--prompt", "hi", *OK]

    def edit_config(change):
        def edit(d):
            if change is None:
                (d / "config.json").write_text("{this is not json")
            else:
                raw = json.loads((d / "config.json").read_text())
                raw.update(change)
                (d / "config.json").write_text(json.dumps(raw))
        return edit

    if name == "missing-model-dir":
        return ["--model", str(tmp / "nowhere"), "--prompt", "hi", *OK]
    if name == "config-not-json":
        return broken_copy(edit_config(None))
    if name == "wrong-architecture":
        return broken_copy(edit_config(dict(model_type="llama", architectures=["LlamaForCausalLM"])))
    if name in BROKEN_WEIGHTS:
        return broken_copy(BROKEN_WEIGHTS[name][0])
    if name == "missing-shard":
        return broken_copy(lambda d: (d / "model-00002-of-00003.safetensors").unlink(), src=sharded)
    flags = {
        "temperature-negative": ["--temperature", "-1"],
        "top-p-zero": ["--top-p", "0"],
        "top-p-above-one": ["--top-p", "1.5"],
        "top-k-negative": ["--top-k", "-1"],
        "max-new-tokens-zero": ["--max-new-tokens", "0"],
        "max-seq-len-one": ["--max-seq-len", "1"],
        "dtype-int8": ["--dtype", "int8"],
        "device-bogus": ["--device", "bogus"],
        "prompt-too-long": ["--prompt", LONG_PROMPT, "--max-seq-len", "64"],
    }
    if name in flags:
        return [*m, *OK, *flags[name]]  # the later flag wins
    if name == "prompt-file-missing":
        return ["--model", str(small), "--prompt-file", str(tmp / "missing.txt"), *OK]
    if name == "no-prompt":
        return ["--model", str(small), *OK]
    raise KeyError(name)


@pytest.fixture(scope="session")
def cli_errors(small_ckpt, sharded_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    jobs = {name: (_cli_error_argv(name, small_ckpt, sharded_small, tmp), None)
            for name, (needs_tok, _) in CLI_ERRORS.items() if QWEN3_FILES is not None or not needs_tok}
    return _run_all(jobs)


@pytest.mark.parametrize("name", list(CLI_ERRORS))
def test_cli_error(cli_errors, name):
    if name not in cli_errors:
        pytest.skip("needs NANOFAST_QWEN3_FILES")
    r = cli_errors[name]
    _assert_cli_error(r.returncode, r.stdout, r.stderr, CLI_ERRORS[name][1])


def _main(argv, capsys):  # nanofast.main in this process -> (exit code, stdout, stderr)
    try:
        rc = nanofast.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name,flags", [
    ("temperature-nan", ["--temperature", "nan"]),
    ("temperature-inf", ["--temperature", "inf"]),
    ("temperature-text", ["--temperature", "hot"]),
    ("top-p-negative", ["--top-p", "-0.5"]),
    ("max-new-tokens-negative", ["--max-new-tokens", "-5"]),
    ("max-seq-len-zero", ["--max-seq-len", "0"]),
    ("dtype-bogus", ["--dtype", "fp8"]),
    ("device-tpu", ["--device", "tpu"]),
    ("device-cuda-index", ["--device", "cuda:99"]),
    ("unknown-flag", ["--frobnicate"]),
])
def test_cli_bad_flags_in_process(small_ckpt, capsys, name, flags):
    rc, out, err = _main(["--model", small_ckpt, "--prompt", "hi", *OK, *flags], capsys)
    _assert_cli_error(rc, out, err)


@pytest.mark.parametrize("name", [n for n in BROKEN_WEIGHTS if n not in CLI_ERRORS])
def test_cli_broken_weights_in_process(tmp_path, small_ckpt, capsys, name):
    if QWEN3_FILES is None:
        pytest.skip("needs NANOFAST_QWEN3_FILES")
    d = _broken_copy(small_ckpt, tmp_path / name, name)
    rc, out, err = _main(["--model", d, "--prompt", "hi", *OK], capsys)
    _assert_cli_error(rc, out, err, BROKEN_WEIGHTS[name][1])


@requires_qwen3_files
@pytest.mark.parametrize("name,args", [
    ("prompt-too-long-raw", ["--raw", "--prompt", "x " * 64, "--max-seq-len", "64"]),
    ("prompt-fills-cache", ["--raw", "--prompt", "Hello world", "--max-seq-len", "2"]),
    ("empty-raw-prompt", ["--raw", "--prompt", ""]),
    ("prompt-and-prompt-file", ["--prompt", "hi", "--prompt-file", __file__]),
    ("prompt-file-is-dir", ["--prompt-file", REPO]),
    ("prompt-file-not-utf8", ["--prompt-file", "NOT_UTF8"]),
])
def test_cli_bad_prompts_in_process(small_ckpt, tmp_path, capsys, name, args):
    if "NOT_UTF8" in args:
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 \xff\xfe".encode("latin-1"))
        args = [tmp_path / "latin1.txt" if a == "NOT_UTF8" else a for a in args]
    rc, out, err = _main(["--model", small_ckpt, *args, *OK], capsys)
    _assert_cli_error(rc, out, err)


def test_cli_help(capsys):
    rc, out, err = _main(["--help"], capsys)
    assert rc == 0
    for opt in ("--model", "--prompt", "--prompt-file", "--system", "--no-think", "--raw", "--max-new-tokens",
                "--temperature", "--top-k", "--top-p", "--seed", "--max-seq-len", "--dtype", "--device",
                "--ignore-eos", "--json", "--plain"):
        assert opt in out, opt


FILE_PROMPT = "line one\nline two 中文 😀\n  indented"
SEEDED = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7", "--ignore-eos"]


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


@requires_qwen3_files
def test_cli_raw_bf16(cli_runs, ref_tok):
    j = _json(cli_runs["raw"])
    assert j["prompt_ids"] == ref_tok.encode("The capital of France is", add_special_tokens=False).ids
    assert 1 <= len(j["generated_ids"]) <= 2


@requires_qwen3_files
def test_cli_seeded_sampling(cli_runs, tok_dir):
    # the CLI passes its sampling flags through: the Python API with the same seed agrees
    j = _json(cli_runs["seeded"])
    assert len(j["generated_ids"]) == 12 and j["stop_reason"] == "max_new_tokens"
    eng = load_engine(tok_dir)
    again = list(eng.generate(j["prompt_ids"], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7))
    assert again == j["generated_ids"]


# -----------------------------------------------------------------------------
# GPU tests (appended by the lead; they use requires_cuda)
