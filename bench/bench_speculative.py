"""Speculative decoding against plain decoding, same engine, same run: where drafts pay, and where not.

    python bench/bench_speculative.py [--model FILE] [--backend webgpu] [--tokens 128] [--k 4 8]

Workloads (greedy, so speculation must give the very same tokens, which is checked): lookup-
friendly ones, where the answer repeats the prompt (rewrite a paragraph with one change, edit
code), and free text, where prompt lookup finds little and backs off. For each: decode tokens/s
plain and with prompt lookup for each k, the speed-up, and the share of drafted tokens the target
accepted. Decode is timed from the first generated token to the last (`Engine.generate`).
"""

from __future__ import annotations

import argparse
import time

from realm_wasm.engine import Engine
from realm_wasm.model_files import resolve_model
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import GREEDY
from realm_wasm.speculative import Speculation

PARAGRAPH = ("The harbour town woke slowly. Fishing boats came in with the tide, gulls circled over the market, "
             "and the baker on the corner opened his shutters at six, as he had every morning for thirty years. "
             "By noon the square was full of tourists who photographed the old clock tower and the blue doors.")
CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''
WORKLOADS = {
    "rewrite a paragraph (one word changed)": f"Paragraph: {PARAGRAPH}\n\nThe same paragraph, with 'baker' replaced "
                                             f"by 'butcher':\n{PARAGRAPH.split('baker')[0]}butcher",
    "edit code (rename a variable)": f"{CODE}\n# The same function with `total` renamed to `running`:\n"
                                     f"def moving_average(values, window):\n",
    "free text": "Write a short story about a lighthouse keeper who finds a message in a bottle.\n\nStory:",
    # sampled, drafts mostly fail: what backing off costs (the same seed gives the same tokens either way)
    "free text, sampled (temperature 1)": "Write a short story about a lighthouse keeper.\n\nStory:",
}
SAMPLED = SamplingParams(temperature=1.0, seed=7)


def decode(engine: Engine, prompt: str, tokens: int, speculation: Speculation | None,
           sampling: SamplingParams = GREEDY) -> tuple[list[int], float, float]:
    """(tokens, decode tok/s, accepted share of drafted tokens)."""
    # Each run prefills the prompt afresh: a run that reuses the last one's KV recomputes the prompt's
    # last token alone (a mat-vec step, not the prefill's mat-mat), and on a GPU whose mat-vec rounds
    # x to int8 that moves greedy text ~100 tokens on, which would be blamed on the speculation.
    engine.slot_tokens[0] = ()
    events = list(engine.generate_events(prompt, tokens, sampling=sampling, stop_at_eos=False,
                                         speculation=speculation))
    end, steps = events[-1], [e for e in events[:-1] if e.token_id is not None]
    rate = (len(steps) - 1) / (steps[-1].elapsed_s - steps[0].elapsed_s)
    return [e.token_id for e in steps], rate, end.accepted_tokens / max(end.drafted_tokens, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = Engine.load(resolve_model(args.model), backend=args.backend, n_ctx=1024)
    print(f"{engine.executor.name}, loaded in {time.perf_counter() - t0:.1f} s, {args.tokens} tokens, "
          f"greedy unless sampled, best of {args.repeats}\n")
    columns = " | ".join(f"lookup k={k} tok/s | speed-up | accepted" for k in args.k)
    print(f"| workload | plain tok/s | {columns} |")
    print("| --- | ---: |" + " ---: | ---: | ---: |" * len(args.k))
    for name, prompt in WORKLOADS.items():
        sampling = SAMPLED if "sampled" in name else GREEDY
        runs = [decode(engine, prompt, args.tokens, None, sampling) for _ in range(args.repeats)]
        plain_ids, plain = runs[0][0], max(r[1] for r in runs)
        cells = [f"{plain:.1f}"]
        for k in args.k:
            lookup = Speculation("lookup", max_draft=k)
            runs = [decode(engine, prompt, args.tokens, lookup, sampling) for _ in range(args.repeats)]
            ids, rate, accepted = runs[0][0], max(r[1] for r in runs), runs[0][2]
            same = "" if ids == plain_ids else " (DIFFERENT TOKENS)"
            cells += [f"{rate:.1f}{same}", f"{rate / plain:.2f}x", f"{accepted:.0%}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
