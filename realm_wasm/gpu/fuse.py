"""The program a GPU runs for a Plan: the plan's ops grouped into fused kernels.

A dispatch costs ~5 µs of GPU time and as much host time on a big GPU however little it computes,
so a decode step is latency-bound by its number of dispatches. `fuse(plan)` turns the plan's op
list into the list of `Kernel`s the executor builds, one per launch, each naming the plan op it
is built from and the ops folded into it by role. The fusions, decided by dataflow (what each op
reads and writes) rather than by where ops stand, so any legal order of a model's ops fuses alike:

| kernel    | folds in (role)                     | one dispatch at decode computes                       |
| --------- | ----------------------------------- | ----------------------------------------------------- |
| matmul    | second (matmul of the same input)   | two projections from one joined weight (q and k)      |
| matmul    | norm, add, then                     | y = W·x, then x += rmsnorm(y), then h = rmsnorm(x)     |
| matmul    | add, then                           | y = W·x, then x += y, then h = rmsnorm(x) (no post-norm) |
| rmsnorm   | add, then                           | x += rmsnorm(o), then h = rmsnorm(x)                  |
| add       | then                                | x += o, then h = rmsnorm(x)                           |
| rope      | norm, pair, pair_norm, store        | Q/K norms, RoPE of q and k, the KV-cache store        |
| glu       | (gate and up joined in one weight)  | act(W_gate·x) * (W_up·x)                              |

With LoRA adapters (`adapted`: the weights they may change), one more kernel runs before the first
matmul of each input value: `lora_shrink` computes u = scale · A·x for every weight reading that x
(a layer's q, k and v; gate and up), once per step, so the matmuls only add B·u (`lora_shrinks`);
it dispatches only in steps that run the mat-mat (a mat-vec computes its own u).

An op folds into a kernel at another position only where it commutes with every op in between
(neither writes what the other reads or writes). Fusions that need joined weights also need the
joined weight to fit one storage binding: `fuse` takes that limit (the device's, or WebGPU's
default 128 MiB when printing a program without a device).

    for line in describe(fuse(plan, binding_limit)): print(line)   # what `realm plan` prints
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from ..plan import Op, Plan
from ..quants import quant_type
from .matmul import row_bytes, rows_within
from .weights import matrix_shape

DEFAULT_BINDING_LIMIT = 128 << 20  # WebGPU's default maxStorageBufferBindingSize


@dataclass(frozen=True)
class Kernel:
    """One launch of the fused program: built from plan op `op`, with ops folded in by role."""

    kind: str  # a key of the executor's BUILDERS table
    op: int  # the plan op it is built from (where it runs)
    fused: dict[str, int] = field(default_factory=dict)  # role -> index of a plan op it also computes

    def ops(self) -> list[int]:
        return [self.op, *self.fused.values()]


# --- dataflow -------------------------------------------------------------------------------------

def _conflict(a: Op, b: Op) -> bool:
    """Whether swapping a and b could change a result: one writes what the other reads or writes.
    Attention ops also read and write their layer's KV cache, which only they touch."""
    return a.out in (*b.ins, b.out) or b.out in a.ins


def commutes(ops: list[Op], j: int, lo: int, hi: int, moving: set[int] = frozenset()) -> bool:
    """Op j can move across every op strictly between lo and hi (except those moving with it)."""
    return all(not _conflict(ops[j], ops[k]) for k in range(lo + 1, hi) if k not in moving and k != j)


def _written_between(ops: list[Op], buf: str, lo: int, hi: int) -> bool:
    return any(ops[k].out == buf for k in range(lo + 1, hi))


# --- weights: which joins fit one binding ----------------------------------------------------------

def _rows_fit(plan: Plan, name: str, rows: int, limit: int) -> bool:
    t = plan.weights[name]
    qt = quant_type(t.type_id)
    return qt.shader is not None and rows <= rows_within(limit, qt, matrix_shape(t)[1])


