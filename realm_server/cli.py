"""`realm` command line: generate text, serve the page and the API, make API keys. CPython only.

    realm generate --prompt "..." [--model FILE] [--max-tokens N] [--temperature T] [--lora FILE[:SCALE]]
                   [--lookup K | --draft FILE [--draft-k K]] ...
    realm serve [--host H] [--port P] [--model NAME_OR_FILE ...] [--tenants FILE] [--slots N] [--ctx N]
                [--lora ID=FILE] [--draft FILE] ...
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
from realm_wasm.errors import InvalidRequest, RealmError
from realm_wasm.gpu.fuse import DEFAULT_BINDING_LIMIT
from realm_wasm.model_files import BUNDLED, CHAT_MODEL, cache_dir, resolve_model
from realm_wasm.speculative import MAX_DRAFT

ROOT = Path(__file__).resolve().parents[1]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def lora_file(text: str) -> tuple[Path, float]:
    """FILE[:SCALE] (a trailing ":number" is the scale; default 1)."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def adapter_file(text: str) -> tuple[str, Path]:
    """ID=FILE."""
    adapter_id, sep, path = text.partition("=")
    if not sep or not adapter_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=FILE, got {text!r}")
    return adapter_id, Path(path)


def model_template(text: str) -> tuple[str, str]:
    """MODEL=TEMPLATE."""
    model, sep, template = text.partition("=")
    if not sep or not model or not template:
        raise argparse.ArgumentTypeError(f"expected MODEL=TEMPLATE, got {text!r}")
    return model, template


def draft_k(text: str) -> int:
    value = positive_int(text)
    if value > MAX_DRAFT:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_DRAFT}, got {value}")
    return value


def draft_targets(models: list[Path], draft: Path) -> list[Path]:
    """The models `draft` can draft for (those of its vocabulary), checked from the files' headers
    before any weights load; none is a one-line error naming the first mismatch."""
    from realm_wasm.gguf import read_gguf
    from realm_wasm.speculative import check_same_vocabulary
    from realm_wasm.tokenizer import Tokenizer

    vocab = {path: Tokenizer.from_metadata(read_gguf(path).header.metadata) for path in [*models, draft]}
    targets, refusals = [], []
    for model in models:
        try:
            check_same_vocabulary(vocab[model], vocab[draft])
            targets.append(model)
        except InvalidRequest as e:
            refusals.append(e)
    if not targets:
        raise InvalidRequest(f"--draft {draft.name}: {refusals[0]}")
    return targets


def cmd_generate(args: argparse.Namespace) -> None:
    from realm_wasm.engine import Engine
    from realm_wasm.sampling import SamplingParams
    from realm_wasm.scheduler import Finished
    from realm_wasm.speculative import Speculation

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    speculation = (Speculation("lookup", args.lookup) if args.lookup else
                   Speculation("draft", args.draft_k) if args.draft else None)
    # each adapter under its position and file name (the same file may come twice, at two scales)
    adapters = {f"{i}:{path.name}": (path, scale) for i, (path, scale) in enumerate(args.lora or [])}
    t0 = time.perf_counter()
    model = resolve_model(args.model)
    draft = resolve_model(args.draft) if args.draft else None
    if draft is not None:
        draft_targets([model], draft)
    engine = Engine.load(model, backend=args.backend, n_ctx=args.ctx,
                         adapters={name: path for name, (path, _) in adapters.items()})
    if draft is not None:
        engine.set_draft(Engine.load(draft, backend=args.backend, n_ctx=args.ctx))
    load_s = time.perf_counter() - t0
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t") if args.escapes else args.prompt
    n, first, finished = 0, None, None
    lora = [(name, scale) for name, (_, scale) in adapters.items()]
    for ev in engine.generate_events(prompt, args.max_tokens, sampling, speculation=speculation, lora=lora):
        if isinstance(ev, Finished):
            finished = ev
            continue
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        n += ev.token_id is not None
        first = first if first is not None else ev.elapsed_s
    total = time.perf_counter() - t0 - load_s
    sys.stdout.write("\n")
    decode = (n - 1) / (total - first) if n > 1 and total > first else float("nan")
    applied = "".join(f", LoRA {path.name} at {scale:g}" for path, scale in adapters.values())
    if speculation is not None:
        applied += f", drafted {finished.drafted_tokens}, accepted {finished.accepted_tokens}"
    print(f"[{engine.executor.name}] load {load_s:.2f} s, first token {first or 0:.2f} s, "
          f"{n} tokens, decode {decode:.1f} tok/s{applied}", file=sys.stderr)


