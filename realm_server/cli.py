"""`realm` command line: generate text, serve the page and the API, make API keys. CPython only.

    realm generate --prompt "..." [--model FILE] [--max-tokens N] [--temperature T] ...
    realm serve [--host H] [--port P] [--model NAME_OR_FILE ...] [--tenants FILE] [--slots N] [--ctx N] ...
    realm build-site OUT/ [--model NAME_OR_FILE ...] [--pyodide-base-url URL]   # a static site, no server
    realm plan [--model FILE] [--binding-limit BYTES]      # the fused program the GPU runs, per layer
    realm key new | realm key hash KEY

A RealmError (a missing or corrupt model file, invalid sampling settings, a bad tenants file, no
GPU where one was asked for) is one line, `realm: error: ...`, and exit status 2, like a usage
error; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from realm_wasm.backends import BACKENDS
from realm_wasm.errors import RealmError
from realm_wasm.gpu.fuse import DEFAULT_BINDING_LIMIT
from realm_wasm.model_files import BUNDLED, CHAT_MODEL, cache_dir, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_generate(args: argparse.Namespace) -> None:
    from realm_wasm.engine import Engine
    from realm_wasm.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    engine = Engine.load(resolve_model(args.model), backend=args.backend, n_ctx=args.ctx)
    load_s = time.perf_counter() - t0
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t") if args.escapes else args.prompt
    n, first = 0, None
    for ev in engine.generate(prompt, args.max_tokens, sampling):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        n += ev.token_id is not None
        first = first if first is not None else ev.elapsed_s
    total = time.perf_counter() - t0 - load_s
    sys.stdout.write("\n")
    decode = (n - 1) / (total - first) if n > 1 and total > first else float("nan")
    print(f"[{engine.executor.name}] load {load_s:.2f} s, first token {first or 0:.2f} s, "
          f"{n} tokens, decode {decode:.1f} tok/s", file=sys.stderr)


def prepare_web_assets() -> None:
    """Pyodide + numpy vendored from npm/PyPI (once) and the runtime bundle rebuilt from this checkout."""
    import subprocess

    for script in ("vendor_pyodide.py", "build_bundle.py"):
        path = ROOT / "scripts" / script
        if not path.exists():
            raise RealmError(f"{path} is missing: `realm serve` runs from a checkout of the repository")
        subprocess.run([sys.executable, str(path)], check=True, stdout=subprocess.DEVNULL)


def cmd_serve(args: argparse.Namespace) -> None:
    """The page and its assets, plus the OpenAI-compatible / WebSocket API on native inference."""
    import logging

    import uvicorn

    from .app import create_app
    from .service import load_model
    from .static import StaticSettings
    from .tenants import Tenants, check_bind_host, load_tenants

    tenants = load_tenants(args.tenants) if args.tenants else Tenants.open_access()
    check_bind_host(args.host, tenants)
    models = [resolve_model(m) for m in args.model or BUNDLED]  # default: both bundled models
    prepare_web_assets()
    served = [load_model(m, backend=args.backend, n_ctx=args.ctx, n_slots=args.slots) for m in models]
    dirs = args.model_dir or dict.fromkeys([cache_dir(), *(m.parent for m in models)])
    static = StaticSettings(pyodide_base_url=args.pyodide_base_url, model_dirs=tuple(Path(d) for d in dirs),
                            default_model=CHAT_MODEL if CHAT_MODEL in {m.name for m in models} else models[0].name)
    app = create_app(served, tenants, static=static)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"Realm: open http://{args.host}:{args.port}/ (API: /v1, /ws; OpenAPI: /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


def cmd_build_site(args: argparse.Namespace) -> None:
    """The page, worker, Pyodide, runtime bundle and the chosen models as a folder for a static host."""
    from .site import build_site

    models = [resolve_model(m) for m in args.model or ()]
    prepare_web_assets()
    out = Path(args.out)
    config = build_site(out, models, pyodide_base_url=args.pyodide_base_url)
    listed = ", ".join(m["name"] for m in config["models"]) or "none (the page loads a model from a URL)"
    print(f"Realm: static site in {out}/ (models: {listed}); serve it with any static file server, e.g.\n"
          f"  python -m http.server -d {out} 8080   # then open http://127.0.0.1:8080/", file=sys.stderr)


def cmd_plan(args: argparse.Namespace) -> None:
    """The model's forward pass as the GPU runs it: its fused kernels, layer by layer."""
    from realm_wasm.gguf import read_gguf
    from realm_wasm.gpu.fuse import describe, fuse
    from realm_wasm.models import build_plan

    header = read_gguf(resolve_model(args.model)).header
    plan = build_plan(header)
    kernels = fuse(plan, args.binding_limit)
    print(f"{plan.arch}: {plan.kv.n_layers} layers, {len(plan.ops)} ops -> {len(kernels)} kernels "
          f"(storage bindings of {args.binding_limit} bytes)")
    for line in describe(plan, kernels):
        print(line)