def _joinable(plan: Plan, names: tuple[str, str], limit: int) -> bool:
    """Two [n, k] weights of one type and k whose rows, joined, fit one binding and whose first
    ends on a word boundary: `matmul.concat_rows` can join them."""
    a, b = (plan.weights[n] for n in names)
    if (a.type_id, a.dims[0]) != (b.type_id, b.dims[0]) or quant_type(a.type_id).shader is None:
        return False
    (n_a, k), (n_b, _) = matrix_shape(a), matrix_shape(b)
    return n_a * row_bytes(quant_type(a.type_id), k) % 4 == 0 and _rows_fit(plan, names[0], n_a + n_b, limit)


def _one_binding(plan: Plan, name: str, limit: int) -> bool:
    return _rows_fit(plan, name, matrix_shape(plan.weights[name])[0], limit)


# --- the pass -------------------------------------------------------------------------------------

class _Fusion:
    """The decisions of one pass: which ops fold into which kernel, by role."""

    def __init__(self, plan: Plan, limit: int) -> None:
        self.plan, self.ops, self.limit = plan, plan.ops, limit
        self.fused: dict[int, dict[str, int]] = {}  # anchor op -> role -> folded op
        self.claimed: set[int] = set()  # ops folded into another op's kernel
        self.stored: set[int] = set()  # attentions whose KV store a rope does

    def fold(self, anchor: int, role: str, op: int) -> None:
        self.fused.setdefault(anchor, {})[role] = op
        self.claimed.add(op)

    def free(self, i: int) -> bool:
        """Neither folded into another kernel nor carrying folded ops."""
        return i not in self.claimed and i not in self.fused

    def moves(self, group: set[int], to: int) -> bool:
        """Every op of `group` can move to position `to` (they move together)."""
        return all(commutes(self.ops, m, min(m, to), max(m, to), group) for m in group)

    @staticmethod
    def nearest(indices: range, accept: Callable[[int], bool]) -> int | None:
        return next((j for j in indices if accept(j)), None)

    # Each rule finds, for one anchor, the op to fold under one role (or None).

    def rope_norm(self, i: int) -> int | None:
        """A per-head RMSNorm of the rope's buffer, in place, before it (Q/K norm)."""
        rope, ops = self.ops[i], self.ops
        return self.nearest(range(i - 1, -1, -1), lambda j: (
            ops[j].kind == "rmsnorm" and ops[j].ins[0] == ops[j].out == rope.out
            and ops[j].params["group"] == rope.params["head_dim"] and self.free(j) and self.moves({j}, i)))

    def rope_store(self, i: int) -> int | None:
        """The attention after the rope reading its buffer as keys, whose KV store the rope can do:
        v is final by then and the keys stay as rotated."""
        rope, ops = self.ops[i], self.ops

        def stores(a: int) -> bool:
            att = ops[a]
            return (att.kind == "attention" and att.ins[1] == rope.out and a not in self.stored
                    and (att.params["n_kv_heads"], att.params["head_dim"]) == (rope.params["n_heads"],
                                                                              rope.params["head_dim"])
                    and not _written_between(ops, att.ins[2], i, a) and not _written_between(ops, rope.out, i, a))

        return self.nearest(range(i + 1, len(ops)), stores)

    def rope_pair(self, i: int) -> int | None:
        """An earlier rope with the same angles (positions, rotation, frequency factors) on another
        buffer, which moves here with its norm: the queries' rope beside the keys'."""
        rope, ops = self.ops[i], self.ops

        def angles(op: Op) -> tuple:
            return op.weights, {k: v for k, v in op.params.items() if k != "n_heads"}

        def pairs(j: int) -> bool:
            if ops[j].kind != "rope" or ops[j].out == rope.out or j in self.claimed:
                return False
            own = self.fused.get(j, {})
            return set(own) <= {"norm"} and angles(ops[j]) == angles(rope) and self.moves({j, *own.values()}, i)

        return self.nearest(range(i - 1, -1, -1), pairs)

    def residual(self, j: int) -> tuple[int, int | None] | None:
        """For a post-norm in place on o: the residual add x = x + o after it, and the next
        pre-norm h = rmsnorm(x) after that, both movable up to the norm."""
        norm, ops = self.ops[j], self.ops
        o = norm.out
        if norm.ins[0] != o or not self.free(j):
            return None
        add = self.nearest(range(j + 1, len(ops)), lambda k: (
            ops[k].kind == "add" and ops[k].ins[1] == o and ops[k].ins[0] == ops[k].out != o and self.free(k)
            and self.moves({k}, j)))
        if add is None:
            return None
        x = ops[add].out
        then = self.nearest(range(add + 1, len(ops)), lambda m: (
            ops[m].kind == "rmsnorm" and ops[m].ins[0] == x and ops[m].out != x and self.free(m)
            and self.moves({add, m}, j)))
        return add, then

    def add_then(self, k: int) -> int | None:
        """For a residual add x = x + o (no post-norm before it): the next pre-norm h = rmsnorm(x),
        movable up to the add."""
        add, ops = self.ops[k], self.ops
        x = add.out
        if add.ins[0] != x or add.ins[1] == x or not self.free(k):
            return None
        return self.nearest(range(k + 1, len(ops)), lambda m: (
            ops[m].kind == "rmsnorm" and ops[m].ins[0] == x and ops[m].out != x and self.free(m)
            and self.moves({m}, k)))

    def matmul_add(self, i: int) -> int | None:
        """A residual add of the matmul's output (with its next pre-norm, if fused), which the
        mat-vec's last workgroup can run: its weight in one binding, the add movable up to it."""
        mm, ops = self.ops[i], self.ops
        if not _one_binding(self.plan, mm.weights[0], self.limit):
            return None
        return self.nearest(range(i + 1, len(ops)), lambda k: (
            ops[k].kind == "add" and ops[k].ins[1] == mm.out and ops[k].ins[0] == ops[k].out != mm.out
            and k not in self.claimed and self.moves({k, *self.fused.get(k, {}).values()}, i)))

    def matmul_norm(self, i: int) -> int | None:
        """A residual post-norm chain (`residual`) of a matmul's output over whole rows, which the
        mat-vec's last workgroup can run: its weight in one binding, the chain movable up to it."""
        mm, ops = self.ops[i], self.ops
        if not _one_binding(self.plan, mm.weights[0], self.limit):
            return None
        width = self.plan.buffers[mm.out][1]
        return self.nearest(range(i + 1, len(ops)), lambda j: (
            ops[j].kind == "rmsnorm" and ops[j].ins[0] == ops[j].out == mm.out and ops[j].params["group"] == width
            and "add" in self.fused.get(j, {}) and self.moves({j, *self.fused[j].values()}, i)))

    def access(self) -> list[tuple[set[str], set[str]]]:
        """(buffers only read, buffers written) of every kernel decided so far."""
        kernels = []
        for i in range(len(self.ops)):
            if i not in self.claimed:
                group = [self.ops[m] for m in (i, *self.fused.get(i, {}).values())]
                writes = {op.out for op in group}
                kernels.append(({b for op in group for b in op.ins} - writes, writes))
        return kernels

    def matmul_pair(self, i: int, partner: dict[str, str], uses: Counter,
                    access: list[tuple[set[str], set[str]]]) -> int | None:
        """A later matmul of the same input whose weight joins this one's (q and k), used nowhere
        else; a pair's outputs share one buffer, so each output has one partner in the whole plan,
        and no kernel may read one of them while it writes the other (WebGPU forbids a buffer bound
        read-only and read-write in one dispatch: a rope storing v while rotating q)."""
        a, ops = self.ops[i], self.ops

        def mixed(x: str, y: str) -> bool:
            return any((x in ro and y in rw) or (y in ro and x in rw) for ro, rw in access)

        def pairs(j: int) -> bool:
            b = ops[j]
            if b.kind != "matmul" or b.ins != a.ins or b.out == a.out or not self.free(j):
                return False
            if uses[a.weights[0]] + uses[b.weights[0]] > 2:
                return False
            if partner.get(a.out, b.out) != b.out or partner.get(b.out, a.out) != a.out or mixed(a.out, b.out):
                return False
            return _joinable(self.plan, (a.weights[0], b.weights[0]), self.limit) and self.moves({j}, i)

        return self.nearest(range(i + 1, len(ops)), pairs)


