"""One file per architecture: its `Schema` (the metadata keys and tensors it reads, checked by
`hparams.HParams` before anything is built) and a builder from the checked values to a Plan."""

from __future__ import annotations

from collections.abc import Callable

from ..gguf import GGUFError, GGUFHeader
from ..plan import Plan
from . import gemma3, llama

# general.architecture -> plan builder
ARCHITECTURES: dict[str, Callable[[GGUFHeader], Plan]] = {
    **{arch: gemma3.build_plan for arch in gemma3.GENERATIONS},
    **{arch: llama.build_plan for arch in llama.FAMILIES},
}


def check_architecture(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")


def build_plan(header: GGUFHeader) -> Plan:
    check_architecture(header.architecture)
    plan = ARCHITECTURES[header.architecture](header)
    plan.validate()
    return plan
