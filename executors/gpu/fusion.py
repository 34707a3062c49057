"""Gate fusion: groups a straight run of gates into blocks of at most k qubits (planned
from qubit sets alone, so a plan is reusable across a parameter sweep) and multiplies
each block into one dense or diagonal matrix."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from executors.gpu.lowering import Gate
from executors.gpu.numpy_backend import apply_dense, apply_diagonal


@dataclass(frozen=True, slots=True)
class Block:
    """One state pass: either a single gate as lowered (controls and diagonal form kept),
    or a product of gates as a dense/diagonal matrix on `targets` (ascending)."""

    slots: tuple[int, ...]
    targets: tuple[int, ...]
    controls: tuple[int, ...]
    ctrl_values: tuple[int, ...]
    diagonal: bool

    @property
    def fused(self) -> bool:
        return len(self.slots) > 1


def single(slot: int, gate: Gate) -> Block:
    return Block((slot,), gate.targets, gate.controls, gate.ctrl_values, gate.diagonal)


def plan_fusion(run: Sequence[tuple[int, Gate]], max_qubits: int) -> list[Block]:
    """Greedy fusion of a straight run of (slot, gate) pairs.

    Open blocks hold disjoint qubit sets, so they commute with one another and can be
    emitted in any order; a gate joins (and merges) the open blocks it touches while the
    union stays within `max_qubits`, otherwise those blocks are closed first. Adjacent
    emitted blocks are then packed together while they fit. With max_qubits <= 1 every
    gate is its own pass.
    """
    if max_qubits <= 1:
        return [single(slot, gate) for slot, gate in run]
    out: list[Block] = []
    open_blocks: list[tuple[set[int], list[tuple[int, Gate]]]] = []

    def emit(members: list[tuple[int, Gate]]) -> None:
        out.append(_block_of(members))

    for slot, gate in run:
        qubits = set(gate.qubits)
        touching = [b for b in open_blocks if b[0] & qubits]
        union = set(qubits)
        for b in touching:
            union |= b[0]
        if len(union) <= max_qubits:
            members: list[tuple[int, Gate]] = []
            for b in touching:
                members.extend(b[1])
                open_blocks.remove(b)
            members.append((slot, gate))
            open_blocks.append((union, members))
            continue
        for b in touching:
            open_blocks.remove(b)
            emit(b[1])
        if len(qubits) <= max_qubits:
            open_blocks.append((qubits, [(slot, gate)]))
        else:
            out.append(single(slot, gate))
    for b in open_blocks:
        emit(b[1])
    return _merge_adjacent(out, max_qubits, gates_by_slot={s: g for s, g in run})


def _merge_adjacent(
    blocks: list[Block], max_qubits: int, gates_by_slot: dict[int, Gate]
) -> list[Block]:
    # Neighbouring passes can always be multiplied together (their order is kept), so
    # pack them while the union fits: disjoint open blocks otherwise cost a pass each.
    out: list[Block] = []
    for block in blocks:
        if out:
            prev = out[-1]
            union = set(prev.targets + prev.controls) | set(block.targets + block.controls)
            if len(union) <= max_qubits:
                members = [(s, gates_by_slot[s]) for s in prev.slots + block.slots]
                out[-1] = _block_of(members)
                continue
        out.append(block)
    return out


def _block_of(members: list[tuple[int, Gate]]) -> Block:
    if len(members) == 1:
        return single(*members[0])
    qubits: set[int] = set()
    for _, gate in members:
        qubits.update(gate.qubits)
    diagonal = all(gate.diagonal for _, gate in members)
    return Block(tuple(s for s, _ in members), tuple(sorted(qubits)), (), (), diagonal)


def fuse(block: Block, gates: Sequence[Gate]) -> np.ndarray:
    """The block's matrix (dense 2^m x 2^m, or the diagonal when `block.diagonal`),
    computed in double precision from the member gates in order."""
    if not block.fused:
        return gates[block.slots[0]].matrix
    m = len(block.targets)
    local = {q: i for i, q in enumerate(block.targets)}
    if block.diagonal:
        d = np.ones((2,) * m, dtype=np.complex128)
        for slot in block.slots:
            g = gates[slot]
            apply_diagonal(
                d,
                m,
                g.matrix,
                [local[t] for t in g.targets],
                [local[c] for c in g.controls],
                g.ctrl_values,
            )
        return d.reshape(-1)
    dim = 1 << m
    # Columns of the identity are basis states: applying each gate to all of them at
    # once (a trailing batch axis) builds the product without embedding matrices.
    u = np.eye(dim, dtype=np.complex128).reshape((2,) * m + (dim,))
    for slot in block.slots:
        g = gates[slot]
        targets = [local[t] for t in g.targets]
        controls = [local[c] for c in g.controls]
        if g.diagonal:
            apply_diagonal(u, m, g.matrix, targets, controls, g.ctrl_values)
        else:
            u = apply_dense(u, m, g.matrix, targets, controls, g.ctrl_values)
    return np.ascontiguousarray(u.reshape(dim, dim))


class FusedMatrices:
    """Per-plan memo of fused products: a block is re-multiplied only when one of its
    gates' matrix keys changed (the sweep case) or a gate has no key."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self._blocks = list(blocks)
        self._keys: list[tuple[Hashable, ...] | None] = [None] * len(self._blocks)
        self._values: list[np.ndarray | None] = [None] * len(self._blocks)
        self.computed = 0

    def matrices(self, gates: Sequence[Gate]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i, block in enumerate(self._blocks):
            if not block.fused:
                out.append(gates[block.slots[0]].matrix)
                continue
            keys = tuple(gates[s].key for s in block.slots)
            cached = self._values[i]
            if cached is not None and None not in keys and keys == self._keys[i]:
                out.append(cached)
                continue
            value = fuse(block, gates)
            self.computed += 1
            self._keys[i], self._values[i] = keys, value
            out.append(value)
        return out


__all__ = ["Block", "FusedMatrices", "fuse", "plan_fusion", "single"]