def fuse(plan: Plan, binding_limit: int = DEFAULT_BINDING_LIMIT, adapted: Collection[str] = ()) -> list[Kernel]:
    """The plan as the GPU runs it: fused kernels in execution order; with `adapted`, the weights
    LoRA adapters may change, also the A·x kernels of their side paths (`lora_shrinks`)."""
    f, ops = _Fusion(plan, binding_limit), plan.ops
    ropes = [i for i, op in enumerate(ops) if op.kind == "rope"]
    for i in ropes:  # Q/K norms into their ropes
        if (j := f.rope_norm(i)) is not None:
            f.fold(i, "norm", j)
    for i in ropes:  # the keys' rope stores the KV cache (the attention still runs, without storing)
        if (a := f.rope_store(i)) is not None:
            f.fused.setdefault(i, {})["store"] = a
            f.stored.add(a)
    for i in ropes:  # the queries' rope moves to the keys'
        if i not in f.claimed and (j := f.rope_pair(i)) is not None:
            own = f.fused.pop(j, {})
            f.fold(i, "pair", j)
            if "norm" in own:
                f.fold(i, "pair_norm", own["norm"])
    for j, op in enumerate(ops):  # post-norm + residual add + next pre-norm
        if op.kind == "rmsnorm" and (chain := f.residual(j)) is not None:
            add, then = chain
            f.fold(j, "add", add)
            if then is not None:
                f.fold(j, "then", then)
    for k, op in enumerate(ops):  # a residual add (no post-norm) + the next pre-norm
        if op.kind == "add" and (m := f.add_then(k)) is not None:
            f.fold(k, "then", m)
    partner: dict[str, str] = {}
    uses = Counter(name for op in ops for name in op.weights)
    access = f.access()
    for i, op in enumerate(ops):
        if op.kind != "matmul" or not f.free(i):
            continue
        if (j := f.matmul_norm(i)) is not None:  # ... run by the mat-vec before it
            for role, k in {"norm": j, **f.fused.pop(j)}.items():
                f.fold(i, role, k)
        elif (k := f.matmul_add(i)) is not None:
            for role, m in {"add": k, **f.fused.pop(k, {})}.items():
                f.fold(i, role, m)
        elif (j := f.matmul_pair(i, partner, uses, access)) is not None:
            f.fold(i, "second", j)
            partner[op.out], partner[ops[j].out] = ops[j].out, op.out
    kernels = []
    for i, op in enumerate(ops):
        if i in f.claimed:
            continue
        kind = op.kind
        if kind == "glu":
            kind = "glu" if _joinable(plan, op.weights, binding_limit) else "glu_split"
        kernels.append(Kernel(kind, i, f.fused.get(i, {})))
    return lora_shrinks(plan, kernels, adapted) if adapted else kernels


