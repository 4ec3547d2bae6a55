"""bench.py: how close nanofast comes to the memory-bandwidth floor, and to transformers.

    python bench.py                                   # Qwen3-0.6B shape, random weights, CUDA
    python bench.py --shape 0.6B,1.7B,4B,8B           # several shapes, one after another
    python bench.py --model weights/Qwen3-0.6B        # a real checkpoint folder instead
    python bench.py --profile                         # plus per-kernel times of one decode step
    python bench.py --baseline /tmp/old/nanofast.py   # plus the same measurements of another version
    python bench.py --fp8                             # plus nanofast.load(..., quantize="fp8")
    python bench.py --shape tiny --device cpu --quick --peers eager   # smoke test, no GPU

At batch size 1 a decode step reads every weight once plus the KV cache of the context and does
little else, so its floor is those bytes over the GPU's read bandwidth; "of floor" is the floor's
time over the measured time. The bytes are summed from the loaded engine's own tensors: every
layer's matrices in the format they are kept in (fp8 with their block scales, or bf16), its norms,
the final norm, lm_head whole (once, when tied to the embedding) and one embedding row, plus the
KV bytes of the context. So bf16, an fp8 checkpoint and quantize="fp8" each get their own floor.
The bandwidth is the best of several streaming reads of a buffer far larger than L2 (torch.sum and
a Triton read kernel), measured in the same run; beside it the table gives a device copy's
bandwidth (bytes read + written) and the GPU's datasheet figure.

For each shape it lays out a checkpoint of random bf16 weights under the released tensor names,
loads it through nanofast.load, and measures decode tok/s per context (greedy, no stop ids, time
after the first token), sampling overhead, time to first token and startup (first and second load
in the process). Then transformers, three ways (--peers), at a 128- and a 4096-token prompt:
"loop", a static cache and one compiled greedy step (forward + argmax, fullgraph=True, CUDA graphs)
called in a plain Python loop, as gpt-fast does it, the fastest way transformers allows at batch
size 1; "generate", generate() with a static cache, which compiles its forward; "eager", generate()
as it comes. Graph breaks are counted and reported. Every figure is a median of runs, with their
min-max. It prints a table, then one line of JSON (the last line of stdout), with the commit and
git's blob id of the nanofast.py measured. --quick numbers are for smoke tests only.

--baseline FILE (another nanofast.py, e.g. an older commit's, imported as a second module) and --fp8
(the same checkpoint loaded with quantize="fp8") add engines held beside the one under test. At each
context, and for the 4096-token time to first token, their runs take turns with its runs in ABBA
order (A B, B A, A B, ...), so drift in clocks and temperature hits both alike. Each reports tok/s
and its ratio to the engine under test: the median of the per-round ratios, with their min-max. fp8
also gets its own floor. In the JSON under "baseline" and "fp8" of each shape. With both, the
baseline's fp8 engine runs too, against this fp8 engine (under "fp8" -> "baseline").
"""
import argparse
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import nanofast
from nanofast import tl, triton  # the real modules, or nanofast's stand-ins where Triton is missing

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
PEERS = {  # --peers: how each runs transformers (the order they run and print in)
    "loop": 'static cache; one greedy step (forward + argmax) under torch.compile(mode="reduce-overhead", '
            "fullgraph=True), called in a plain Python loop, tokens left on the GPU",
    "generate": 'generate(cache_implementation="static"), which compiles its forward (reduce-overhead); '
                "decode = (N - N/2) / (t(N) - t(N/2))",
    "eager": "generate() as it comes (dynamic cache, no compile); decode as for generate",
}
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


def spread(xs):
    """[min, max] of the values, or None."""
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def ratio(a, b):
    return a / b if a and b else None


def ab(runs: dict, a, b, names) -> dict:
    """Engine b against engine a (labels in runs, whose round i ran back to back): each one's median
    and min-max under names, and the median and min-max of the per-round ratios b/a."""
    (name_a, name_b), xa, xb = names, runs[a], runs[b]
    rs = [ratio(y, x) for x, y in zip(xa, xb)]
    return {name_a: median(xa), name_a + "_spread": spread(xa), name_b: median(xb), name_b + "_spread": spread(xb),
            "ratio": median(rs), "ratio_spread": spread(rs)}


def fmt(x, spec, scale=1.0, unit=""):
    """x, or each of a [min, max] pair joined by "-", with the format spec; "-" if missing."""
    if isinstance(x, (list, tuple)):
        return "-".join(fmt(v, spec, scale) for v in x) + unit
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
# the floor: bytes read per token, over the read bandwidth

# memory bandwidth on the datasheet, TB/s, by a piece of torch.cuda.get_device_name (first match wins)
DATASHEET_TBPS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("GH200", None), ("H200", 4.8),
                  ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864))
READ_TILES = ((4096, 4, 4), (4096, 16, 8), (8192, 8, 8), (2048, 32, 4))  # read kernel: BLOCK, TILES, warps


def bytes_per_token(engine) -> tuple:
    """(weight bytes a decode step reads, KV bytes per context token), from the engine's own tensors.

    A step reads every tensor of every layer (the matrices in the format they are kept in, fp8
    block scales, norms), the final norm, lm_head whole and one row of the embedding; when lm_head
    is the embedding (tied), that tensor counts once. For the released shapes in bf16 this is
    1.192, 3.441, 8.045 and 15.137 GB (GB = 1e9 bytes) for 0.6B, 1.7B, 4B and 8B; with fp8
    projections and fp32 block scales 0.752, 2.032, 4.413 and 8.193 GB."""
    w, cfg = engine.weights, engine.cfg
    seen, total = set(), 0
    for t in [t for layer in w.layers for f in vars(layer).values() for t in tensors(f)] + tensors(w.norm) + tensors(w.lm_head):
        if (t.data_ptr(), t.nbytes) not in seen:
            seen.add((t.data_ptr(), t.nbytes))
            total += t.nbytes
    if (w.embed.data_ptr(), w.embed.nbytes) not in seen:  # untied: the token's row of the embedding
        total += w.embed[0].nbytes
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.cache.data.element_size()  # K and V
    return total, kv