def prepare_web_assets() -> None:
    """Pyodide + numpy vendored from npm/PyPI (once) and the runtime bundle rebuilt from this checkout."""
    import subprocess

    for script in ("vendor_pyodide.py", "build_bundle.py"):
        path = ROOT / "scripts" / script
        if not path.exists():
            raise RealmError(f"{path} is missing: `realm serve` runs from a checkout of the repository")
        subprocess.run([sys.executable, str(path)], check=True, stdout=subprocess.DEVNULL)


def page_model_dirs(served: list[Path], extra: list[str] | None) -> tuple[Path, ...]:
    """The folders whose .gguf files the page lists: the served models' (the bundled ones' cache
    included), then each --model-dir; on a name clash the earlier folder wins, so a name the page
    lists is the file the API serves."""
    return tuple(dict.fromkeys([cache_dir(), *(m.parent for m in served), *(Path(d) for d in extra or ())]))


def cmd_serve(args: argparse.Namespace) -> None:
    """The page and its assets, plus the OpenAI-compatible / WebSocket API on native inference."""
    import logging

    import uvicorn

    from realm_wasm.gguf import model_name, read_gguf

    from .app import create_app
    from .errors import ConfigError
    from .service import ApiSettings, load_model
    from .static import StaticSettings
    from .tenants import Tenants, check_bind_host, load_tenants

    tenants = load_tenants(args.tenants) if args.tenants else Tenants.open_access()
    check_bind_host(args.host, tenants)
    models = [resolve_model(m) for m in args.model or BUNDLED]  # default: both bundled models
    # the --draft model drafts for the served models of its vocabulary
    draft = resolve_model(args.draft) if args.draft else None
    drafted = draft_targets(models, draft) if draft is not None else []
    prepare_web_assets()
    adapters = dict(args.lora or [])
    if len(adapters) != len(args.lora or []):
        raise ConfigError(f"--lora gives one id twice: {[a for a, _ in args.lora]}")
    # each --lora adapter is preloaded for the models of its architecture
    arch = {path: read_gguf(path).header.metadata.get("general.architecture") for path in [*models, *adapters.values()]}
    lost = [a for a, f in adapters.items() if all(arch[f] != arch[m] for m in models)]
    if lost:
        raise ConfigError(f"--lora {lost[0]}: no served model has its architecture {arch[adapters[lost[0]]]!r}")
    templates = dict(args.chat_template or [])
    unknown = set(templates) - {model_name(m) for m in models}
    if unknown:
        raise ConfigError(f"--chat-template {sorted(unknown)[0]}=...: no served model has that name "
                          f"(served: {', '.join(model_name(m) for m in models)})")
    served = [load_model(m, backend=args.backend, n_ctx=args.ctx, n_slots=args.slots,
                         adapters={a: f for a, f in adapters.items() if arch[f] == arch[m]},
                         max_adapters=args.max_adapters, max_lora_rank=args.max_lora_rank,
                         draft=draft if m in drafted else None, chat_template=templates.get(model_name(m)))
              for m in models]
    static = StaticSettings(pyodide_base_url=args.pyodide_base_url, model_dirs=page_model_dirs(models, args.model_dir),
                            default_model=CHAT_MODEL if CHAT_MODEL in {m.name for m in models} else models[0].name)
    app = create_app(served, tenants, static=static, allowed_hosts=args.allowed_host or (),
                     cors_origins=args.cors_origin or ())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"Realm: open http://{args.host}:{args.port}/ (API: /v1, /ws; OpenAPI: /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, ws_max_size=ApiSettings().ws_max_bytes)


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
    from realm_wasm.lora import adaptable_weights
    from realm_wasm.models import build_plan

    header = read_gguf(resolve_model(args.model)).header
    plan = build_plan(header)
    kernels = fuse(plan, args.binding_limit, adapted=adaptable_weights(plan) if args.lora else ())
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
    gen.add_argument("--lora", action="append", type=lora_file, metavar="FILE[:SCALE]",
                     help="apply a LoRA adapter (llama.cpp's GGUF format) at SCALE (default 1); repeatable")
    drafter = gen.add_mutually_exclusive_group()
    drafter.add_argument("--lookup", type=draft_k, metavar="K",
                         help="speculative decoding by prompt lookup: draft up to K tokens a step from what "
                              "followed the text's last n-gram earlier on (the same text, faster on repetitive text)")
    drafter.add_argument("--draft", metavar="MODEL",
                         help="speculative decoding with a draft model: a smaller GGUF (or bundled name) of the same "
                              "vocabulary, on the same backend, drafts --draft-k tokens a step")
    gen.add_argument("--draft-k", type=draft_k, default=8, metavar="K", help="tokens --draft drafts a step (default 8)")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the chat page, Pyodide, the runtime bundle, the models and the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-dir", action="append",
                       help="another folder of .gguf files for the page to list, besides the served models' "
                            f"(and {cache_dir()}); repeatable")
    serve.add_argument("--pyodide-base-url", help="load Pyodide from here (e.g. a CDN) instead of /pyodide/")
    serve.add_argument("--model", action="append",
                       help=f"bundled model ({', '.join(BUNDLED)}) or GGUF file the API serves; repeatable "
                            "(default: both bundled models)")
    serve.add_argument("--tenants", help="tenants TOML file (API keys, limits); without it: open, loopback only")
    serve.add_argument("--allowed-host", action="append", metavar="NAME",
                       help="a Host name the server answers besides localhost, 127.0.0.1 and [::1] (open mode; with "
                            "--tenants, the names given are the only ones answered); repeatable")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="an origin (scheme://host[:port]) whose pages may call the server from a browser; "
                            "default: same-origin only; '*': any (needs --tenants); repeatable")
    serve.add_argument("--backend", default="auto", choices=BACKENDS)
    serve.add_argument("--slots", type=positive_int, default=8, help="sequences decoded together (KV-cache slots)")
    serve.add_argument("--ctx", type=positive_int, default=2048, help="context length per sequence")
    serve.add_argument("--lora", action="append", type=adapter_file, metavar="ID=FILE",
                       help="load a LoRA adapter as the server's, under ID (tenants use it by lora_allowed); "
                            "repeatable")
    serve.add_argument("--max-adapters", type=non_negative_int, default=4,
                       help="LoRA adapters held at once, --lora ones included (the GPU reserves room for them; "
                            "0: none)")
    serve.add_argument("--max-lora-rank", type=positive_int, default=16,
                       help="the highest adapter rank the GPU reserves room for (raised to fit --lora ones)")
    serve.add_argument("--draft", metavar="MODEL",
                       help="a draft model (GGUF file or bundled name) for the served models of its vocabulary: "
                            "requests with \"speculation\": {\"method\": \"draft\"} use it")
    serve.add_argument("--chat-template", action="append", type=model_template, metavar="MODEL=TEMPLATE",
                       help="serve MODEL (its name in /v1/models) with this chat template instead of its GGUF's: "
                            "a Jinja file, or chatml-tools (ChatML with tool calling, e.g. for the bundled SmolLM2); "
                            "repeatable")
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
    plan.add_argument("--lora", action="store_true",
                      help="the program of an executor with LoRA adapter slots (its A·x kernels run in steps "
                           "whose tokens use adapters)")
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