LORA_READERS = ("matmul", "glu", "glu_split")  # kernels that apply LoRA side paths


def kernel_weights(plan: Plan, kernel: Kernel) -> list[str]:
    """The weights a matmul kind of kernel multiplies by, in the order its rows take them."""
    second = [plan.ops[kernel.fused["second"]].weights[0]] if "second" in kernel.fused else []
    return [*plan.ops[kernel.op].weights, *second]


def lora_shrinks(plan: Plan, kernels: list[Kernel], adapted: Collection[str]) -> list[Kernel]:
    """`kernels` with a `lora_shrink` kernel before the first reader of each input value whose
    weights are all adapted: its roles "reader 0", "reader 1", ... are the anchor ops of the kernels
    that then read u (every one reading that x before a kernel writes it again)."""
    out: list[Kernel] = []
    open_groups: dict[str, int] = {}  # input buffer -> index in `out` of its shrink kernel
    for kernel in kernels:
        op = plan.ops[kernel.op]
        if kernel.kind in LORA_READERS and set(kernel_weights(plan, kernel)) <= set(adapted):
            x = op.ins[0]
            if x not in open_groups:
                open_groups[x] = len(out)
                out.append(Kernel("lora_shrink", kernel.op, {}))
            readers = out[open_groups[x]].fused
            readers[f"reader {len(readers)}"] = kernel.op
        out.append(kernel)
        for written in {plan.ops[i].out for i in kernel.ops()}:  # a new value of x: a new group
            open_groups.pop(written, None)
    return out

