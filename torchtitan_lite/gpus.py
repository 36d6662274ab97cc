"""The GPUs the project knows: their dense bf16 peaks (for MFU) and what the dry run sizes a
job with. One table, read by the metrics, the dry run and the config's ``dry_run.gpu`` type."""

from __future__ import annotations

from dataclasses import dataclass

#: Dense (no sparsity) bf16 tensor-core peak TFLOP/s of one device, keyed by the exact name
#: ``torch.cuda.get_device_name`` reports: variants of one chip differ (H100 SXM 989, PCIe
#: 756, NVL 835), so names are matched whole, never by substring. Others: metrics.peak_tflops.
PEAK_BF16_TFLOPS = {
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # H200 SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA B200": 2250.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L4": 121.0,
    "AMD Instinct MI300X": 1307.4,
}


@dataclass(frozen=True)
class GPU:
    """A GPU the dry run can size a job for: its device name (a key of
    :data:`PEAK_BF16_TFLOPS`, so MFU and the dry run share one peak), memory, and the per-GPU
    bandwidth of its links within a node (NVLink / Infinity Fabric, one direction) and across
    nodes (the usual 400 Gb/s NIC per GPU)."""

    name: str
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float = 50.0
    gpus_per_node: int = 8

    @property
    def peak_tflops(self) -> float:
        return PEAK_BF16_TFLOPS[self.name]


#: ``dry_run.gpu`` choices. Memory is what ``torch.cuda.get_device_properties`` reports.
GPUS = {
    "h100": GPU("NVIDIA H100 80GB HBM3", 79.6, 450.0),
    "h200": GPU("NVIDIA H200", 139.8, 450.0),
    "a100": GPU("NVIDIA A100-SXM4-80GB", 79.3, 300.0),
    "b200": GPU("NVIDIA B200", 178.4, 900.0),
    "l40s": GPU("NVIDIA L40S", 44.4, 32.0),
    "mi300x": GPU("AMD Instinct MI300X", 191.5, 448.0),
}
