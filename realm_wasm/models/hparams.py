"""Reading an architecture's hyper-parameters from GGUF metadata, with errors that name the key."""

from __future__ import annotations

from typing import Any

from ..gguf import GGUFError, GGUFHeader, TensorInfo
from ..plan import Op


class HParams:
    def __init__(self, header: GGUFHeader) -> None:
        self.header, self.arch = header, header.architecture

    def get(self, key: str, default: Any = None) -> Any:
        """`arch.key` from metadata; without a default a missing key is an error."""
        value = self.header.metadata.get(f"{self.arch}.{key}", default)
        if value is None:
            raise GGUFError(f"metadata is missing {self.arch}.{key}")
        return value

    def tensor(self, name: str) -> TensorInfo:
        t = self.header.tensors.get(name)
        if t is None:
            raise GGUFError(f"model has no tensor {name!r}")
        return t

    def tensors(self, *names: str) -> dict[str, TensorInfo]:
        return {n: self.tensor(n) for n in names}


def decoder_buffers(hp: HParams, d: int, n_heads: int, n_kv: int, hd: int, n_vocab: int) -> dict:
    """Activation buffers of a standard decoder block (rows: T tokens, or R logit rows)."""
    ffn = hp.tensor("blk.0.ffn_gate.weight").dims[1]
    return {"x": ("T", d), "h": ("T", d), "q": ("T", n_heads * hd), "k": ("T", n_kv * hd),
            "v": ("T", n_kv * hd), "a": ("T", n_heads * hd), "o": ("T", d), "g": ("T", ffn),
            "f": ("T", d), "xl": ("R", d), "logits": ("R", n_vocab)}


def logits_ops(eps: float, d: int, head: TensorInfo) -> list[Op]:
    """Only the rows that want logits go through the final norm and the (large) output head."""
    return [
        Op("gather", "xl", ("x",)),
        Op("rmsnorm", "xl", ("xl",), ("output_norm.weight",), dict(eps=eps, group=d)),
        Op("matmul", "logits", ("xl",), (head.name,)),
    ]