def stored_attentions(kernels: list[Kernel]) -> set[int]:
    """The attention ops whose KV-cache store a rope kernel does."""
    return {k.fused["store"] for k in kernels if "store" in k.fused}


# --- printing -------------------------------------------------------------------------------------

def _layer(plan: Plan, kernel: Kernel) -> int | None:
    """The block a kernel is built in: its anchor op's attention layer or `blk.N.` weight."""
    op = plan.ops[kernel.op]
    if op.kind == "attention":
        return op.params["layer"]
    for w in op.weights:
        if m := re.match(r"blk\.(\d+)\.", w):
            return int(m.group(1))
    return None


def label(plan: Plan, kernel: Kernel) -> str:
    """One kernel as llama2.c's step comments would say it, e.g. "matmul o + norm + residual x + norm h"."""
    op, roles, ops = plan.ops[kernel.op], kernel.fused, plan.ops
    window = f" (window {op.params['window']})" if op.kind == "attention" and op.params["window"] else ""
    names = {
        "matmul": f"matmul {op.out}" + (f"+{ops[roles['second']].out}" if "second" in roles else ""),
        "rope": "rope " + ",".join(ops[r].out for r in (roles.get("pair"), kernel.op) if r is not None),
        "attention": f"attention{window}",
        "glu": f"glu {op.params.get('act')}",
        "glu_split": f"glu {op.params.get('act')} (gate, up, act: 3 kernels)",
        "lora_shrink": f"lora A·{op.ins[0]}",
    }
    text = names.get(kernel.kind, f"{'norm' if kernel.kind == 'rmsnorm' else kernel.kind} {op.out}")
    extras = (("norm" in roles or "pair_norm" in roles, " + norm"), ("store" in roles, " + kv store"),
              ("add" in roles, f" + residual {ops[roles['add']].out}" if "add" in roles else ""),
              ("then" in roles, f" + norm {ops[roles['then']].out}" if "then" in roles else ""))
    return text + "".join(words for present, words in extras if present)


def describe(plan: Plan, kernels: list[Kernel]) -> list[str]:
    """The program, one line per run of identical layers: "layers 1-4: matmul q+k | ..."."""
    sections: list[tuple[str, list[str]]] = []  # (prologue | layer number | head, kernel labels)
    current = "prologue"
    for kernel in kernels:
        layer = _layer(plan, kernel)
        current = "head" if plan.ops[kernel.op].kind == "gather" else (str(layer) if layer is not None else current)
        if not sections or sections[-1][0] != current:
            sections.append((current, []))
        sections[-1][1].append(label(plan, kernel))
    lines: list[str] = []
    run: list[tuple[int, list[str]]] = []  # consecutive layers with one program

    def flush() -> None:
        if run:
            first, last = run[0][0], run[-1][0]
            lines.append(f"{'layer' if first == last else 'layers'} {first if first == last else f'{first}-{last}'}: "
                         + " | ".join(run[0][1]))
            run.clear()

    for section, program in sections:
        if section.isdigit():
            if run and run[-1][1] != program:
                flush()
            run.append((int(section), program))
        else:
            flush()
            lines.append(f"{section}: " + " | ".join(program))
    flush()
    return lines
