"""Tenants: who may call the API, with which models, and how much.

The config is a TOML file with one `[[tenant]]` table per tenant:

    [[tenant]]
    id = "acme"
    key_sha256 = ["9f86d081884c7d65..."]   # sha256 hex of each API key (one string or a list)
    models = ["gemma-3-270m-q4_k_m"]      # names from GET /v1/models; ["*"] = every model
    max_concurrent = 4                    # requests queued or running at once (429 beyond)
    tokens_per_minute = 20000             # prompt + max_tokens reserved per request (429 beyond)
    share = 2.0                           # weight when tenants compete for KV slots (default 1)
    lora = "acme-style"                   # LoRA adapter(s) its requests apply when they name none:
                                          # an id, a list of ids, or [{id = "...", scale = 0.5}]
    lora_allowed = ["acme-style", "acme-terse"]   # server adapters it may ask for (default: those
                                                  # of `lora`; ["*"] = every one)
    lora_upload = true                    # may load its own adapters through the API (default false);
                                          # only it sees and uses them

Keys are stored only as SHA-256 digests: API keys are long random strings (`realm key new`
makes them), so a fast hash is enough, and the file can leak without leaking the keys. Omitted
limits mean unlimited. Without a config the server runs open (no keys, one tenant "local" with
every model) and must listen on a loopback address only.

    realm key new         # print a fresh key and the digest to put in the file
    realm key hash KEY    # print the digest of an existing key
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

OPEN_TENANT = "local"
ALL_MODELS = "*"
ALL_ADAPTERS = "*"


class TenantsConfigError(ConfigError):
    """The tenants file is missing, not TOML, or has a wrong key or value (named in the message)."""


@dataclass(frozen=True)
class Tenant:
    id: str
    models: frozenset[str] = frozenset({ALL_MODELS})
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    share: float = 1.0
    lora: tuple[tuple[str, float], ...] = ()  # (adapter id, scale) applied when a request names none
    lora_allowed: frozenset[str] = frozenset()  # server adapters it may ask for
    lora_upload: bool = False  # may load and unload its own adapters

    def may_use_model(self, name: str) -> bool:
        return ALL_MODELS in self.models or name in self.models

    def may_use_lora(self, adapter_id: str) -> bool:
        return ALL_ADAPTERS in self.lora_allowed or adapter_id in self.lora_allowed


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "realm-" + secrets.token_urlsafe(32)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _adapter(v: object) -> bool:
    return (isinstance(v, str) and v != "") or (isinstance(v, dict) and set(v) <= {"id", "scale"}
                                                 and _adapter(v.get("id")) and _number(v.get("scale", 1.0)))


def _lora(v: object) -> tuple[tuple[str, float], ...]:
    """A `lora` setting as (id, scale) pairs."""
    items = v if isinstance(v, list) else [v]
    return tuple((i, 1.0) if isinstance(i, str) else (i["id"], float(i.get("scale", 1.0))) for i in items)


# config key -> (check, what it must be)
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "key_sha256": (lambda v: isinstance(v, str) or _is_str_list(v), "a sha256 hex string or a list of them"),
    "models": (_is_str_list, "a list of model names"),
    "max_concurrent": (_positive_int, "a positive integer"),
    "tokens_per_minute": (_positive_int, "a positive integer"),
    "share": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0, "a positive number"),
    "lora": (lambda v: _adapter(v) or (isinstance(v, list) and len(v) <= 4 and all(_adapter(i) for i in v)),
             'an adapter id, or a list of up to 4 ids or {id = "...", scale = number} tables'),
    "lora_allowed": (_is_str_list, 'a list of adapter ids (["*"]: all)'),
    "lora_upload": (lambda v: isinstance(v, bool), "true or false"),
}
_REQUIRED = ("id", "key_sha256")


@dataclass
class Tenants:
    """Tenants by id, and the key digest of each. `open` means no config: anyone local may call."""

    by_id: dict[str, Tenant]
    by_key_digest: dict[str, str] = field(default_factory=dict)
    open: bool = False

    @classmethod
    def open_access(cls) -> Tenants:
        tenant = Tenant(OPEN_TENANT, lora_allowed=frozenset({ALL_ADAPTERS}), lora_upload=True)
        return cls({OPEN_TENANT: tenant}, open=True)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant whose key this is (the open tenant for any key when open), else None."""
        if self.open:
            return self.by_id[OPEN_TENANT]
        if not api_key:
            return None
        tenant_id = self.by_key_digest.get(hash_key(api_key))
        return self.by_id[tenant_id] if tenant_id is not None else None

    @property
    def shares(self) -> dict[str, float]:
        return {t.id: t.share for t in self.by_id.values()}


