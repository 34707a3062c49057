"""Benchmark of the gpu executor: QFT, GHZ and quantum-volume circuits, our fused path
against the same gates applied one by one, cuStateVec Ex's SVUpdater and the bandwidth
bound. `--cpu-reference` runs the same pipeline on the NumPy backend at small sizes.

    python bench/gpu.py                      # on a GPU node: 20-32 qubits
    python bench/gpu.py --cpu-reference      # smoke test on a CPU: 12-18 qubits

Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qiskit import QuantumCircuit
from qiskit.circuit.library import QFTGate, quantum_volume

from executors.base import Experiment, Job
from executors.gpu.executor import GpuExecutor
from executors.gpu.lowering import Gate, lower
from executors.gpu.runner import execute

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


def apply_only(ex: GpuExecutor, qc: QuantumCircuit, k: int) -> tuple[Callable[[], Any], int]:
    """A callable that evolves |0> through `qc` with fusion width k; and its pass count."""
    saved_k = ex.fusion_max_qubits
    ex.fusion_max_qubits = k  # plans are cached per (structure, k)
    try:
        plan, matrices, _ = ex.plan_for(qc)
    finally:
        ex.fusion_max_qubits = saved_k
    backend: Any = ex._backend  # the bench times the backend directly
    rng = np.random.default_rng(0)

    def run() -> None:
        with backend.session():
            refs = backend.upload(matrices)
            execute(plan, refs, backend, 1, rng, max_saved_states=0)

    return run, plan.passes


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


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-reference", action="store_true", help="NumPy backend, small sizes")
    parser.add_argument("--qubits", help="comma-separated sizes (default 20,24,28,32; CPU 12-18)")
    parser.add_argument("--precision", default="single,double")
    parser.add_argument("--circuits", default="qft,ghz,qv")
    parser.add_argument("--fusion", type=int, default=5, help="fusion_max_qubits for 'ours'")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (GPU 3, CPU 5)")
    parser.add_argument("--device-id", type=int, default=0)
    args = parser.parse_args(argv)

    cpu = args.cpu_reference
    args.repeats = args.repeats or (5 if cpu else 3)
    default_sizes = "12,14,16,18" if cpu else "20,24,28,32"
    sizes = [int(x) for x in (args.qubits or default_sizes).split(",")]
    precisions = args.precision.split(",")
    device = Device(cpu, args.device_id)
    backend = "numpy" if cpu else "custatevec"
    probe = GpuExecutor({"backend": backend, "device_id": args.device_id})
    device_name = probe.capabilities().device
    probe.close()
    bandwidth = device.copy_bandwidth(256 << 20 if cpu else 2 << 30)
    print(f"# device: {device_name}; backend: {backend}; fusion_max_qubits: {args.fusion}")
    print(f"# copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read+write); medians of {args.repeats}")
    print(f"# ours = whole job ({SHOTS} shots: lower, fuse, upload, apply, sample);")
    print("# fused/unfused = gate application only; bound = passes x 2 x state / bandwidth")
    header = (
        f"{'circuit':<8}{'n':>4} {'prec':<7}{'gates':>7}{'passes':>7}{'ours_ms':>11}"
        f"{'fused_ms':>11}{'unfused_ms':>12}{'svupd_ms':>11}{'bound_ms':>11}{'fused/bnd':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in args.circuits.split(","):
        for n in sizes:
            circuit = CIRCUITS[name](n)
            measured = circuit.measure_all(inplace=False)
            gates = lower(circuit).gates()
            for precision in precisions:
                options = {
                    "backend": backend,
                    "precision": precision,
                    "fusion_max_qubits": args.fusion,
                    "device_id": args.device_id,
                    "seed": 1,
                }
                ex = GpuExecutor(options)
                job = Job("bench", (Experiment(measured, SHOTS),))
                ours = timed(partial(ex.run, job), device, args.repeats)
                fused_fn, passes = apply_only(ex, circuit, args.fusion)
                fused = timed(fused_fn, device, args.repeats)
                unfused_fn, _ = apply_only(ex, circuit, 0)
                unfused = timed(unfused_fn, device, args.repeats)
                state_bytes = (1 << n) * (8 if precision == "single" else 16)
                ex.close()  # free the state before the SVUpdater allocates its own
                svupd = (
                    None
                    if cpu
                    else svupdater_time(gates, n, precision, args.device_id, device, args.repeats)
                )
                bound = passes * 2 * state_bytes / bandwidth
                print(
                    f"{name:<8}{n:>4} {precision:<7}{len(gates):>7}{passes:>7}"
                    f"{fmt_ms(ours):>11}{fmt_ms(fused):>11}{fmt_ms(unfused):>12}"
                    f"{fmt_ms(svupd):>11}{fmt_ms(bound):>11}{fused / bound:>10.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
