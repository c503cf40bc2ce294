"""What LoRA adapters cost at decode: tok/s without adapters and with them, one sequence and a batch.

    python bench/bench_lora.py --backend webgpu --decode 64           # the default model
    python bench/bench_lora.py --backend webgpu --decode 4 --repeats 1 # the same, short: checks it runs
    python bench/bench_lora.py --backend webgpu --small                # a tiny random gemma3: checks it runs
    python bench/bench_lora.py --backend webgpu --lora-rows 1 4 8      # mat-vec rows per team for adapted weights
                                                                        # (on lavapipe, in a minute or two)

Rows (decode through the scheduler, as the server runs it; on a GPU one step queued ahead):
    batch 1, no adapter slots          the executor without LoRA (no LoRA code compiled)
    batch 1, slots, no adapter         the executor with adapter slots, none in use
    batch 1, rank-R adapter            one adapter on every attention and FFN projection of every layer
    batch 8, no adapter slots          8 sequences
    batch 8 over 4 adapters            the same 8 sequences, two per adapter, in the same steps
The issue's targets: the rank-16 adapter within 15% of no adapter, the batch of 8 within 25%.
Adapters are random (they change the text; the cost does not depend on what they say).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from realm_wasm.engine import Engine
from realm_wasm.gpu.tuning import TUNING
from realm_wasm.lora import Adapter, LoraPair, adaptable_weights
from realm_wasm.model_files import default_model_path
from realm_wasm.scheduler import Request, Scheduler, TokenEvent

PROMPT = "Once upon a time, in a land far away, there lived"


def random_adapter(engine: Engine, rank: int, seed: int) -> Adapter:
    """Rank-`rank` pairs for every projection over the tokens (attention and FFN, every layer)."""
    rng = np.random.default_rng(seed)
    plan = engine.model.plan
    pairs = {}
    for name in sorted(adaptable_weights(plan)):
        n_in, n_out = plan.weights[name].dims
        pairs[name] = LoraPair((rng.standard_normal((rank, n_in)) * 0.01).astype(np.float32),
                               (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32))
    return Adapter(f"random-{seed}", plan.arch, float(rank), pairs)


def decode_rate(engine: Engine, loras: list[tuple[tuple[str, float], ...]], n_decode: int) -> float:
    """Tokens per second over the steps where every sequence decodes (after all first tokens)."""
    scheduler = Scheduler(engine, n_slots=len(loras), max_step_tokens=max(256, 2 * len(loras)))
    times: list[list[float]] = [[] for _ in loras]
    ids = engine.tokenizer.encode(PROMPT)
    for i, lora in enumerate(loras):
        def sink(event, mine=times[i]):
            if isinstance(event, TokenEvent) and event.token_id is not None:
                mine.append(time.perf_counter())

        scheduler.submit(Request(ids, n_decode + 1, lora=lora, stop_at_eos=False), sink)
    while scheduler.busy:
        scheduler.step()
    start = max(t[0] for t in times)
    tokens = sum(sum(1 for x in t if x > start) for t in times)
    return tokens / (max(t[-1] for t in times) - start)


def step_dispatches(engine: Engine, loras: list[tuple[tuple[str, float], ...]]) -> str:
    """Dispatches of one decode step of these sequences on a GPU executor ("-" on numpy): where the
    time of adapters goes on a big GPU (each costs ~5 µs of GPU and of host time)."""
    launches = getattr(engine.executor, "launches", None)
    if launches is None:
        return "-"
    counts = {"T": len(loras), "R": len(loras), "lora": any(loras)}
    return str(sum(len(launch.dispatches(counts)) for launch in launches))


def small_model(folder: Path) -> Path:
    """A random gemma3 (4 layers, 256 wide, Q8_0) with a one-character-per-token vocab."""
    import gguf

    chars = "\u2581" + "".join(chr(c) for c in range(33, 127))
    d, n_heads, n_kv, hd, ffn, layers = 256, 4, 1, 64, 1024, 4
    rng = np.random.default_rng(0)
    path = folder / "small-gemma3.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for add, value in ((w.add_context_length, 512), (w.add_embedding_length, d), (w.add_block_count, layers),
                       (w.add_feed_forward_length, ffn), (w.add_head_count, n_heads), (w.add_head_count_kv, n_kv),
                       (w.add_key_length, hd), (w.add_value_length, hd), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_sliding_window, 64), (w.add_rope_freq_base, 1e6)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *chars])
    w.add_token_scores([0.0] * (3 + len(chars)))
    w.add_token_types([2, 3, 3] + [1] * len(chars))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add_tensor(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        data = (rng.standard_normal(shape) * (0.05 if quantized else 1.0)).astype(np.float32)
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    add_tensor("token_embd.weight", (3 + len(chars), d))
    add_tensor("output_norm.weight", (d,), False)
    for i in range(layers):
        p = f"blk.{i}."
        for norm, width in (("attn_norm", d), ("attn_q_norm", hd), ("attn_k_norm", hd), ("post_attention_norm", d),
                            ("ffn_norm", d), ("post_ffw_norm", d)):
            add_tensor(p + norm + ".weight", (width,), False)
        for name, shape in (("attn_q", (n_heads * hd, d)), ("attn_k", (n_kv * hd, d)), ("attn_v", (n_kv * hd, d)),
                            ("attn_output", (d, n_heads * hd)), ("ffn_gate", (ffn, d)), ("ffn_up", (ffn, d)),
                            ("ffn_down", (d, ffn))):
            add_tensor(p + name + ".weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def slotted_engine(path: Path, backend: str, n_ctx: int, rank: int, lora_rows: int | None) -> Engine:
    """An engine with 4 adapter slots holding 4 random adapters; `lora_rows` overrides the tuning
    tables' matvec_lora_rows while its kernels are built (at load)."""
    saved = dict(TUNING)
    if lora_rows is not None:
        TUNING.update({key: dataclasses.replace(table, matvec_lora_rows=lora_rows) for key, table in TUNING.items()})
    try:
        engine = Engine.load(path, backend=backend, n_ctx=n_ctx, n_slots=8, max_adapters=4, max_lora_rank=rank)
    finally:
        TUNING.update(saved)
    for i in range(4):
        engine.load_adapter(f"a{i}", random_adapter(engine, rank, seed=i))
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    ap.add_argument("--backend", default="webgpu", choices=("webgpu", "numpy"))
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per sequence")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
    ap.add_argument("--small", action="store_true", help="a tiny random model and 8 tokens: checks the bench runs")
    ap.add_argument("--lora-rows", type=int, nargs="+", default=[None],
                    help="mat-vec rows per team for adapted weights (the tuning table's matvec_lora_rows) to "
                         "compare, an engine with slots each (default: the table's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = small_model(Path(tmp)) if args.small else Path(args.model) if args.model else default_model_path()
        n_decode, repeats = (8, 1) if args.small else (args.decode, args.repeats)
        n_ctx = len(PROMPT) + n_decode + 16
        plain = Engine.load(path, backend=args.backend, n_ctx=n_ctx, n_slots=8)
        one, four = [(("a0", 1.0),)], [((f"a{i % 4}", 1.0),) for i in range(8)]
        batch1, batch8 = [("batch 1, no adapter slots", plain, [()])], [("batch 8, no adapter slots", plain, [()] * 8)]
        for lora_rows in args.lora_rows:
            slotted = slotted_engine(path, args.backend, n_ctx, args.rank, lora_rows)
            shape = "" if lora_rows is None else f" ({lora_rows} rows a team)"
            batch1 += [(f"batch 1, slots, no adapter{shape}", slotted, [()]),
                       (f"batch 1, rank-{args.rank} adapter{shape}", slotted, one)]
            batch8 += [(f"batch 8 over 4 adapters{shape}", slotted, four)]
        rows = batch1 + batch8
        print(f"model {path.name}, {plain.executor.name} ({args.backend}), decode {n_decode} tokens per sequence, "
              f"best of {repeats}; adapters on {len(adaptable_weights(plain.model.plan))} weights")
        print("| run | decode tok/s | vs no adapter slots | dispatches per step |")
        print("| --- | ---: | ---: | ---: |")
        for _, engine, loras in rows:  # compile every step shape's pipelines before timing
            decode_rate(engine, loras, 2)
        base: dict[int, float] = {}
        for label, engine, loras in rows:
            rate = max(decode_rate(engine, loras, n_decode) for _ in range(repeats))
            base.setdefault(len(loras), rate)
            print(f"| {label} | {rate:.1f} | {rate / base[len(loras)] - 1:+.1%} | {step_dispatches(engine, loras)} |")


if __name__ == "__main__":
    main()
