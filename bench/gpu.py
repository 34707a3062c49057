"""Benchmark of the gpu executor: QFT, GHZ and quantum-volume circuits; our fused passes
at each fusion width k against the same gates one by one, cuStateVec Ex's SVUpdater and
a bandwidth lower bound of exactly what is timed. `--cpu-reference` runs the same
pipeline on the NumPy backend at small sizes.

    python bench/gpu.py                                   # on a GPU node: 20-30 qubits
    python bench/gpu.py --qubits 24,28 --fusion-sweep 2,3,4,5,6 --json out.json
    python bench/gpu.py --cpu-reference                   # smoke test on a CPU: 12-18 qubits

Timed regions: `fused`/`unfused` are reset to |0> plus every pass of the plan, with the
matrices already on the device (uploaded once, outside the timing); `svupd` is the
SVUpdater's set-zero plus apply; `job` is a whole job (lower, fuse, upload, apply,
sample 1000 shots). The bound for fused/unfused is what those regions must move at the
measured copy bandwidth: one state write for the reset, then per pass a read and a write
of the amplitudes it touches (a pass with c controls touches 2^-c of the state).
Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qiskit import QuantumCircuit
from qiskit.circuit.library import QFTGate, quantum_volume

from executors.base import Experiment, Job
from executors.gpu.executor import GpuExecutor
from executors.gpu.lowering import Gate, lower
from executors.gpu.runner import Plan, execute

SHOTS = 1000


def qft(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"qft{n}")
    qc.h(range(n))  # a non-trivial input so no amplitude is structurally zero
    qc.append(QFTGate(n), range(n))  # no matrix at this width: lowered via its definition
    return qc


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"ghz{n}")
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    return qc


def qv(n: int) -> QuantumCircuit:
    qc = quantum_volume(n, depth=n, seed=n)
    qc.name = f"qv{n}"
    return qc


CIRCUITS: dict[str, Callable[[int], QuantumCircuit]] = {"qft": qft, "ghz": ghz, "qv": qv}


def bound_bytes(plan: Plan, state_bytes: int) -> int:
    """Bytes the timed region must move at least: the reset writes the state once; a
    pass reads and writes the amplitudes its controls select (all of them without)."""
    total = state_bytes
    for block in plan.blocks:
        total += 2 * (state_bytes >> len(block.controls))
    return total


class Device:
    """Synchronisation and copy bandwidth of the backend under test."""

    def __init__(self, cpu: bool, device_id: int) -> None:
        self.cpu = cpu
        self.device_id = device_id
        self.cp: Any = None
        if not cpu:
            import cupy

            self.cp = cupy

    def sync(self) -> None:
        if self.cp is not None:
            self.cp.cuda.Device(self.device_id).synchronize()

    def copy_bandwidth(self, nbytes: int, repeats: int = 10) -> float:
        """Bytes moved per second (read + write) by a device-to-device copy."""
        if self.cp is None:
            src = np.ones(nbytes // 16, dtype=np.complex128)
            dst = np.empty_like(src)
            np.copyto(dst, src)
            start = time.perf_counter()
            for _ in range(repeats):
                np.copyto(dst, src)
            elapsed = (time.perf_counter() - start) / repeats
            return 2 * src.nbytes / elapsed
        cp = self.cp
        with cp.cuda.Device(self.device_id):
            src = cp.ones(nbytes // 16, dtype=cp.complex128)
            dst = cp.empty_like(src)
            cp.copyto(dst, src)
            begin, end = cp.cuda.Event(), cp.cuda.Event()
            begin.record()
            for _ in range(repeats):
                cp.copyto(dst, src)
            end.record()
            end.synchronize()
            elapsed = cp.cuda.get_elapsed_time(begin, end) / 1000 / repeats
            nb = src.nbytes
            del src, dst
            cp.get_default_memory_pool().free_all_blocks()
        return 2 * nb / elapsed


def timed(fn: Callable[[], Any], device: Device, repeats: int) -> float:
    fn()  # warm-up: plan cache, cuBLAS/kernels, buffers
    device.sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        device.sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def apply_only(ex: GpuExecutor, qc: QuantumCircuit, k: int) -> tuple[Callable[[], Any], Plan]:
    """A callable that resets to |0> and applies every pass of `qc` fused to width k,
    its matrices uploaded once beforehand; and the plan."""
    saved_k = ex.fusion_max_qubits
    ex.fusion_max_qubits = k  # plans are cached per (structure, k)
    try:
        plan, matrices, _ = ex.plan_for(qc)
    finally:
        ex.fusion_max_qubits = saved_k
    backend: Any = ex._backend  # the bench times the backend directly
    rng = np.random.default_rng(0)
    with backend.session():
        # Valid until the next upload rewrites the arena: time `run` before the next plan.
        refs = backend.upload(matrices)

    def run() -> None:
        with backend.session():
            execute(plan, refs, backend, 1, rng, max_saved_states=0)

    return run, plan


def svupdater_time(
    gates: list[Gate], n: int, precision: str, device_id: int, device: Device, repeats: int
) -> float | None:
    """cuStateVec Ex's own fusing updater on the same lowered gates, if available."""
    try:
        import cuquantum
        from cuquantum.bindings import custatevec as cs
        from cuquantum.bindings import custatevecEx as ex
    except ImportError as exc:
        print(f"# svupdater n/a: {exc}")
        return None
    data = cuquantum.cudaDataType
    sv_type = int(data.CUDA_C_32F if precision == "single" else data.CUDA_C_64F)
    state = updater = 0
    try:
        config = ex.configure_state_vector_single_device(sv_type, n, n, device_id, 0)
        state = ex.state_vector_create_single_process(config, 0, 0, 0)
        ex.dictionary_destroy(config)
        config = ex.configure_sv_updater(sv_type)
        updater = ex.sv_updater_create(config, 0)
        ex.dictionary_destroy(config)
        keep = []
        for g in gates:
            # SVUpdater copies host matrices when enqueued; complex128 is accepted by both
            # single- and double-precision updaters.
            m = np.ascontiguousarray(g.matrix, dtype=np.complex128)
            keep.append(m)
            kind = ex.MatrixType.DIAGONAL if g.diagonal else ex.MatrixType.DENSE
            ex.sv_updater_enqueue_matrix(
                updater,
                m.ctypes.data,
                int(data.CUDA_C_64F),
                int(kind),
                int(cs.MatrixLayout.ROW),
                0,
                list(g.targets),
                len(g.targets),
                list(g.controls) if g.controls else 0,
                list(g.ctrl_values) if g.controls else 0,
                len(g.controls),
            )

        def run() -> None:
            ex.state_vector_set_zero_state(state)
            ex.sv_updater_apply(updater, state, 0, 0)
            ex.state_vector_synchronize(state)

        return timed(run, device, repeats)
    except Exception as exc:  # missing symbol, older API, out of memory: report, go on
        print(f"# svupdater n/a for {n} qubits {precision}: {type(exc).__name__}: {exc}")
        return None
    finally:
        if updater:
            ex.sv_updater_destroy(updater)
        if state:
            ex.state_vector_destroy(state)