def against_floor(tok_s, nbytes, bw) -> dict:
    """tok/s next to the floor of reading nbytes per token at bw bytes/s."""
    return {"tok_s": tok_s, "bytes_per_token": nbytes, "floor_tok_s": bw / nbytes if bw else None,
            "floor_us": 1e6 * nbytes / bw if bw else None,
            "frac_floor": tok_s * nbytes / bw if bw and tok_s else None}


@triton.jit
def _read_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Program p sums its TILES x BLOCK consecutive fp32 values: a streaming read, almost no arithmetic."""
    start = tl.program_id(0).to(tl.int64) * (BLOCK * TILES)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(TILES):
        acc += tl.load(x_ptr + start + t * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def best_bandwidth(fn, nbytes, device, reps=10) -> float:
    """Bytes/s of the fastest of reps calls of fn, which moves nbytes, after 3 warm-up calls."""
    return nbytes / min([time_once(fn, device) for _ in range(reps + 3)][3:])


def read_bandwidth(device, nbytes) -> dict:
    """The fastest streaming read of an nbytes fp32 buffer, by torch.sum and (CUDA) the Triton read
    kernel at each of READ_TILES: {"Bps": best, "kernel": its name, "by_kernel": {name: Bps}}."""
    x = torch.rand(nbytes // 4, device=device)
    by_kernel = {"torch.sum": best_bandwidth(x.sum, x.nbytes, device)}
    if device.type == "cuda" and nanofast.HAVE_TRITON:
        for block, tiles, warps in READ_TILES:
            grid = x.numel() // (block * tiles)
            out = torch.empty(grid, device=device)
            launch = functools.partial(_read_kernel[(grid,)], x, out, BLOCK=block, TILES=tiles, num_warps=warps)
            name = f"triton {block}x{tiles} {warps}w"
            bw = attempt(f"read kernel {name}", best_bandwidth, launch, grid * block * tiles * 4, device)
            if bw:
                by_kernel[name] = bw
    best = max(by_kernel, key=by_kernel.get)
    return {"Bps": by_kernel[best], "kernel": best, "by_kernel": by_kernel}


def copy_bandwidth(device, nbytes) -> float:
    """Bytes/s of the fastest device-to-device copy of nbytes (counting bytes read + written: 2 nbytes)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return best_bandwidth(lambda: dst.copy_(src), 2 * src.nbytes, device)


def datasheet_bandwidth(device):
    """Bytes/s the GPU's datasheet states, or None where DATASHEET_TBPS does not know it."""
    name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
    tbps = next((tbps for key, tbps in DATASHEET_TBPS if key.lower() in name), None)
    return tbps and tbps * 1e12


def measure_bandwidth(device) -> dict:
    """The read bandwidth (the floor's), a copy's and the datasheet's, in bytes/s; buffers of 2 GiB
    read and 1 GiB copied on a GPU (L2 is at most tens of MB), a few hundred MB on the CPU."""
    gpu = device.type == "cuda"
    b = {"read": attempt("read bandwidth", read_bandwidth, device, (2 << 30) if gpu else (256 << 20))}
    free(device)
    b["copy_Bps"] = attempt("copy bandwidth", copy_bandwidth, device, (1 << 30) if gpu else (128 << 20))
    free(device)
    b["datasheet_Bps"] = datasheet_bandwidth(device)
    b["read_Bps"] = b["read"] and b["read"]["Bps"]
    return b


def bandwidth_line(b) -> str:
    read = b.get("read") or {}
    return (f"read bandwidth {fmt(read.get('Bps'), '.2f', 1e-12, ' TB/s')} (best: {read.get('kernel', '-')}; "
            f"torch.sum {fmt(read.get('by_kernel', {}).get('torch.sum'), '.2f', 1e-12, ' TB/s')}), copy "
            f"{fmt(b.get('copy_Bps'), '.2f', 1e-12, ' TB/s')} (read + written), datasheet "
            f"{fmt(b.get('datasheet_Bps'), '.2f', 1e-12, ' TB/s') if b.get('datasheet_Bps') else 'unknown'}")


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


def side_by_side(what, engines: dict, prompt, n, runs, key, **sampling) -> dict:
    """{label: [engine.stats[key] of each round]} for a warm-up and then runs rounds of n-token
    generates. The engines take turns in ABBA order (each round runs them in the reverse order of
    the round before), so drift hits them alike and round i of every engine ran back to back.
    An engine that fails drops out."""
    values = {}
    for label, engine in engines.items():
        if attempt(f"{what} ({label})", nf_stats, engine, prompt, min(n, 16), **sampling) is not None:
            values[label] = []
    for r in range(runs):
        for label in list(values)[::-1 if r % 2 else 1]:
            s = attempt(f"{what} ({label})", nf_stats, engines[label], prompt, n, **sampling)
            if s is None:
                del values[label]
            else:
                values[label].append(s[key])
    return values


