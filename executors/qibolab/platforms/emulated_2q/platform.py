"""`emulated_2q`: qpi-driver's own two-transmon device, run by qibolab's pulse-level
emulator (QuTiP). Qubit 0 has a fixed frequency; qubit 1 is flux-tunable, and a flux
pulse on it that brings |11> into resonance with |02> makes the CZ gate. The figures
(Hamiltonian, pulses, CZ) are in parameters.json; README.md says how they were found."""

from qibolab import AcquisitionChannel, ConfigKinds, DcChannel, Hardware, IqChannel, Qubit
from qibolab.instruments.emulator import (
    DriveEmulatorConfig,
    EmulatorController,
    FluxEmulatorConfig,
    HamiltonianConfig,
)

# parameters.json uses these config kinds; qibolab only parses kinds it was told about.
ConfigKinds.extend([HamiltonianConfig, DriveEmulatorConfig, FluxEmulatorConfig])

QUBITS = (0, 1)


def create() -> Hardware:
    qubits: dict[int, Qubit] = {}
    channels: dict[str, IqChannel | DcChannel | AcquisitionChannel] = {}
    for q in QUBITS:
        qubits[q] = qubit = Qubit.default(q)
        channels |= {
            qubit.drive: IqChannel(mixer=None, lo=None),
            qubit.flux: DcChannel(),
            qubit.probe: IqChannel(mixer=None, lo=None),
            qubit.acquisition: AcquisitionChannel(twpa_pump=None, probe=qubit.probe),
        }
    emulator = EmulatorController(address="emulator", channels=channels)
    return Hardware(instruments={"emulator": emulator}, qubits=qubits)