def load_tenants(path: str | Path) -> Tenants:
    """Read a tenants TOML file; TenantsConfigError names the file, tenant and key that are wrong."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TenantsConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TenantsConfigError(f"{path}: not valid TOML: {e}") from e
    extra = set(doc) - {"tenant"}
    if extra:
        raise TenantsConfigError(f"{path}: unknown top-level key(s) {sorted(extra)} (expected [[tenant]] tables)")
    tables = doc.get("tenant", [])
    if not isinstance(tables, list) or not tables:
        raise TenantsConfigError(f"{path}: no [[tenant]] tables")
    tenants = Tenants({})
    for n, table in enumerate(tables):
        where = f"{path}: tenant #{n + 1}"
        tenant, digests = _parse_tenant(table, where)
        if tenant.id in tenants.by_id:
            raise TenantsConfigError(f"{where}: duplicate id {tenant.id!r}")
        tenants.by_id[tenant.id] = tenant
        for digest in digests:
            if digest in tenants.by_key_digest:
                raise TenantsConfigError(f"{where}: key digest {digest[:12]}… is also "
                                         f"tenant {tenants.by_key_digest[digest]!r}'s")
            tenants.by_key_digest[digest] = tenant.id
    return tenants


def _parse_tenant(table: dict, where: str) -> tuple[Tenant, list[str]]:
    for key, value in table.items():
        if key not in _FIELDS:
            raise TenantsConfigError(f"{where}: unknown key {key!r} (known: {', '.join(_FIELDS)})")
        check, expected = _FIELDS[key]
        if not check(value):
            raise TenantsConfigError(f"{where}: {key} must be {expected}, got {value!r}")
    for key in _REQUIRED:
        if key not in table:
            raise TenantsConfigError(f"{where}: missing {key}")
    where = f"{where} ({table['id']})"
    keys = table["key_sha256"]
    digests = [k.lower() for k in ([keys] if isinstance(keys, str) else keys)]
    bad = [d for d in digests if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
    if bad or not digests:
        raise TenantsConfigError(f"{where}: key_sha256 must hold 64-digit hex digests "
                                 "(realm key hash KEY)")
    lora = _lora(table["lora"]) if "lora" in table else ()
    allowed = frozenset(table.get("lora_allowed", [adapter for adapter, _ in lora]))
    outside = [adapter for adapter, _ in lora if ALL_ADAPTERS not in allowed and adapter not in allowed]
    if outside:
        raise TenantsConfigError(f"{where}: lora {outside} not in lora_allowed")
    tenant = Tenant(id=table["id"], models=frozenset(table.get("models", [ALL_MODELS])),
                    max_concurrent=table.get("max_concurrent"), tokens_per_minute=table.get("tokens_per_minute"),
                    share=float(table.get("share", 1.0)), lora=lora, lora_allowed=allowed,
                    lora_upload=table.get("lora_upload", False))
    return tenant, digests


def check_bind_host(host: str, tenants: Tenants) -> None:
    """Open access (no tenants file) may only listen on loopback; raise ConfigError otherwise."""
    if tenants.open and not is_loopback(host):
        raise ConfigError(f"without a tenants config the server runs open and listens on 127.0.0.1 only, "
                          f"not {host!r}: pass a tenants file to serve other hosts")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Limiter:
    """One tenant's admission limits: requests in flight, and a token bucket refilled per minute.

    A request reserves its prompt tokens plus max_tokens; `release` returns what it did not use.
    """

    def __init__(self, tenant: Tenant, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenant, self.clock = tenant, clock
        self.in_flight = 0
        self.tokens = float(tenant.tokens_per_minute or 0)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        rate = self.tenant.tokens_per_minute
        if rate is not None:
            self.tokens = min(float(rate), self.tokens + (now - self.updated) * rate / 60.0)
        self.updated = now

    def exceeds_bucket(self, cost: int) -> bool:
        """True when one request of this cost can never pass: it is larger than the whole bucket."""
        rate = self.tenant.tokens_per_minute
        return rate is not None and cost > rate

    def try_acquire(self, cost: int) -> tuple[float, str] | None:
        """Admit a request of `cost` tokens (None), or say why not and after how many seconds to retry."""
        limit = self.tenant.max_concurrent
        if limit is not None and self.in_flight >= limit:
            return 1.0, f"tenant {self.tenant.id!r} already has {limit} requests in flight (max_concurrent)"
        rate = self.tenant.tokens_per_minute
        if rate is not None:
            self._refill()
            if cost > self.tokens:
                return ((cost - self.tokens) * 60.0 / rate,
                        f"request needs {cost} tokens and tenant {self.tenant.id!r} has {int(self.tokens)} "
                        f"of its {rate} tokens per minute left")
            self.tokens -= cost
        self.in_flight += 1
        return None

    def release(self, unused_tokens: int) -> None:
        self.in_flight -= 1
        if self.tenant.tokens_per_minute is not None:
            self._refill()
            self.tokens = min(float(self.tenant.tokens_per_minute), self.tokens + unused_tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