def import_baseline(path: str):
    """The load function of another nanofast.py, imported as the module nanofast_baseline."""
    spec = importlib.util.spec_from_file_location("nanofast_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module there
    spec.loader.exec_module(module)
    return module.load


def tensors(field) -> list:
    """The tensors of a weight field: a tensor, or a projection with its fp8 block scales (nanofast.Proj;
    a baseline nanofast.py may hold plain tensors)."""
    if isinstance(field, torch.Tensor):
        return [field]
    return [t for t in (getattr(field, "weight", None), getattr(field, "scale", None)) if isinstance(t, torch.Tensor)]


def load_fp8(model_dir, load=None, **kw):
    """load (nanofast.load, or --baseline's) with quantize="fp8", checked to hold fp8 layer weights."""
    engine = (load or nanofast.load)(model_dir, quantize="fp8", **kw)
    # On the CPU (or with sizes not in whole 128-blocks) the projections are dequantized at load:
    # such an engine computes in bf16/fp32 and must not be reported as fp8.
    layer = [t for f in vars(engine.weights.layers[0]).values() for t in tensors(f)]
    if not any(t.dtype == torch.float8_e4m3fn for t in layer):
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


def load_hf(model_dir, device) -> tuple:
    """(transformers' Qwen3ForCausalLM in nanofast's dtype: bf16 on a GPU, fp32 on the CPU; seconds)."""
    import transformers

    transformers.logging.set_verbosity_error()  # graph breaks are counted (compile_counters), not read from the log
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    try:
        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device))
    except Exception as e:  # noqa: BLE001: older or newer loaders; fall back to a plain move
        print(f"  (from_pretrained(device_map=...) failed ({str(e)[:60]}...); loading on CPU, then moving)")
        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # ignore eos: always N tokens
    sync(device)
    return model, time.perf_counter() - t0


def compile_counters() -> dict:
    """What torch.compile reported since counters.clear(): graph breaks (and the first reasons), graphs
    compiled, and CUDA graphs skipped (each such graph launches its kernels one by one instead)."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"graph_breaks": sum(breaks.values()), "break_reasons": [r[:300] for r in breaks][:5],
            "graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def peer_loop(model, kind, device, vocab, prompt_len, tokens, runs) -> dict:
    """transformers run as gpt-fast runs a model: a StaticCache sized prompt + tokens, an eager prefill,
    then tokens - 1 calls of one compiled greedy step in a plain Python loop. The tokens stay on the
    device; the host waits only at the end. Decode tok/s = (tokens - 1) / time after the first token.
    torch.compile gets fullgraph=True; should that fail, fullgraph=False, and the error and the breaks
    are reported. same_as_eager: how many of the first 8 tokens the uncompiled step also produces."""
    import transformers
    from torch._dynamo.utils import counters

    ids = torch.tensor([random_prompt(prompt_len, vocab)], device=device)
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt_len + tokens)
    # forward takes the cache as past_key_values in transformers 5.17, as cache in 5.24
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(token):  # (1, 1) -> (1, 1): the next token, greedy
        logits = model(input_ids=token, use_cache=True, **{name: cache}).logits
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    def run(step_fn, n):  # -> seconds to the first token, decode tok/s, the n tokens (1, n)
        cache.reset()
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache}).logits
            out = [logits[:, -1].argmax(dim=-1, keepdim=True)]
            sync(device)
            t1 = time.perf_counter()
            for _ in range(n - 1):
                torch.compiler.cudagraph_mark_step_begin()
                out.append(step_fn(out[-1]).clone())  # clone: the next replay overwrites the graph's output
            sync(device)
            return t1 - t0, (n - 1) / (time.perf_counter() - t1), torch.cat(out, dim=1)

    info, explained = {"fullgraph": True, "cache_kwarg": name}, {}
    t0 = time.perf_counter()
    for fullgraph in (True, False):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
        try:
            for _ in range(2):  # compile, then record the CUDA graph
                run(compiled, tokens)
            break
        except Exception as e:  # noqa: BLE001: a graph break under fullgraph=True, most likely
            if not fullgraph:
                raise
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            info.update(fullgraph=False, fullgraph_error=error)
            print(f"  loop: fullgraph=True failed ({error}); counting the breaks, then fullgraph=False", flush=True)
            cache.reset()
            with torch.no_grad():  # explain traces the step into its graphs: breaks = graphs - 1
                ex = torch._dynamo.explain(step)(ids[:, :1])
            explained = {"graph_breaks": ex.graph_break_count,
                         "break_reasons": [str(getattr(r, "reason", r))[:300] for r in ex.break_reasons][:5]}
    info["compile_s"] = time.perf_counter() - t0
    info.update({**compile_counters(), **explained})
    ttft, decode = [], []
    for _ in range(runs):
        t, d, out = run(compiled, tokens)
        ttft.append(t)
        decode.append(d)
    n = min(8, tokens)
    info["same_as_eager"] = int((run(step, n)[2] == out[:, :n]).long().cumprod(dim=1).sum())
    return {"decode_tok_s": median(decode), "decode_spread": spread(decode), "decode_runs": decode,
            "ttft_s": median(ttft), "ttft_spread": spread(ttft), "tokens": tokens, "runs": runs, "compiled": True,
            **info}


def peer_generate(model, kind, device, vocab, prompt_len, tokens, runs) -> dict:
    """generate(): "generate" with a static cache, which makes it compile the forward (reduce-overhead),
    or "eager". Each round times 1, N/2 and N new tokens: decode tok/s = (N - N/2) / (t(N) - t(N/2)),
    which cancels each call's fixed costs (prefill, cache allocation, re-recording CUDA graphs for the
    fresh static cache of each call), and time to first token = t(1)."""
    from torch._dynamo.utils import counters

    ids = torch.tensor([random_prompt(prompt_len, vocab)], device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if kind == "generate":
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
    torch._dynamo.reset()  # each prompt length compiles afresh, with static shapes
    counters.clear()
    t0 = time.perf_counter()
    for n in [tokens] * 3 + [half, 1] if kind == "generate" else [2]:  # compile, record CUDA graphs
        run(n)
    info = {"compile_s": time.perf_counter() - t0} if kind == "generate" else {}
    rounds = [[run(n) for n in (1, half, tokens)] for _ in range(runs)]
    decode = [(tokens - half) / (tn - th) if tn > th else None for _, th, tn in rounds]
    ttft = [t1 for t1, _, _ in rounds]
    if kind == "generate":
        info.update(compile_counters(), compiled=getattr(model, "_compiled_call", None) is not None)
    return {"decode_tok_s": median(decode), "decode_spread": spread(decode), "decode_runs": decode,
            "ttft_s": median(ttft), "ttft_spread": spread(ttft), "tokens": tokens, "runs": runs, **info}


def bench_peer(name, kind, model_dir, device, vocab, prompts, args, res):
    """One transformers peer, loaded once, at each prompt length (shortest first); each entry set against
    nanofast's floor and against its decode and time to first token at the same prompt length."""
    model, load_s = load_hf(model_dir, device)
    out = res["peers"][kind] = {"load_s": load_s, "prompts": {}}
    N, bw, w_bytes, kv_bytes = (args.peer_tokens, res.get("bandwidth_Bps"), res.get("weight_bytes"),
                                res.get("kv_bytes_per_context_token"))
    try:
        for p in sorted(prompts):
            r = attempt(f"{name} peer {kind} prompt {p}", peer_loop if kind == "loop" else peer_generate,
                        model, kind, device, vocab, p, N, args.peer_runs)
            free(device)
            if r is None:
                continue
            if w_bytes:  # the floor nanofast's engine has, with the KV bytes at the decode's mean context
                r["frac_floor"] = against_floor(r["decode_tok_s"], w_bytes + kv_bytes * (p + N / 2), bw)["frac_floor"]
            r["nanofast_x"] = ratio(res.get("decode", {}).get(str(p), {}).get("tok_s"), r["decode_tok_s"])
            r["nanofast_x_ttft"] = ratio(r["ttft_s"], res.get("ttft_s", {}).get(str(p)))
            out["prompts"][str(p)] = r
            print(f"  {kind} prompt {p}: {fmt(r['decode_tok_s'], '.1f')} tok/s "
                  f"({fmt(r['decode_spread'], '.1f')}), TTFT {fmt(r['ttft_s'], '.2f', 1e3, ' ms')}"
                  + (f", compile {r['compile_s']:.1f} s, {r['graph_breaks']} graph break(s)" if "graph_breaks" in r
                     else ""), flush=True)
    finally:
        del model
        torch._dynamo.reset()
        free(device)


