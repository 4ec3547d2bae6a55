"""bench.py: how close nanofast comes to the memory-bandwidth floor, and to transformers.

    python bench.py                                   # Qwen3-0.6B shape, random weights, CUDA
    python bench.py --shape 0.6B,1.7B,4B,8B           # several shapes, one after another
    python bench.py --model weights/Qwen3-0.6B        # a real checkpoint folder instead
    python bench.py --profile                         # plus per-kernel times of one decode step
    python bench.py --baseline /tmp/old/nanofast.py   # plus the same measurements of another version
    python bench.py --fp8                             # plus nanofast.load(..., quantize="fp8")
    python bench.py --shape tiny --device cpu --quick --peers eager   # smoke test, no GPU

At batch size 1 a decode step reads every weight once (lm_head included; a tied embedding counts
once) plus the KV cache of the context, so the floor is bytes per token / copy bandwidth, with the
bandwidth measured in the same run by a large device-to-device copy (bytes read + written). For each
shape it lays out a checkpoint of random bf16 weights under the released tensor names, loads it
through nanofast.load, and measures decode tok/s per context (greedy, no stop ids, median of runs,
time after the first token), sampling overhead, time to first token, startup (first and second load
in the process), and the same for transformers eager and static-cache + torch.compile. It prints a
table, then one line of JSON (the last line of stdout), with the commit and git's blob id of the
nanofast.py measured. --quick numbers are for smoke tests only.

--baseline FILE (another nanofast.py, e.g. an older commit's, imported as a second module) and --fp8
(the same checkpoint loaded with quantize="fp8") add engines held beside the one under test. At each
context, and for the 4096-token time to first token, their runs take turns with its runs (A, B, A,
B, ...), so drift in clocks and temperature hits both alike. Each reports tok/s and the ratio to the
engine under test, fp8 also its own floor (counting fp8 bytes); in the JSON under "baseline" and
"fp8" of each shape. With both, the baseline's fp8 engine runs too, against this fp8 engine (under
"fp8" -> "baseline").
"""
import argparse
import functools
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import nanofast

HERE = os.path.dirname(os.path.abspath(__file__))

# released Qwen3 shapes: hidden, layers, heads, kv heads, head_dim, intermediate, tied
SHAPES = {
    "tiny": (512, 2, 4, 2, 128, 1024, True),  # for smoke tests (GPU-friendly sizes)
    "0.6B": (1024, 28, 16, 8, 128, 3072, True),
    "1.7B": (2048, 28, 16, 8, 128, 6144, True),
    "4B": (2560, 36, 32, 8, 128, 9728, True),
    "8B": (4096, 36, 32, 8, 128, 12288, False),
}
VOCAB = {"tiny": 4096}  # every released shape: 151936
SAMPLING = dict(temperature=0.6, top_k=20, top_p=0.95)  # Qwen3's generation_config.json
TTFT_PROMPTS = (128, 1024, 4096)
AB_TTFT = 4096  # the prompt length at which --baseline and --fp8 compare time to first token
ERRORS = []  # every failed measurement, as "what: error"


def attempt(what, fn, *args, **kwargs):
    """Run one measurement; on any error print it, note it, and return None so the run goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001: a benchmark keeps going
        msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"  FAILED {msg}", flush=True)
        traceback.print_exc(file=sys.stderr)
        ERRORS.append(msg)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_once(fn, device) -> float:
    """Seconds one call of fn takes on the device: CUDA events on a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, spec, scale=1.0, unit=""):
    return "-" if x is None else f"{x * scale if scale != 1 else x:{spec}}{unit}"


# -----------------------------------------------------------------------------
# random checkpoint with the released layout


def config_json(shape: str) -> dict:
    D, L, H, KV, hd, I, tied = SHAPES[shape]
    V = VOCAB.get(shape, 151936)
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": D,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": hd,
            "intermediate_size": I, "tie_word_embeddings": tied, "vocab_size": V,
            "rope_theta": 1000000, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": min(151643, V - 2),
            "eos_token_id": min(151645, V - 1), "torch_dtype": "bfloat16", "use_cache": True, "rope_scaling": None,
            "sliding_window": None, "use_sliding_window": False, "max_window_layers": L}


