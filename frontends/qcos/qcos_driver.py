"""The driver class QCOS loads (entry point group `qcos.drivers`, name `qpi-node`) to reach a
qpi-driver node's QCOS front end over qcos-mc/1 (a ZeroMQ ROUTER, and a PUB for events).

It runs on the QCOS host, not on the node: it imports only QCOS's own SDK (`hal`, from
`qcos-driver-sdk` or the QCOS server, with pyzmq) and the standard library, so this module
is importable only where that SDK is installed. Nothing in the node imports it.

Configuration is the QCOS host's environment: `QPI_QCOS_ENDPOINT` (the node's ROUTER,
default tcp://127.0.0.1:7610), `QPI_QCOS_EVENTS` (its PUB, default tcp://127.0.0.1:7611)
and `QPI_QCOS_DEVICE_ID` (the node's device id, default qpi-node). What the device is -
qubits, limits, native gates, simulator or hardware - is asked of the node itself
(`device_config`) when the driver is built, never repeated here."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from hal.capabilities import (
    BackendIdentity,
    CalibrationSupport,
    Connectivity,
    DeviceCapabilities,
    EvidenceSupport,
    GateSet,
    HardwareSpec,
    Limits,
    MCProfile,
    MCTransport,
    Modality,
    Operations,
    Telemetry,
)
from hal.driver import DriverError
from hal.mc.driver import MCDriver
from hal.mc.messages import MCRequest, Operation
from hal.mc.modalities import TranslationError, get_adapter
from hal.mc.transport import MCEventListener, MCTransportError, ZMQTransport

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7610"
DEFAULT_EVENTS = "tcp://127.0.0.1:7611"
DEFAULT_DEVICE_ID = "qpi-node"
# How long construction waits for the node's device_config: long enough for a busy node
# (the front end answers from its own loop, never behind a running job), short enough
# that a QCOS registry resolving a dead node fails in seconds, not after 3 x 30 s.
CONFIG_TIMEOUT_S = 5.0

# The evidence bundle is MCDriver.generate_evidence: Ed25519 over the SHA-256 of the
# result, with a per-instance key (it proves self-consistency only, as the SDK says).
EVIDENCE_FIELDS = ["evidence_id", "timestamp", "hash", "signature", "algorithm",
                   "public_key", "device_id"]


def _setting(name: str, default: str) -> str:
    return os.environ.get(name) or default


class QpiNodeDriver(MCDriver):
    """A qpi-driver node as a QCOS measurement-and-control device.

    Built with no arguments (that is how QCOS and `qcos-driver-cert` build it); the
    keyword arguments override the environment, for a QCOS that registers drivers by
    hand. Construction asks the node for its `device_config` and raises DriverError
    naming the endpoint when the node does not answer within `config_timeout_s`."""

    # QCOS's registry reads the targets from the class, before building the driver.
    targets: tuple[str, ...] = (_setting("QPI_QCOS_DEVICE_ID", DEFAULT_DEVICE_ID),)

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        events: str | None = None,
        device_id: str | None = None,
        config_timeout_s: float = CONFIG_TIMEOUT_S,
    ) -> None:
        node = device_id or _setting("QPI_QCOS_DEVICE_ID", DEFAULT_DEVICE_ID)
        self.endpoint = endpoint or _setting("QPI_QCOS_ENDPOINT", DEFAULT_ENDPOINT)
        self.events_endpoint = events or _setting("QPI_QCOS_EVENTS", DEFAULT_EVENTS)
        self.targets = (node,)
        config = fetch_device_config(node, self.endpoint, config_timeout_s)
        super().__init__(ZMQTransport(node, self.endpoint))
        self._declared = capabilities_from_config(
            node, config, request_timeout_s=self.transport.timeout_s,
            events_endpoint=self.events_endpoint)
        # Calibration and maintenance events decide whether QCOS may submit (see
        # MCDriver.handle_event); QCOS has no field for where a device publishes them,
        # so the driver, which knows, subscribes.
        self.events = MCEventListener(node, self.events_endpoint, self.handle_event)
        self.events.start()

    def device_capabilities(self) -> DeviceCapabilities:
        return self._declared

    def disconnect(self) -> None:
        self.events.stop()
        super().disconnect()

    def _guard_availability(self) -> None:
        # A pushed calibration_started or maintenance blocks submissions until its closing
        # event. Should that event be lost (the node restarted meanwhile), ask the node
        # again once the pushed state is older than CALIBRATION_CACHE_TTL_S, rather than
        # refuse work for ever.
        if self._calibration is not None and self._calibration.blocks_scheduling:
            self.calibration_status()
        super()._guard_availability()


def fetch_device_config(device_id: str, endpoint: str, timeout_s: float) -> dict[str, Any]:
    """The node's `device_config` payload, asked once with no retry."""
    probe = ZMQTransport(device_id, endpoint, timeout_s=timeout_s, retries=0)
    try:
        reply = probe.request(MCRequest.build(Operation.DEVICE_CONFIG, device_id))
    except MCTransportError as exc:
        raise DriverError(
            f"no usable answer to device_config from the qpi-driver node {device_id!r} at "
            f"{endpoint}: {exc}. Check that the node runs with the qcos front end "
            f"(QPI_FRONTENDS includes qcos) and that QPI_QCOS_ENDPOINT and "
            f"QPI_QCOS_DEVICE_ID on this host name its endpoint and device id.",
            code=exc.code.qcos_code, category="availability",
            details={"endpoint": endpoint, "device_id": device_id},
        ) from exc
    finally:
        probe.close()
    if not reply.ok:
        raise DriverError(
            f"the qpi-driver node {device_id!r} at {endpoint} refused device_config: "
            f"{reply.code.value}: {reply.message}",
            code=reply.code.qcos_code, category="configuration",
            details={"endpoint": endpoint, "device_id": device_id},
        )
    return dict(reply.payload)