def cmd_key_new(args: argparse.Namespace) -> None:
    from .tenants import hash_key, new_key

    key = new_key()
    print(f"api key:    {key}\nkey_sha256: {hash_key(key)}")


def cmd_key_hash(args: argparse.Namespace) -> None:
    from .tenants import hash_key

    print(hash_key(args.key))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", help="bundled model name or GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    gen.add_argument("--max-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ctx", type=positive_int, default=4096, help="context length (tokens)")
    gen.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="auto: WebGPU (wgpu-py) on a hardware adapter, else numpy")
    gen.add_argument("--no-escapes", dest="escapes", action="store_false",
                     help="take the prompt literally (default: \\n and \\t in it are newline and tab)")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the chat page, Pyodide, the runtime bundle, the models and the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-dir", action="append", help=f"folder of .gguf files (default {cache_dir()})")
    serve.add_argument("--pyodide-base-url", help="load Pyodide from here (e.g. a CDN) instead of /pyodide/")
    serve.add_argument("--model", action="append",
                       help=f"bundled model ({', '.join(BUNDLED)}) or GGUF file the API serves; repeatable "
                            "(default: both bundled models)")
    serve.add_argument("--tenants", help="tenants TOML file (API keys, limits); without it: open, loopback only")
    serve.add_argument("--backend", default="auto", choices=BACKENDS)
    serve.add_argument("--slots", type=positive_int, default=8, help="sequences decoded together (KV-cache slots)")
    serve.add_argument("--ctx", type=positive_int, default=2048, help="context length per sequence")
    serve.set_defaults(func=cmd_serve)

    site = sub.add_parser("build-site", help="write the page, Pyodide, the runtime and models as a static site")
    site.add_argument("out", help="folder to write (a folder an earlier build-site wrote is replaced)")
    site.add_argument("--model", action="append",
                      help=f"bundled model ({', '.join(BUNDLED)}) or GGUF file to include; repeatable, the first "
                           "is the page's default (default: none, the page loads models from a URL)")
    site.add_argument("--pyodide-base-url", help="load Pyodide from here (e.g. a CDN) instead of OUT/pyodide/")
    site.set_defaults(func=cmd_build_site)

    plan = sub.add_parser("plan", help="print the fused program the GPU runs for a model, layer by layer")
    plan.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    plan.add_argument("--binding-limit", type=positive_int, default=DEFAULT_BINDING_LIMIT,
                      help="the device's max storage-binding size (default: WebGPU's 128 MiB)")
    plan.set_defaults(func=cmd_plan)

    key = sub.add_parser("key", help="API keys for the tenants file")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("new", help="print a new random API key and its key_sha256").set_defaults(func=cmd_key_new)
    key_hash = key_sub.add_parser("hash", help="print the key_sha256 of a key")
    key_hash.add_argument("key")
    key_hash.set_defaults(func=cmd_key_hash)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RealmError as e:
        print(f"realm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
