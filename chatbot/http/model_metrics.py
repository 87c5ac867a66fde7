"""What the served model computes in, as a Prometheus info gauge.

``chatbot_model_info{model, device, dtype, cpu_isa} 1`` lets a dashboard tell an int8
replica on an AMX CPU from a float32 one on AVX2 when their speeds differ: the same
facts ``/info`` gives, where the other metrics are.
"""

from __future__ import annotations

from types import ModuleType

from chatbot.schemas import ModelInfo


class ModelInfoGauge:
    def __init__(self, metrics: ModuleType) -> None:
        self.gauge = metrics.Gauge(
            name="chatbot_model_info",
            documentation="The served model, its device, precision (CHATBOT_DTYPE) and "
            "the CPU instruction set its kernels use; always 1",
            labelnames=["model", "device", "dtype", "cpu_isa"],
            multiprocess_mode="max",
        )

    def show(self, info: ModelInfo) -> None:
        labels = {"model": info.model, "device": info.device, "dtype": info.dtype}
        self.gauge.labels(**labels, cpu_isa=info.cpu_isa or "").set(1)