def write_checkpoint(folder: str, shape: str, device, shard_bytes: int = 5 << 30) -> str:
    """Random bf16 weights, std 1/sqrt(fan_in) (activations stay finite), norms 1; reused if complete."""
    from safetensors.torch import save_file

    c = config_json(shape)
    done = os.path.join(folder, ".complete")
    if os.path.exists(done) and open(done).read() == json.dumps(c, sort_keys=True):
        print(f"  reusing checkpoint {folder}", flush=True)
        return folder
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.endswith((".safetensors", ".json", ".complete")):
            os.remove(os.path.join(folder, f))
    t0 = time.perf_counter()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    cfg = nanofast.load_config(folder)
    shapes = nanofast.checkpoint_shapes(cfg)
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    rank = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}  # layers: 1
    table = sorted(shapes.items(), key=lambda item: rank.get(item[0], 1))  # stable: layers keep their order
    total = sum(2 * torch.Size(s).numel() for _, s in table)
    n_shards = max(1, -(-total // shard_bytes))  # released checkpoints come in shards of a few GB
    shards, cur, size = [], [], 0
    for name, s in table:
        cur.append((name, s))
        size += 2 * torch.Size(s).numel()
        if size >= total / n_shards and len(shards) < n_shards - 1:
            shards, cur, size = shards + [cur], [], 0
    shards = [sh for sh in shards + [cur] if sh]
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.ones(s, dtype=torch.bfloat16, device=device) if len(s) == 1 else  # norms
                          torch.randn(s, generator=gen, dtype=torch.bfloat16, device=device).mul_(s[1] ** -0.5)).cpu()
                   for name, s in shard}
        weight_map.update(dict.fromkeys(tensors, fname))
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(done, "w") as f:
        f.write(json.dumps(c, sort_keys=True))
    print(f"  wrote {total / 1e9:.2f} GB random checkpoint ({len(shards)} file(s)) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


# -----------------------------------------------------------------------------
# the floor: bytes per token and copy bandwidth


def bytes_per_token(cfg, fp8: bool = False) -> tuple:
    """(weight bytes read per decode token, KV bytes per context token).

    A decode step reads every weight once except the embedding, of which it reads one row;
    lm_head is read whole (when tied it is the embedding, so that counts once). Weights are
    bf16, except with fp8 the seven projections of each layer: 1 byte per value plus one
    fp32 scale per 128x128 block. The KV cache is bf16 either way. For the released shapes
    this gives (GB = 1e9 bytes) 1.192, 3.441, 8.045 and 15.137 GB in bf16 for 0.6B, 1.7B,
    4B and 8B, and 0.752, 2.032, 4.413 and 8.193 GB with fp8."""
    weights = 0
    for name, shape in nanofast.checkpoint_shapes(cfg).items():
        if fp8 and name.endswith("_proj.weight"):
            weights += math.prod(shape) + 4 * math.prod(-(-n // 128) for n in shape)
        elif name != "model.embed_tokens.weight":
            weights += 2 * math.prod(shape)
    return weights, 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V


def against_floor(tok_s, nbytes, bw) -> dict:
    """tok/s next to the floor of reading nbytes per token at bw bytes/s."""
    return {"tok_s": tok_s, "bytes_per_token": nbytes, "floor_tok_s": bw / nbytes if bw else None,
            "floor_us": 1e6 * nbytes / bw if bw else None,
            "frac_floor": tok_s * nbytes / bw if bw and tok_s else None}


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + written), median of reps."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = [time_once(lambda: dst.copy_(src), device) for _ in range(reps + 3)][3:]  # 3 warm-up copies
    return 2 * src.numel() * 2 / statistics.median(times)


# -----------------------------------------------------------------------------
# nanofast


def random_prompt(n: int, vocab: int, seed: int = 0) -> list:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def nf_stats(engine, prompt, n, **sampling):
    engine.reset()  # measure a whole prefill: no prefix left in the cache from the last run
    out = list(engine.generate(prompt, max_new_tokens=n, stop_ids=(), seed=0, **sampling))
    if len(out) != n:
        raise RuntimeError(f"generated {len(out)} tokens, expected {n} (stop: {engine.stop_reason})")
    return dict(engine.stats)


def side_by_side(what, engines: dict, prompt, n, runs, key, **sampling) -> tuple:
    """({label: median}, {label: engine.stats[key] of each run}) for a warm-up and then runs rounds
    of n-token generates, the engines taking turns within each round. An engine that fails drops out."""
    values = {}
    for label, engine in engines.items():
        if attempt(f"{what} ({label})", nf_stats, engine, prompt, min(n, 16), **sampling) is not None:
            values[label] = []
    for _ in range(runs):
        for label in list(values):
            s = attempt(f"{what} ({label})", nf_stats, engines[label], prompt, n, **sampling)
            if s is None:
                del values[label]
            else:
                values[label].append(s[key])
    return {label: median(xs) for label, xs in values.items()}, values


def import_baseline(path: str):
    """The load function of another nanofast.py, imported as the module nanofast_baseline."""
    spec = importlib.util.spec_from_file_location("nanofast_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module there
    spec.loader.exec_module(module)
    return module.load


def load_fp8(model_dir, load=None, **kw):
    """load (nanofast.load, or --baseline's) with quantize="fp8", checked to hold fp8 layer weights."""
    engine = (load or nanofast.load)(model_dir, quantize="fp8", **kw)
    # On the CPU (or with sizes not in whole 128-blocks) the projections are dequantized at load:
    # such an engine computes in bf16/fp32 and must not be reported as fp8.
    layer = vars(engine.weights.layers[0]).values()
    if not any(getattr(t, "dtype", None) == torch.float8_e4m3fn for t in layer):
        raise RuntimeError('load(quantize="fp8") returned an engine with no float8_e4m3fn layer weight')
    return engine


def timed_load(load, model_dir, device, **kw) -> tuple:
    t0 = time.perf_counter()
    engine = load(model_dir, device=device, **kw)
    sync(device)
    return engine, time.perf_counter() - t0


def profile_step(engine, vocab, steps=20, replays=200) -> dict | None:
    """Per-kernel times of eager decode steps (decoder.run_step) against one graph replay."""
    dec = getattr(engine, "decoder", None)
    if dec is None or not hasattr(dec, "run_step"):
        print("  profile: engine.decoder.run_step not available (plain path); skipped")
        return None
    from torch.profiler import ProfilerActivity, profile

    nf_stats(engine, random_prompt(128, vocab), 2)  # leaves the decoder at context ~130
    replays = max(0, min(replays, engine.max_seq_len - 140 - steps - 3 - 10))  # each step appends a token
    for _ in range(3):
        dec.run_step()
    sync(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.run_step()
        sync(engine.device)
    agg = {}  # kernel name -> (count, us)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n, us = agg.get(e.name, (0, 0.0))
            agg[e.name] = (n + 1, us + e.time_range.elapsed_us())
    rows = sorted(((k, n / steps, us / steps) for k, (n, us) in agg.items()), key=lambda r: -r[2])
    kernel_us = sum(r[2] for r in rows)
    graph, replay_us = getattr(dec, "graph", None), None
    if graph is not None and replays > 10:
        replay_us = 1e6 * statistics.median([time_once(graph.replay, engine.device) for _ in range(replays)][10:])
    print(f"  profile: {steps} eager steps (decoder.run_step), per step:")
    print(f"    {'kernel':<64} {'count':>6} {'us':>9} {'%':>6}")
    for name, n, us in rows:
        print(f"    {name[:64]:<64} {n:>6.1f} {us:>9.2f} {100 * us / kernel_us:>5.1f}%")
    gaps = f"; difference (launch gaps) {replay_us - kernel_us:.1f} us" if replay_us else ""
    print("    (under programmatic dependent launch kernels overlap, so their sum can exceed the step)")
    print(f"    sum of kernel times {kernel_us:.1f} us/step; graph replay "
          f"{fmt(replay_us, '.1f', 1, ' us')} (median of {max(0, replays - 10)}){gaps}", flush=True)
    return {"kernels": [{"name": k, "count": n, "us": us} for k, n, us in rows],
            "kernel_sum_us": kernel_us, "graph_replay_us": replay_us}


# -----------------------------------------------------------------------------
# transformers peers


def hf_peer(kind, model_dir, device, dtype, vocab, tokens, runs) -> dict:
    """Decode tok/s = (N - N/2) / (t(N tokens) - t(N/2 tokens)), TTFT = t(1 token), all medians.

    The difference of two generate calls cancels each call's fixed costs (prefill, cache
    allocation, CUDA-graph re-recording for a fresh static cache), leaving decode steps."""
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device))
    except Exception as e:  # noqa: BLE001: older or newer loaders; fall back to a plain move
        print(f"  ({kind}: from_pretrained(device_map=...) failed ({str(e)[:60]}...); loading on CPU, then moving)")
        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # ignore eos: always N tokens
    sync(device)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([random_prompt(128, vocab)], device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if kind == "compile":  # transformers 5: a static cache makes generate compile the decode step
        kw["cache_implementation"] = "static"
        try:
            from transformers import CompileConfig
            kw["compile_config"] = CompileConfig(mode="reduce-overhead", fullgraph=False)
        except ImportError:
            pass

    def run(n):
        sync(device)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(f"{kind} generated {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return time.perf_counter() - t

    half = tokens // 2
    t0 = time.perf_counter()
    for n in [tokens] * (3 if kind == "compile" else 1) + [half, 1]:  # compile, record CUDA graphs
        run(n)
    warmup_s = time.perf_counter() - t0
    t1, th, tn = (median([run(n) for _ in range(runs)]) for n in (1, half, tokens))  # in this order
    compiled = getattr(model, "_compiled_call", None) is not None
    del model
    free(device)
    if kind == "compile":
        torch._dynamo.reset()
    return {"decode_tok_s": (tokens - half) / (tn - th), "ttft_s": t1, "load_s": load_s, "warmup_s": warmup_s,
            "tokens": tokens, "runs": runs, "compiled": compiled}


# -----------------------------------------------------------------------------
# one shape


def bench_shape(name, model_dir, device, args, res: dict):
    """Fill res as measurements finish, so a failure part-way keeps what was measured."""
    res["model_dir"] = model_dir
    cfg = nanofast.load_config(model_dir)
    res["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    res["weight_bytes"], res["kv_bytes_per_context_token"] = w_bytes, kv_bytes = bytes_per_token(cfg)
    res["bandwidth_Bps"] = bw = attempt("bandwidth", copy_bandwidth, device,
                                        (1 << 30) if device.type == "cuda" else (256 << 20))
    free(device)
    print(f"  copy bandwidth {fmt(bw, '.2f', 1e-12, ' TB/s')}; weights read per token "
          f"{w_bytes / 1e9:.3f} GB; KV {kv_bytes:,} B per context token", flush=True)
    contexts = args.contexts_for(name, cfg)
    base = str(128 if 128 in contexts else contexts[0])  # the prompt length that sampling and peers use
    attempt(f"{name} nanofast", bench_nanofast, name, model_dir, device, args, cfg, contexts, base, res)
    free(device)

    res["peers"], res["ratios"] = {}, {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as nanofast picks
    nf_tok_s, nf_ttft_s = res.get("decode", {}).get(base, {}).get("tok_s"), res.get("ttft_s", {}).get("128")
    for kind in args.peers_for(name):
        p = attempt(f"{name} peer {kind}", hf_peer, kind, model_dir, device, dtype, cfg.vocab_size,
                    args.peer_tokens, args.peer_runs)
        free(device)
        if p is not None:
            res["peers"][kind] = p
            res["ratios"][kind] = {"decode": ratio(nf_tok_s, p["decode_tok_s"]),
                                   "ttft": ratio(p["ttft_s"], nf_ttft_s)}


def ab_decode(tok_s, runs, old, new):
    """An A/B entry of one context: engine new against engine old (keys of tok_s and runs)."""
    a, b = tok_s.get(old), tok_s.get(new)
    return {"baseline_tok_s": a, "new_tok_s": b, "ratio": ratio(b, a), "baseline_runs": runs[old]}


def ab_ttft(prompt, old, new):
    return {"prompt": prompt, "baseline": old, "new": new, "ratio": ratio(new, old)}


def bench_nanofast(name, model_dir, device, args, cfg, contexts, base, res):
    """nanofast.load's engine ("new"), and beside it those of --baseline and --fp8, runs taking turns."""
    T, V, (w_bytes, kv_bytes), bw = args.tokens, cfg.vocab_size, bytes_per_token(cfg), res["bandwidth_Bps"]
    max_seq_len = max(contexts + list(TTFT_PROMPTS)) + T + 512  # 512: room for --profile's extra steps
    kw = dict(max_seq_len=max_seq_len, fast=False if args.plain else None)
    res["startup_s"] = st = {}
    engine, st["first"] = timed_load(nanofast.load, model_dir, device, **kw)  # cold: JIT and capture caches
    engine = None
    free(device)
    engine, st["second"] = timed_load(nanofast.load, model_dir, device, **kw)
    res["path"] = "fast" if engine.fast else "plain"
    print(f"  nanofast {res['path']} path, {engine.dtype}, max_seq_len {max_seq_len}; startup (load + capture): "
          f"first {st['first']:.2f} s, second {st['second']:.2f} s", flush=True)

    engines = {"new": engine}  # and the versions compared with it, all loaded at once
    if args.baseline:
        res["baseline"] = {"file": args.baseline, "decode": {}}
    if args.fp8:
        res["fp8"] = {"weight_bytes": bytes_per_token(cfg, fp8=True)[0], "decode": {}}
    load_old8 = args.fp8 and args.baseline_load  # --baseline and --fp8: the baseline's fp8 engine too
    if load_old8:
        res["fp8"]["baseline"] = {"decode": {}}
    for label, load, out in (("baseline", args.baseline_load, res.get("baseline")),
                             ("fp8", args.fp8 and load_fp8, res.get("fp8")),
                             ("baseline_fp8", load_old8 and functools.partial(load_fp8, load=load_old8),
                              res.get("fp8", {}).get("baseline"))):
        if load:  # baseline_load is None without --baseline, or when its import failed (noted in ERRORS)
            got = attempt(f"{name} {label} load", timed_load, load, model_dir, device, **kw)
            if got:
                engines[label], out["load_s"] = got
                print(f"  {label} loaded in {got[1]:.2f} s", flush=True)
            free(device)

    res["decode"] = dec = {}
    for ctx in contexts:
        tok_s, runs = side_by_side(f"{name} decode ctx {ctx}", engines, random_prompt(ctx, V), T, args.runs,
                                   "decode_tok_s")
        c, new, kv = str(ctx), tok_s.get("new"), kv_bytes * (ctx + T / 2)  # KV at the decode's mean context
        if "new" in runs:
            dec[c] = {**against_floor(new, w_bytes + kv, bw), "runs": runs["new"]}
        if "baseline" in runs:
            res["baseline"]["decode"][c] = ab_decode(tok_s, runs, "baseline", "new")
        if "fp8" in runs:
            f8 = tok_s["fp8"]
            res["fp8"]["decode"][c] = {**against_floor(f8, res["fp8"]["weight_bytes"] + kv, bw),
                                       "runs": runs["fp8"], "bf16_tok_s": new, "ratio": ratio(f8, new)}
            if "baseline_fp8" in runs:
                res["fp8"]["baseline"]["decode"][c] = ab_decode(tok_s, runs, "baseline_fp8", "fp8")
        print(f"  decode ctx {ctx}: " + ", ".join(f"{label} {fmt(t, '.1f')} tok/s" for label, t in tok_s.items()),
              flush=True)
    tok_s, runs = side_by_side(f"{name} sampling", {"new": engine}, random_prompt(int(base), V), T, args.runs,
                               "decode_tok_s", **SAMPLING)
    res["sampling"] = s = {"tok_s": tok_s["new"], "runs": runs["new"]} if runs.get("new") else None
    if s and s["tok_s"] and dec.get(base, {}).get("tok_s"):
        s["overhead_pct"] = 100 * (dec[base]["tok_s"] / s["tok_s"] - 1)  # extra time per token
    res["ttft_s"] = {}
    for p in TTFT_PROMPTS:
        ttft, _ = side_by_side(f"{name} ttft {p}", engines if p == AB_TTFT else {"new": engine},
                               random_prompt(p, V), 1, args.runs, "ttft_s")
        res["ttft_s"][str(p)] = new = ttft.get("new")
        f8 = ttft.get("fp8")
        if p == AB_TTFT and "baseline" in res:
            res["baseline"]["ttft_s"] = ab_ttft(p, ttft.get("baseline"), new)
        if p == AB_TTFT and "fp8" in res:
            res["fp8"]["ttft_s"] = {"prompt": p, "bf16": new, "fp8": f8, "ratio": ratio(f8, new)}
        if p == AB_TTFT and "baseline" in res.get("fp8", {}):
            res["fp8"]["baseline"]["ttft_s"] = ab_ttft(p, ttft.get("baseline_fp8"), f8)
    if args.profile:
        res["profile"] = attempt(f"{name} profile", profile_step, engine, V)


# -----------------------------------------------------------------------------
# the table


def print_rows(rows: dict, *cols, first="context", align=">8"):
    """A header, then a line per row (label: results); a column is (title, width, key, format spec[,
    scale, unit]), a missing value "-"."""
    print(f"  {first:{align}} " + " ".join(f"{title:>{width}}" for title, width, *_ in cols))
    for label, d in rows.items():
        print(f"  {label:{align}} " + " ".join(f"{fmt(d.get(key), *spec):>{width}}" for _, width, key, *spec in cols))


def print_ab(r, title, a, b, *cols):
    """A --baseline or --fp8 block: title, decode table (cols, then the ratio b/a), TTFT of a and b."""
    print(title)
    print_rows(r["decode"], *cols, (f"{b}/{a}", len(f"{b}/{a}") + 1, "ratio", ".3f", 1, "x"))
    if not r["decode"]:
        print("  (not measured: see the failures below)")
    t = r.get("ttft_s") or {}
    print(f"  time to first token, {AB_TTFT} tokens: {a} {fmt(t.get(a), '.2f', 1e3, ' ms')}, "
          f"{b} {fmt(t.get(b), '.2f', 1e3, ' ms')} ({b}/{a} {fmt(t.get('ratio'), '.3f', 1, 'x')})")


def print_table(name, r, args):
    print(f"\n== Qwen3-{name} ({r.get('model_dir')}): nanofast {r.get('path', '?')} path ==")
    print(f"copy bandwidth {fmt(r.get('bandwidth_Bps'), '.2f', 1e-12, ' TB/s')}; weights read per token "
          f"{fmt(r.get('weight_bytes'), '.3f', 1e-9, ' GB')}; KV {fmt(r.get('kv_bytes_per_context_token'), ',')} "
          "B per context token")
    st = r.get("startup_s", {})
    print(f"startup (nanofast.load, incl. capture): first {fmt(st.get('first'), '.2f', 1, ' s')}, "
          f"second {fmt(st.get('second'), '.2f', 1, ' s')}")
    gb, floor_tok_s = ("GB/token", 9, "bytes_per_token", ".3f", 1e-9), ("floor tok/s", 12, "floor_tok_s", ".0f")
    tok_s, of_floor = ("tok/s", 9, "tok_s", ".1f"), ("of floor", 9, "frac_floor", ".1%")
    print(f"decode, greedy, {args.tokens} tokens, median of {args.runs} (floor: KV at prompt + {args.tokens}/2):")
    print_rows(r.get("decode", {}), gb, ("floor us", 9, "floor_us", ".1f"), floor_tok_s, tok_s, of_floor)
    ab_cols = ("baseline tok/s", 15, "baseline_tok_s", ".1f"), ("new tok/s", 10, "new_tok_s", ".1f")
    if "baseline" in r:
        print_ab(r["baseline"], f"A/B against baseline {r['baseline']['file']} (same process, runs taking turns, "
                 f"median of {args.runs}):", "baseline", "new", *ab_cols)
    if "fp8" in r:
        print_ab(r["fp8"], f"fp8 projections (quantize=\"fp8\"; runs taking turns with bf16, median of {args.runs}; "
                 f"weights read per token {r['fp8']['weight_bytes'] / 1e9:.3f} GB):", "bf16", "fp8",
                 gb, floor_tok_s, tok_s, of_floor, ("bf16 tok/s", 11, "bf16_tok_s", ".1f"))
        if "baseline" in r["fp8"]:
            print_ab(r["fp8"]["baseline"], "fp8 A/B against the baseline's fp8 (same process, runs taking turns, "
                     f"median of {args.runs}):", "baseline", "new", *ab_cols)
    s = r.get("sampling") or {}
    print(f"sampling (t 0.6, top-k 20, top-p 0.95): {fmt(s.get('tok_s'), '.1f', 1, ' tok/s')}, "
          f"{fmt(s.get('overhead_pct'), '+.1f', 1, '%')} time per token vs greedy")
    print("time to first token: " + ", ".join(f"{p} tokens {fmt(t, '.2f', 1e3, ' ms')}"
                                              for p, t in r.get("ttft_s", {}).items()))
    prof = r.get("profile")
    if prof:
        print(f"profile: kernels {prof['kernel_sum_us']:.1f} us per eager step, graph replay "
              f"{fmt(prof['graph_replay_us'], '.1f', 1, ' us')} (kernel table above)")
    peers = r.get("peers", {})
    if peers:
        print(f"transformers peers (prompt 128, {args.peer_tokens} tokens, median of {args.peer_runs}; "
              "decode = (N-N/2)/(t(N)-t(N/2))):")
        print_rows({kind + ("(!)" if kind == "compile" and not p["compiled"] else ""): {**p, **r["ratios"][kind]}
                    for kind, p in peers.items()}, ("tok/s", 8, "decode_tok_s", ".1f"),
                   ("TTFT ms", 8, "ttft_s", ".2f", 1e3), ("load s", 7, "load_s", ".2f"),
                   ("warm-up s", 9, "warmup_s", ".2f"), ("nanofast x tok/s", 17, "decode", ".2f", 1, "x"),
                   ("x TTFT", 7, "ttft", ".2f", 1, "x"), first="peer", align="<9")
        if "compile" in peers and not peers["compile"]["compiled"]:
            print("  (!) generate did not compile (static cache only; compile runs on CUDA)")


# -----------------------------------------------------------------------------
# main


def versions() -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("triton", "flashinfer", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001: missing or broken: record None
            v[mod] = None
    return v


def git_commit():
    """The short commit, +dirty if nanofast.py differs from it; None outside a git checkout."""
    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        sha = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = sha and git("diff", "--quiet", "HEAD", "--", "nanofast.py").returncode != 0
        return sha + ("+dirty" if dirty else "") if sha else None
    except Exception:  # noqa: BLE001
        return None


def blob_id(path):
    """git's id for the file's content (what `git hash-object` prints, and `git rev-parse COMMIT:nanofast.py`
    for a commit's copy): names the nanofast.py measured even where the checkout's git metadata is stale."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark nanofast against the bandwidth floor and transformers.")
    add = p.add_argument
    add("--shape", default="0.6B", help=f"comma-separated shapes of {list(SHAPES)} (default 0.6B)")
    add("--model", help="benchmark this checkpoint folder instead of a random one (--shape ignored)")
    add("--device", help="cuda, cuda:N or cpu (default cuda if available)")
    add("--plain", action="store_true", help="force nanofast's plain-torch path")
    add("--tokens", type=int, default=256, help="new tokens per decode run (default 256, min 256)")
    add("--runs", type=int, default=5, help="runs per measurement, median reported (default 5, min 5)")
    add("--contexts", help="prompt lengths for decode, e.g. 128,4096 (default 128,4096,32768 for 0.6B, "
        "128 for larger shapes)")
    add("--peers", help="transformers peers: eager,compile or none (default eager,compile for 0.6B only)")
    add("--peer-tokens", type=int, default=128, help="new tokens per peer run (default 128)")
    add("--peer-runs", type=int, default=3, help="runs per peer measurement (default 3)")
    add("--profile", action="store_true", help="per-kernel times of one decode step")
    add("--baseline", metavar="FILE", help="another nanofast.py (e.g. an older commit's) to measure in the same run, "
        f"runs taking turns: decode tok/s per context and {AB_TTFT}-token TTFT, with ratios new/baseline")
    add("--fp8", action="store_true", help='also load with nanofast.load(..., quantize="fp8") and measure it in the '
        "same run, runs taking turns with bf16: decode tok/s per context against its own floor (fp8 bytes), and "
        f"{AB_TTFT}-token TTFT, with ratios fp8/bf16; with --baseline, the baseline's fp8 engine too "
        "(ratios new/baseline)")
    add("--cache-dir", default=os.path.join(tempfile.gettempdir(), "nanofast-bench"),
        help="where random checkpoints are written and reused (default: TMP/nanofast-bench)")
    add("--out", help="also write the JSON to this file")
    add("--quick", action="store_true", help="few tokens and runs: smoke tests only, not for claims")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.runs, a.peer_tokens, a.peer_runs = 32, 2, 16, 2
    elif a.tokens < 256 or a.runs < 5:
        print("note: raising --tokens to >= 256 and --runs to >= 5 (use --quick for smoke tests)", file=sys.stderr)
        a.tokens, a.runs = max(a.tokens, 256), max(a.runs, 5)
    shapes = list(dict.fromkeys(s.strip() for s in a.shape.split(",") if s.strip()))
    bad = [s for s in shapes if s not in SHAPES]
    if bad and not a.model:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    if a.baseline and not os.path.isfile(a.baseline):
        p.error(f"--baseline: no such file {a.baseline}")
    a.baseline = a.baseline and os.path.abspath(a.baseline)
    a.shapes = [os.path.basename(os.path.normpath(a.model)).removeprefix("Qwen3-")] if a.model else shapes
    a.contexts_for = lambda name, cfg: [int(x) for x in a.contexts.split(",") if x.strip()] if a.contexts else (
        [128, 4096, 32768] if (cfg.hidden_size, cfg.num_layers) == (1024, 28) else
        [128, 512] if name == "tiny" else [128])
    a.peers_for = lambda name: ([k for k in a.peers.split(",") if k and k != "none"] if a.peers is not None
                                else ["eager", "compile"] if name in ("0.6B", "tiny") else [])
    if any(k not in ("eager", "compile") for k in a.peers_for("0.6B")):
        p.error("--peers takes eager, compile or none")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = nanofast.pick_device(args.device)
    if args.fp8 and device.type != "cuda":
        sys.exit("bench.py: --fp8 measures the fp8 GPU kernels; on the CPU the projections are dequantized at load")
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "versions": versions(), "commit": git_commit(), "nanofast_blob": blob_id(nanofast.__file__),
           "baseline_blob": args.baseline and blob_id(args.baseline), **{k: getattr(args, k) for k in (
               "quick", "plain", "tokens", "runs", "peer_tokens", "peer_runs", "baseline", "fp8")},
           "shapes": {}, "errors": ERRORS}
    print(f"bench: {out['device']}; {out['versions']}; commit {out['commit']} (nanofast.py {out['nanofast_blob'][:12]})"
          + ("; QUICK: not for claims" if args.quick else ""), flush=True)
    args.baseline_load = args.baseline and attempt("baseline import", import_baseline, args.baseline)
    try:
        for name in args.shapes:
            print(f"\n-- {name} --", flush=True)
            model_dir = args.model or attempt(f"{name} checkpoint", write_checkpoint,
                                              os.path.join(args.cache_dir, f"Qwen3-{name}"), name, device)
            if model_dir:
                attempt(name, bench_shape, name, model_dir, device, args, out["shapes"].setdefault(name, {}))
            free(device)
        for name, r in out["shapes"].items():
            attempt(f"{name} table", print_table, name, r, args)
        if ERRORS:
            print(f"\n{len(ERRORS)} measurement(s) failed:\n  " + "\n  ".join(ERRORS))
    finally:
        line = json.dumps(out, default=str)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
        print(line, flush=True)
    return 1 if ERRORS else 0


if __name__ == "__main__":
    sys.exit(main())