@dataclass(slots=True)
class Row:
    """One figure: a circuit at one size, precision and fusion width (k 0 = unfused)."""

    circuit: str
    n: int
    precision: str
    k: int
    gates: int
    passes: int
    ms: float
    bound_ms: float
    over_bound: float
    kind: str  # "fused", "unfused", "svupdater", "job"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cpu-reference", action="store_true", help="NumPy backend, small sizes")
    parser.add_argument("--qubits", help="comma-separated sizes (default 20,24,28,30; CPU 12-18)")
    parser.add_argument("--precision", default="single,double")
    parser.add_argument("--circuits", default="qft,ghz,qv")
    parser.add_argument("--fusion", type=int, default=5, help="fusion_max_qubits for 'job'")
    parser.add_argument("--fusion-sweep", default="2,3,4,5,6", help="fused widths k to time")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (GPU 3, CPU 5)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--budget-s", type=float, help="stop starting new sizes after this")
    parser.add_argument("--json", help="also write every row (and the device) as JSON here")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cpu = bool(args.cpu_reference)
        self.repeats = args.repeats or (5 if self.cpu else 3)
        self.device = Device(self.cpu, args.device_id)
        self.backend = "numpy" if self.cpu else "custatevec"
        probe = GpuExecutor({"backend": self.backend, "device_id": args.device_id})
        self.device_name = probe.capabilities().device
        probe.close()
        self.bandwidth = self.device.copy_bandwidth(256 << 20 if self.cpu else 2 << 30)
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.start = time.monotonic()

    def row(self, kind: str, name: str, n: int, precision: str, k: int, **fig: Any) -> Row:
        bound = float(fig["bound_s"])
        row = Row(
            circuit=name,
            n=n,
            precision=precision,
            k=k,
            gates=int(fig["gates"]),
            passes=int(fig["passes"]),
            ms=float(fig["s"]) * 1e3,
            bound_ms=bound * 1e3,
            over_bound=float(fig["s"]) / bound if bound else 0.0,
            kind=kind,
        )
        self.rows.append(row)
        print(
            f"{name:<6}{n:>4} {precision:<7}{kind:<10}{k:>3}{row.gates:>7}{row.passes:>7}"
            f"{row.ms:>11.2f}{row.bound_ms:>11.2f}{row.over_bound:>9.2f}",
            flush=True,
        )
        return row

    def one(self, name: str, n: int, precision: str) -> None:
        args = self.args
        circuit = CIRCUITS[name](n)
        gates = lower(circuit).gates()
        state_bytes = (1 << n) * (8 if precision == "single" else 16)
        options = {
            "backend": self.backend,
            "precision": precision,
            "fusion_max_qubits": args.fusion,
            "device_id": args.device_id,
            "seed": 1,
        }
        ex = GpuExecutor(options)
        try:
            job = Job("bench", (Experiment(circuit.measure_all(inplace=False), SHOTS),))
            whole = timed(lambda: ex.run(job), self.device, self.repeats)
            ks = [0] + [int(k) for k in args.fusion_sweep.split(",") if k]
            for k in ks:
                fn, plan = apply_only(ex, circuit, k)
                moved = bound_bytes(plan, state_bytes)
                elapsed = timed(fn, self.device, self.repeats)
                kind = "unfused" if k == 0 else "fused"
                fig = {"gates": len(gates), "passes": plan.passes, "s": elapsed}
                self.row(kind, name, n, precision, k, bound_s=moved / self.bandwidth, **fig)
            fig = {"gates": len(gates), "passes": 0, "s": whole, "bound_s": 0.0}
            self.row("job", name, n, precision, args.fusion, **fig)
        finally:
            ex.close()  # free the state before the SVUpdater allocates its own
        if not self.cpu:
            svupd = svupdater_time(gates, n, precision, args.device_id, self.device, self.repeats)
            if svupd is not None:
                # SVUpdater fuses on its own: the floor is its set-zero write plus one
                # read-and-write pass.
                floor = 3 * state_bytes / self.bandwidth
                fig = {"gates": len(gates), "passes": 0, "s": svupd, "bound_s": floor}
                self.row("svupdater", name, n, precision, 0, **fig)

    def run(self) -> int:
        args = self.args
        default_sizes = "12,14,16,18" if self.cpu else "20,24,28,30"
        sizes = [int(x) for x in (args.qubits or default_sizes).split(",")]
        print(f"# device: {self.device_name}; backend: {self.backend}")
        print(
            f"# copy bandwidth: {self.bandwidth / 1e9:.1f} GB/s (read+write); medians of "
            f"{self.repeats}; bound = bytes the timed region must move / bandwidth"
        )
        print(
            f"{'circ':<6}{'n':>4} {'prec':<7}{'kind':<10}{'k':>3}{'gates':>7}{'passes':>7}"
            f"{'ms':>11}{'bound_ms':>11}{'x_bound':>9}"
        )
        self.start = time.monotonic()
        for n in sizes:
            for name in args.circuits.split(","):
                for precision in args.precision.split(","):
                    if args.budget_s is not None and time.monotonic() - self.start > args.budget_s:
                        self.skipped.append(f"{name} {n} {precision}")
                        continue
                    self.one(name, n, precision)
                    self.write_json()  # after each size, so a run cut short keeps its rows
        if self.skipped:
            print(f"# budget of {args.budget_s} s spent; not run: {', '.join(self.skipped)}")
        self.write_json()
        return 0

    def write_json(self) -> None:
        if not self.args.json:
            return
        report = {
            "device": self.device_name,
            "backend": self.backend,
            "copy_bandwidth_bytes_per_s": self.bandwidth,
            "repeats": self.repeats,
            "rows": [asdict(r) for r in self.rows],
            "skipped": self.skipped,
            "seconds": time.monotonic() - self.start,
        }
        Path(self.args.json).write_text(json.dumps(report, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    return Bench(parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