def capabilities_from_config(
    device_id: str, config: dict[str, Any], *, request_timeout_s: float, events_endpoint: str
) -> DeviceCapabilities:
    """QCOS's capability document for a node, from what the node says about itself."""
    num_qubits = _field(config, "num_qubits", int)
    limits = _field(config, "limits", dict)
    operations = [str(op) for op in _field(config, "operations", list)]
    modality = _modality(_field(config, "modality", str))
    calibration = config.get("calibration") is True
    executor = str(config.get("executor", "unknown"))
    extra_limits = {k: v for k, v in limits.items() if k == "max_queued_tasks"}
    return DeviceCapabilities(
        backend=BackendIdentity(
            id=device_id,
            name=f"qpi-driver node {device_id} ({executor})",
            provider="qpi-driver",
            backend_version=str(config.get("version", "unknown")),
            driver_version=_own_version(),
            api_version=config.get("protocol"),
        ),
        hardware=_hardware(num_qubits, _field(config, "coupling_map", list),
                           _field(config, "simulated", bool)),
        limits=Limits(
            max_shots=_field(limits, "max_shots", int, "limits."),
            max_qubits_per_circuit=_field(limits, "max_qubits_per_circuit", int, "limits."),
            max_circuit_depth=_field(limits, "max_circuit_depth", int, "limits."),
            **extra_limits,
        ),
        gates=GateSet(
            native_gates=[str(g).lower() for g in _field(config, "native_gates", list)],
            # What QCOS's own adapter rewrites into them before sending.
            basis_gates=list(get_adapter(modality).decomposable_gates),
            supports_fractional_gates=True,
        ),
        operations=Operations(
            batch_execution=True,  # MCDriver.execute_batch: one task per circuit
            job_cancellation=config.get("job_cancellation") is True
            and Operation.CANCEL_TASK.value in operations,
            job_status_polling=Operation.TASK_STATUS.value in operations,
            async_execution=True,  # MCDriver.submit_async
        ),
        telemetry=Telemetry(provides_queue_time=True),
        evidence=EvidenceSupport(supported=True, signature_algorithms=["Ed25519"],
                                 bundle_fields=EVIDENCE_FIELDS),
        mc=MCProfile(
            enabled=True,
            transport=MCTransport.ZMQ_ROUTER_DEALER,
            modality=modality,
            operations=operations,
            event_topics=[str(t) for t in config.get("event_topics", [])],
            request_timeout_s=request_timeout_s,
            self_queueing=True,
            events_endpoint=events_endpoint,
        ),
        calibration=CalibrationSupport(
            reports_device_state=Operation.DEVICE_STATE.value in operations,
            publishes_calibration_events=calibration,
            supports_calibration_trigger=calibration
            and Operation.TRIGGER_CALIBRATION.value in operations,
        ),
    )


def _hardware(num_qubits: int, coupling_map: list[Any], simulated: bool) -> HardwareSpec:
    """A map that couples every pair is all-to-all (the SDK refuses a full map declared
    any other way, and an all-to-all adapter need not check each CZ); any other map is
    the device's topology, which QCOS's adapter then enforces."""
    edges = [(int(a), int(b)) for a, b in coupling_map]
    pairs = {(min(a, b), max(a, b)) for a, b in edges if a != b}
    if len(pairs) == num_qubits * (num_qubits - 1) // 2:
        return HardwareSpec(num_qubits=num_qubits, connectivity=Connectivity.ALL_TO_ALL,
                            is_simulator=simulated)
    return HardwareSpec(num_qubits=num_qubits, connectivity=Connectivity.CUSTOM,
                        coupling_map=edges, is_simulator=simulated)


def _modality(value: str) -> Modality:
    try:
        modality = Modality(value)
        get_adapter(modality)
    except (ValueError, TranslationError) as exc:
        raise _config_error(f"modality {value!r} is not one this QCOS can drive ({exc})") from exc
    return modality


def _field(config: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = config.get(key)
    # bool is an int to Python, never to the protocol
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _config_error(f"'{where}{key}' is {value!r}, not a {kind.__name__}")
    return value


def _config_error(problem: str) -> DriverError:
    return DriverError(
        f"the qpi-driver node's device_config cannot be used: {problem}. The node and this "
        f"driver speak different versions of the contract; install the same qpi-driver "
        f"version on both.",
        code="QCOS-E-003", category="configuration",
    )


def _own_version() -> str:
    try:
        return metadata.version("qpi-driver")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"