# -----------------------------------------------------------------------------
# one shape


def bench_shape(name, model_dir, device, args, res: dict):
    """Fill res as measurements finish, so a failure part-way keeps what was measured."""
    res["model_dir"] = model_dir
    cfg = nanofast.load_config(model_dir)
    res["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    res["bandwidth"] = b = measure_bandwidth(device)
    res["bandwidth_Bps"] = b["read_Bps"]  # the floor's
    print(f"  {bandwidth_line(b)}", flush=True)
    peers, peer_prompts = args.peers_for(name), args.peer_contexts_for(name)
    extra = set(peer_prompts) if peers else set()  # nanofast runs where the peers run, for the ratios
    contexts, ttft_prompts = sorted(set(args.contexts_for(name, cfg)) | extra), sorted(set(TTFT_PROMPTS) | extra)
    base = str(128 if 128 in contexts else contexts[0])  # the prompt length that sampling uses
    attempt(f"{name} nanofast", bench_nanofast, name, model_dir, device, args, cfg, contexts, ttft_prompts, base, res)
    free(device)
    res["peers"] = {}
    for kind in peers:
        attempt(f"{name} peer {kind}", bench_peer, name, kind, model_dir, device, cfg.vocab_size, peer_prompts,
                args, res)
        free(device)


def bench_nanofast(name, model_dir, device, args, cfg, contexts, ttft_prompts, base, res):
    """nanofast.load's engine ("new"), and beside it those of --baseline and --fp8, runs taking turns."""
    T, V, bw = args.tokens, cfg.vocab_size, res["bandwidth_Bps"]
    max_seq_len = max(contexts + ttft_prompts) + T + 512  # 512: room for --profile's extra steps
    kw = dict(max_seq_len=max_seq_len, fast=False if args.plain else None)
    res["startup_s"] = st = {}
    engine, st["first"] = timed_load(nanofast.load, model_dir, device, **kw)  # cold: JIT and capture caches
    engine = None
    free(device)
    engine, st["second"] = timed_load(nanofast.load, model_dir, device, **kw)
    res["path"], res["weight_format"] = "fast" if engine.fast else "plain", engine.weight_format
    res["weight_bytes"], res["kv_bytes_per_context_token"] = w_bytes, kv_bytes = bytes_per_token(engine)
    print(f"  nanofast {res['path']} path, {engine.weight_format} weights ({w_bytes / 1e9:.3f} GB read per token, "
          f"KV {kv_bytes:,} B per context token), max_seq_len {max_seq_len}; startup (load + capture): "
          f"first {st['first']:.2f} s, second {st['second']:.2f} s", flush=True)

    engines = {"new": engine}  # and the versions compared with it, all loaded at once
    if args.baseline:
        res["baseline"] = {"file": args.baseline, "decode": {}}
    if args.fp8:
        res["fp8"] = {"decode": {}}
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
    if "fp8" in engines:
        res["fp8"]["weight_bytes"], res["fp8"]["kv_bytes_per_context_token"] = bytes_per_token(engines["fp8"])

    res["decode"] = dec = {}
    for ctx in contexts:
        runs = side_by_side(f"{name} decode ctx {ctx}", engines, random_prompt(ctx, V), T, args.runs, "decode_tok_s")
        c = str(ctx)

        def floor(label, r):  # engine label's tok/s against the floor of its bytes (in r), KV at the mean context
            nbytes = r["weight_bytes"] + r["kv_bytes_per_context_token"] * (ctx + T / 2)
            xs = runs[label]
            return {**against_floor(median(xs), nbytes, bw), "spread": spread(xs), "runs": xs}

        if "new" in runs:
            dec[c] = floor("new", res)
        if "new" in runs and "baseline" in runs:
            res["baseline"]["decode"][c] = {**ab(runs, "baseline", "new", ("baseline_tok_s", "new_tok_s")),
                                            "baseline_runs": runs["baseline"]}
        if "fp8" in runs:
            res["fp8"]["decode"][c] = {**floor("fp8", res["fp8"]),
                                       **(ab(runs, "new", "fp8", ("bf16_tok_s", "fp8_tok_s")) if "new" in runs else {})}
        if "fp8" in runs and "baseline_fp8" in runs:
            res["fp8"]["baseline"]["decode"][c] = {**ab(runs, "baseline_fp8", "fp8", ("baseline_tok_s", "new_tok_s")),
                                                   "baseline_runs": runs["baseline_fp8"]}
        print(f"  decode ctx {ctx}: " + ", ".join(f"{label} {fmt(median(xs), '.1f')} tok/s ({fmt(spread(xs), '.1f')})"
                                                  for label, xs in runs.items()), flush=True)
    runs = side_by_side(f"{name} sampling", engines, random_prompt(int(base), V), T, args.runs,
                        "decode_tok_s", **SAMPLING)  # every engine: the A/Bs compare sampling too
    res["sampling"] = s = {"tok_s": median(runs["new"]), "spread": spread(runs["new"]),
                           "runs": runs["new"]} if runs.get("new") else None
    for out, a, b in ((res.get("baseline"), "baseline", "new"), (res.get("fp8", {}).get("baseline"), "baseline_fp8", "fp8")):
        if out is not None and a in runs and b in runs:
            out["sampling"] = ab(runs, a, b, ("baseline_tok_s", "new_tok_s"))
    if s and dec.get(base, {}).get("tok_s"):
        s["overhead_pct"] = 100 * (dec[base]["tok_s"] / s["tok_s"] - 1)  # extra time per token
    res["ttft_s"], res["ttft_spread_s"] = {}, {}
    for p in ttft_prompts:
        runs = side_by_side(f"{name} ttft {p}", engines if p == AB_TTFT else {"new": engine},
                            random_prompt(p, V), 1, args.runs, "ttft_s")
        res["ttft_s"][str(p)], res["ttft_spread_s"][str(p)] = median(runs.get("new", [])), spread(runs.get("new", []))
        if p != AB_TTFT:
            continue
        if "new" in runs and "baseline" in runs:
            res["baseline"]["ttft_s"] = {"prompt": p, **ab(runs, "baseline", "new", ("baseline", "new"))}
        if "new" in runs and "fp8" in runs:
            res["fp8"]["ttft_s"] = {"prompt": p, **ab(runs, "new", "fp8", ("bf16", "fp8"))}
        if "fp8" in runs and "baseline_fp8" in runs:
            res["fp8"]["baseline"]["ttft_s"] = {"prompt": p, **ab(runs, "baseline_fp8", "fp8", ("baseline", "new"))}
    if args.profile:
        res["profile"] = attempt(f"{name} profile", profile_step, engine, V)


# -----------------------------------------------------------------------------
# the table


def print_rows(rows: dict, *cols, first="context", align=">8"):
    """A header, then a line per row (label: results); a column is (title, width, key, format spec[,
    scale, unit]), a missing value "-", a [min, max] pair "min-max"."""
    print(f"  {first:{align}} " + " ".join(f"{title:>{width}}" for title, width, *_ in cols))
    for label, d in rows.items():
        print(f"  {label:{align}} " + " ".join(f"{fmt(d.get(key), *spec):>{width}}" for _, width, key, *spec in cols))


def ratio_cols(a, b):
    """The columns of a ratio b/a: its median and the min-max of the rounds."""
    return (f"{b}/{a}", len(f"{b}/{a}") + 1, "ratio", ".3f", 1, "x"), ("min-max", 13, "ratio_spread", ".3f")


def print_ab(r, title, a, b, *cols):
    """A --baseline or --fp8 block: title, decode table (cols, then the ratio b/a), TTFT of a and b."""
    print(title)
    print_rows(r["decode"], *cols, *ratio_cols(a, b))
    if not r["decode"]:
        print("  (not measured: see the failures below)")
    t = r.get("ttft_s") or {}
    ms = lambda k: f"{fmt(t.get(k), '.2f', 1e3, ' ms')} ({fmt(t.get(k + '_spread'), '.2f', 1e3)})"  # noqa: E731
    print(f"  time to first token, {AB_TTFT} tokens: {a} {ms(a)}, {b} {ms(b)}; {b}/{a} "
          f"{fmt(t.get('ratio'), '.3f', 1, 'x')} ({fmt(t.get('ratio_spread'), '.3f')})")
    s = r.get("sampling")
    if s:
        print(f"  sampling (t 0.6, top-k 20, top-p 0.95, first context): {a} "
              f"{fmt(s['baseline_tok_s'], '.1f')} tok/s, {b} {fmt(s['new_tok_s'], '.1f')} tok/s; {b}/{a} "
              f"{fmt(s['ratio'], '.3f', 1, 'x')} ({fmt(s['ratio_spread'], '.3f')})")


def print_table(name, r, args):
    print(f"\n== Qwen3-{name} ({r.get('model_dir')}): nanofast {r.get('path', '?')} path, "
          f"{r.get('weight_format', '?')} weights ==")
    print(bandwidth_line(r.get("bandwidth", {})))
    print(f"floor = bytes read per token / read bandwidth; weights {fmt(r.get('weight_bytes'), '.3f', 1e-9, ' GB')} "
          f"per token as loaded, KV {fmt(r.get('kv_bytes_per_context_token'), ',')} B per context token")
    st = r.get("startup_s", {})
    print(f"startup (nanofast.load, incl. capture): first {fmt(st.get('first'), '.2f', 1, ' s')}, "
          f"second {fmt(st.get('second'), '.2f', 1, ' s')}")
    gb, floor_tok_s = ("GB/token", 9, "bytes_per_token", ".3f", 1e-9), ("floor tok/s", 12, "floor_tok_s", ".0f")
    tok_s, of_floor = ("tok/s", 9, "tok_s", ".1f"), ("of floor", 9, "frac_floor", ".1%")
    tok_spread = ("min-max", 15, "spread", ".1f")
    print(f"decode, greedy, {args.tokens} tokens, median and min-max of {args.runs} (floor: KV at prompt + "
          f"{args.tokens}/2):")
    print_rows(r.get("decode", {}), gb, ("floor us", 9, "floor_us", ".1f"), floor_tok_s, tok_s, tok_spread, of_floor)
    ab_cols = (("baseline tok/s", 15, "baseline_tok_s", ".1f"), ("min-max", 15, "baseline_tok_s_spread", ".1f"),
               ("new tok/s", 10, "new_tok_s", ".1f"), ("min-max", 15, "new_tok_s_spread", ".1f"))
    if "baseline" in r:
        print_ab(r["baseline"], f"A/B against baseline {r['baseline']['file']} (same process, runs taking turns "
                 f"in ABBA order, median and min-max of {args.runs}):", "baseline", "new", *ab_cols)
    if "fp8" in r:
        print_ab(r["fp8"], f"fp8 projections (quantize=\"fp8\"; runs taking turns with bf16 in ABBA order, median and "
                 f"min-max of {args.runs}; weights read per token {fmt(r['fp8'].get('weight_bytes'), '.3f', 1e-9)} "
                 "GB):",
                 "bf16", "fp8", gb, floor_tok_s, tok_s, tok_spread, of_floor, ("bf16 tok/s", 11, "bf16_tok_s", ".1f"),
                 ("min-max", 15, "bf16_tok_s_spread", ".1f"))
        if "baseline" in r["fp8"]:
            print_ab(r["fp8"]["baseline"], "fp8 A/B against the baseline's fp8 (same process, runs taking turns in "
                     f"ABBA order, median and min-max of {args.runs}):", "baseline", "new", *ab_cols)
    s = r.get("sampling") or {}
    print(f"sampling (t 0.6, top-k 20, top-p 0.95): {fmt(s.get('tok_s'), '.1f', 1, ' tok/s')} "
          f"({fmt(s.get('spread'), '.1f')}), {fmt(s.get('overhead_pct'), '+.1f', 1, '%')} time per token vs greedy")
    print("time to first token: " + ", ".join(f"{p} tokens {fmt(t, '.2f', 1e3, ' ms')} "
                                              f"({fmt(r.get('ttft_spread_s', {}).get(p), '.2f', 1e3)})"
                                              for p, t in r.get("ttft_s", {}).items()))
    prof = r.get("profile")
    if prof:
        print(f"profile: kernels {prof['kernel_sum_us']:.1f} us per eager step, graph replay "
              f"{fmt(prof['graph_replay_us'], '.1f', 1, ' us')} (kernel table above)")
    peers = {f"{kind} {p}": e for kind, pe in r.get("peers", {}).items() for p, e in pe["prompts"].items()}
    if r.get("peers"):
        print(f"transformers (greedy, {args.peer_tokens} new tokens, median and min-max of {args.peer_runs} rounds; "
              "of floor: nanofast's floor at the same prompt; nanofast x: nanofast's tok/s over the peer's; "
              "x TTFT: the peer's time to first token over nanofast's; warm-up: compiling and recording CUDA graphs):")
        for kind, how in PEERS.items():
            if kind in r["peers"]:
                print(f"  {kind:<9} {how}")
        print_rows({k: {**e, "breaks": e.get("graph_breaks", "-") if e.get("fullgraph", True)
                        else f"{e['graph_breaks']} (!)"} for k, e in peers.items()},
                   ("tok/s", 8, "decode_tok_s", ".1f"), ("min-max", 15, "decode_spread", ".1f"),
                   ("of floor", 9, "frac_floor", ".1%"), ("TTFT ms", 9, "ttft_s", ".2f", 1e3),
                   ("nanofast x", 11, "nanofast_x", ".2f", 1, "x"), ("x TTFT", 7, "nanofast_x_ttft", ".2f", 1, "x"),
                   ("warm-up s", 10, "compile_s", ".1f"), ("graph breaks", 13, "breaks", ""),
                   first="peer, prompt", align="<13")
        for k, e in peers.items():
            if not e.get("fullgraph", True):
                print(f"  (!) {k}: fullgraph=True failed ({e.get('fullgraph_error', '')[:100]}); ran with "
                      "fullgraph=False")
            if e.get("compiled") is False:
                print(f"  (!) {k}: generate did not compile (static cache only; transformers compiles on CUDA)")
            if e.get("cudagraph_skips"):
                print(f"  (!) {k}: {e['cudagraph_skips']} CUDA graph(s) skipped (kernels launched one by one)")
            if e.get("same_as_eager", 8) < min(8, e.get("tokens", 8)):
                print(f"  {k}: the compiled step agrees with the eager step on the first {e['same_as_eager']} of "
                      f"{min(8, e['tokens'])} tokens (rounding differs; random weights leave small margins)")


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


# --sass: the machine code of one decode step (and of prefill's row kernels), compiled for a Hopper GPU
# (sm_90a) on any machine, with a stand-in driver and weights that have shapes but no memory. Two
# versions whose kernels compile to the same SASS run at the same speed; where they differ, the
# registers and instruction counts say where to look before a GPU is at hand. Not a measurement.
SASS_SCRIPT = r"""
import hashlib, json, os, subprocess, sys, tempfile, types
os.environ["TRITON_INTERPRET"] = "0"
path, cfg_json, fmt = sys.argv[1:4]
sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
import importlib.util, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit


class Hopper:  # what JITFunction.run asks of a driver before it compiles
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0


driver.set_active(Hopper())
compiled = []
jit.JITFunction.__getitem__ = lambda self, grid: lambda *a, **kw: compiled.append(
    (self.fn.__name__, self.run(*a, grid=grid, warmup=True, **kw)))
spec = importlib.util.spec_from_file_location("nanofast_sass", path)
nf = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = nf
spec.loader.exec_module(nf)
nf.num_sms = lambda: 132  # an H100's
cfg, bf = nf.Config(**json.loads(cfg_json), fp8=fmt == "fp8"), torch.bfloat16
D, I, V, hd, Hq, Hkv = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim, cfg.num_heads,
                        cfg.num_kv_heads)
fake = lambda *shape, dtype=bf: torch.empty(1, dtype=dtype).expand(*shape)  # the shape, not the memory
mats = {"qkv": ((Hq + 2 * Hkv) * hd, D), "o": (D, Hq * hd), "gate_up": (2 * I, D), "down": (D, I)}
w8 = {k: (fake(n, c, dtype=torch.float8_e4m3fn), fake(-(-n // 128), -(-c // 128), dtype=torch.float32)) if cfg.fp8
      else (fake(n, c), None) for k, (n, c) in mats.items()}
norms = dict(attn_norm=fake(D), q_norm=fake(hd), k_norm=fake(hd), mlp_norm=fake(D))
E = fake(V, D)
if hasattr(nf, "Proj"):  # this version's data model
    w = nf.Weights(embed=E, layers=[nf.Layer(**norms, **{k: nf.Proj(*v) for k, v in w8.items()})], norm=fake(D),
                   lm_head=nf.Proj(E))
    cache, rope = nf.KVCache(cfg, 256, bf, "cpu"), nf.rope_tables(cfg, 256, "cpu")
    nf.FastDecoder(w, cfg, cache, rope, pdl=True, capture=False).run_step()
    kc, vc = cache.k[0], cache.v[0]
else:  # nanofast.py before Proj: matrices and scales apart, FastDecoder(engine)
    w = nf.Weights(embed=E, layers=[nf.Layer(**norms, **{k: v[0] for k, v in w8.items()},
                                             **{k + "_s": v[1] for k, v in w8.items()})], norm=fake(D), lm_head=E)
    cache, rope = nf.KVCache(cfg, 256, 16, bf, "cpu"), nf.rope_tables(cfg, 256, "cpu")
    engine = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dtype=bf, weights=w, cache=cache, rope=rope,
                                   max_seq_len=256)
    nf.FastDecoder(engine, pdl=True, capture=False).run_step()
    kc, vc = cache.flat(0)
T, x = 128, torch.empty(128, D, dtype=bf)
nf.rms_norm_rows(x, fake(D), 1e-6, torch.empty_like(x), add=torch.empty_like(x))
nf.silu_mul_rows(torch.empty(T, 2 * I, dtype=bf), torch.empty(T, I, dtype=bf))
nf.qk_norm_rope_rows(torch.empty(T, (Hq + 2 * Hkv) * hd, dtype=bf), fake(hd), fake(hd), *rope, 0,
                     torch.empty(T, Hq, hd, dtype=bf), kc, vc, 1e-6)
if cfg.fp8:  # prefill's one-pass dequantization
    q, s = w8["qkv"]
    nf._dequant_kernel[s.shape](q, s, torch.empty(q.shape, dtype=bf), *q.shape, s.shape[1], B=128)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
seen = set()
for name, k in compiled:
    if k.hash in seen:
        continue
    seen.add(k.hash)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    code = [line.split("*/", 1)[1].split(";")[0].strip() for line in sass.splitlines()
            if line.strip().startswith("/*") and "*/" in line]
    use = dict(part.split(":", 1) for part in next(x for x in res.splitlines() if "REG:" in x).split() if ":" in part)
    print(json.dumps(dict(kernel=name, regs=int(use["REG"]), spill_bytes=int(use["LOCAL"]), instructions=len(code),
                          sass=hashlib.sha1("\n".join(code).encode()).hexdigest())))
"""


def sass_report(path: str, shape: str, fmt: str) -> list:
    """Each distinct kernel of one decode step and of prefill, in launch order: registers, spills, SASS."""
    D, L, H, KV, hd, I, tied = SHAPES[shape]
    cfg = dict(vocab_size=VOCAB.get(shape, 151936), hidden_size=D, intermediate_size=I, num_layers=1, num_heads=H,
               num_kv_heads=KV, head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tied)
    r = subprocess.run([sys.executable, "-c", SASS_SCRIPT, path, json.dumps(cfg), fmt], capture_output=True,
                       text=True)
    if r.returncode:
        raise RuntimeError(f"{os.path.basename(path)} does not compile for sm_90a: {r.stderr.strip()[-1500:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def sass_compare(args) -> int:
    """--sass: this nanofast.py's kernels (and --baseline's, side by side), compiled for sm_90a."""
    ok = True
    for shape in args.shapes:
        for fmt in ("bf16", "fp8"):
            new = attempt(f"{shape} {fmt} sass", sass_report, nanofast.__file__, shape, fmt) or []
            old = (attempt(f"{shape} {fmt} baseline sass", sass_report, args.baseline, shape, fmt) or []
                   if args.baseline else [])
            same = sum(a["sass"] == b["sass"] for a, b in zip(old, new))
            print(f"\n{shape} {fmt}: {len(new)} kernels" + (f", {same} with the baseline's machine code "
                                                          f"({len(old)} in the baseline)" if args.baseline else ""))
            for i, k in enumerate(new):
                b = old[i] if i < len(old) else None
                diff = "" if b is None else ("  same" if b["sass"] == k["sass"] else
                                             f"  differs: registers {b['regs']} -> {k['regs']}, instructions "
                                             f"{b['instructions']} -> {k['instructions']}")
                print(f"  {k['kernel']:<28} registers {k['regs']:>4}  spills {k['spill_bytes']:>4} B  "
                      f"instructions {k['instructions']:>6}{diff}")
                ok = ok and k["spill_bytes"] == 0
    if ERRORS:
        print(f"\n{len(ERRORS)} failed:\n  " + "\n  ".join(ERRORS))
    return 0 if ok and not ERRORS else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark nanofast against the bandwidth floor and transformers.")
    add = p.add_argument
    add("--shape", default="0.6B", help=f"comma-separated shapes of {list(SHAPES)} (default 0.6B)")
    add("--model", help="benchmark this checkpoint folder instead of a random one (--shape ignored)")
    add("--device", help="cuda, cuda:N or cpu (default cuda if available)")
    add("--plain", action="store_true", help="force nanofast's plain-torch path")
    add("--tokens", type=int, default=256, help="new tokens per decode run (default 256, min 256)")
    add("--runs", type=int, default=5, help="runs per measurement, median and min-max reported (default 5, min 5)")
    add("--contexts", help="prompt lengths for decode, e.g. 128,4096 (default 128,4096,32768 for 0.6B, "
        "128 for larger shapes; the peers' prompt lengths are added where peers run)")
    add("--peers", help=f"transformers peers, comma-separated, of {list(PEERS)}, or none (default all three for "
        "0.6B, 1.7B and tiny, none for larger shapes)")
    add("--peer-contexts", help="prompt lengths for the peers (default 128,4096; 128,512 for tiny)")
    add("--peer-tokens", type=int, default=128, help="new tokens per peer run (default 128)")
    add("--peer-runs", type=int, default=3, help="rounds per peer measurement (default 3)")
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
    add("--sass", action="store_true", help="no GPU needed: compile the decode step's kernels for sm_90a and print "
        "registers, spills and instruction counts, and with --baseline whether each kernel's machine code is the "
        "baseline's (a refactor that keeps it cannot change the speed); --shape as for timing")
    add("--quick", action="store_true", help="few tokens and runs: smoke tests only, not for claims")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.runs, a.peer_tokens, a.peer_runs = 32, 2, 16, 2
    elif a.tokens < 256 or a.runs < 5:
        print("note: raising --tokens to >= 256 and --runs to >= 5 (use --quick for smoke tests)", file=sys.stderr)
        a.tokens, a.runs = max(a.tokens, 256), max(a.runs, 5)
    if a.peer_tokens < 2 or a.peer_runs < 1:
        p.error("--peer-tokens must be at least 2 and --peer-runs at least 1")
    shapes = list(dict.fromkeys(s.strip() for s in a.shape.split(",") if s.strip()))
    bad = [s for s in shapes if s not in SHAPES]
    if bad and not a.model:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    if a.baseline and not os.path.isfile(a.baseline):
        p.error(f"--baseline: no such file {a.baseline}")
    a.baseline = a.baseline and os.path.abspath(a.baseline)
    a.shapes = [os.path.basename(os.path.normpath(a.model)).removeprefix("Qwen3-")] if a.model else shapes
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        explicit = {k: ints(v) for k, v in (("--contexts", a.contexts), ("--peer-contexts", a.peer_contexts)) if v}
    except ValueError:
        p.error("--contexts and --peer-contexts take comma-separated integers")
    if any(n < 1 for v in explicit.values() for n in v):
        p.error("prompt lengths must be at least 1")
    a.contexts_for = lambda name, cfg: explicit.get("--contexts") or (
        [128, 4096, 32768] if (cfg.hidden_size, cfg.num_layers) == (1024, 28) else
        [128, 512] if name == "tiny" else [128])
    a.peer_contexts_for = lambda name: explicit.get("--peer-contexts") or (
        [128, 512] if name == "tiny" else [128, 4096])
    a.peers_for = lambda name: ([k for k in a.peers.split(",") if k and k != "none"] if a.peers is not None
                                else list(PEERS) if name in ("0.6B", "1.7B", "tiny") else [])
    if any(k not in PEERS for k in a.peers_for("0.6B")):
        p.error(f"--peers takes {', '.join(PEERS)} or none")
    return a


def stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sass:
        return sass_compare(args)
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
    signal.signal(signal.SIGTERM, stop)  # as Ctrl-C: what was measured is still printed
    try:
        try:
            for name in args.shapes:
                print(f"\n-- {name} --", flush=True)
                model_dir = args.model or attempt(f"{name} checkpoint", write_checkpoint,
                                                  os.path.join(args.cache_dir, f"Qwen3-{name}"), name, device)
                if model_dir:
                    attempt(name, bench_shape, name, model_dir, device, args, out["shapes"].setdefault(name, {}))
                free(device)
        except KeyboardInterrupt:
            ERRORS.append("interrupted (SIGINT or SIGTERM): the run stopped there; the tables hold what it measured")
            print(f"\n  {ERRORS[-1]}", flush=True)
        print(f"\n{out['device']}")
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
