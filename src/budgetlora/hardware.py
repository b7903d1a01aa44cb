"""Pick the device and the numeric precision the hardware runs fastest without losing accuracy."""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from .config import ConfigError

log = logging.getLogger(__name__)

# What --device takes: the CPU, the first visible GPU, or the GPU of that index.
DEVICE_CHOICE = re.compile(r"cpu|cuda(?::(\d+))?")
# What prediction can run in (--precision of predict, evaluate and serve); training takes all but the int8 ones.
PREDICT_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int8-onnx")
# torch's quantized engine that int8 prediction packs its weights for (fbgemm's kernels on x86 CPUs; onednn was
# measured no faster).
INT8_ENGINE = "x86"


class DeviceError(ValueError):
    """--device names no device this process can use."""


def select_device(choice: str) -> None:
    """Make `choice` ("cpu", "cuda" or "cuda:N") the only device this process computes on, by hiding the others.

    Hiding (CUDA_VISIBLE_DEVICES) rather than passing a device along, because transformers' Trainer trains on cuda:0,
    and on every visible GPU at once (DataParallel), whatever it is told: with one GPU visible, or none, training,
    inference, precision and the manifest all agree. CUDA reads the variable once, when it starts, so this must run
    before anything asks CUDA anything: `budgetlora` calls it before a command runs.
    """
    match = DEVICE_CHOICE.fullmatch(choice)
    if match is None:
        raise DeviceError(f"--device {choice}: expected cpu, cuda or cuda:N (N: a GPU index)")
    if torch.cuda.is_initialized():
        raise DeviceError(f"--device {choice}: CUDA has already started in this process, too late to choose")
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if not torch.backends.cuda.is_built():
        raise DeviceError(f"--device {choice}: this PyTorch build has no CUDA support (torch {torch.__version__})")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()  # NVML's count of the visible GPUs: CUDA itself does not start
    if index >= count:
        raise DeviceError(f"--device {choice}: no such device ({count} CUDA device(s) visible)")
    # An index counts the GPUs already visible, as torch numbers them: with CUDA_VISIBLE_DEVICES=2,3, cuda:1 is GPU 3.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index].strip() if visible else str(index)


def device() -> torch.device:
    """This process's device. Under torchrun each process owns the GPU of its LOCAL_RANK (where Trainer puts its
    model); plain "cuda" would be GPU 0 for every process until Trainer sets the current device, so work done before
    that (train.head_init's probe) would crowd onto GPU 0. The modulo: a launcher that shows each process one GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def pad_multiple(on: torch.device) -> int | None:
    """Batch lengths on a GPU round up to a multiple of 8: tensor-core tiles, and few distinct shapes for the kernels
    chosen per shape. On a CPU the extra padding would only be extra work."""
    return 8 if on.type == "cuda" else None


def loader_workers(requested: int | None, on: torch.device) -> int:
    """train.dataloader_workers; None: 2 on a GPU (the next batches are collated while it computes), 0 on a CPU,
    where a worker process would take a core from the computation itself."""
    if requested is not None:
        return requested
    return 2 if on.type == "cuda" else 0


def cpu_supports_bf16() -> bool:
    # oneDNN reports native bf16 (AVX512-BF16 or AMX); emulated bf16 on older CPUs is slower than fp32.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(requested: str) -> str:
    """"auto": bf16 on Ampere-or-newer GPUs and bf16-capable CPUs, fp16 (with loss scaling) on older GPUs, else fp32."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_predict_precision(requested: str, on: torch.device) -> str:
    """Prediction's precision on device `on`: `requested` (PREDICT_PRECISIONS) as resolve_precision reads it, or an
    int8 one, on a CPU only and only when asked, because it changes some labels of a real run (README, "int8
    prediction"): "int8", the linear layers dynamically quantised by torch (modeling.quantize_int8; x86 CPUs), or
    "int8-onnx", onnxruntime running the exported graph with int8 weights (onnx_int8.py; the onnx extra), the one
    that changes fewer labels. So "auto" keeps the precision the model was validated in."""
    if requested not in PREDICT_PRECISIONS:
        raise ConfigError(f"--precision {requested!r}: expected one of {', '.join(PREDICT_PRECISIONS)}")
    if requested == "fp16" and on.type == "cpu":  # emulated in fp32: slower than either
        log.warning("precision fp16 on a CPU (--precision, or the run's train.precision): most CPUs have no fp16 "
                    "matrix kernels, so it runs slower than bf16 or fp32 (auto picks one of those)")
    if not requested.startswith("int8"):
        return resolve_precision(requested)
    if on.type != "cpu":
        raise ConfigError(f"--precision {requested}: int8 prediction runs on the CPU only (torch's dynamic "
                          f"quantisation has no {on.type} kernels; budgetlora runs onnxruntime's CPU provider only); "
                          f"here use auto, bf16 or fp16, or --device cpu for {requested}")
    if requested == "int8-onnx":
        from .export_onnx import require_onnx

        require_onnx("--precision int8-onnx")
        return requested
    if INT8_ENGINE not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"--precision int8: this CPU has no {INT8_ENGINE!r} quantized engine (torch's int8 kernels "
                          f"for x86); use auto, bf16 or fp32")
    return "int8"


def autocast(precision: str, on: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference; the master weights stay fp32 (int8 layers take fp32 activations)."""
    if precision in ("fp32", "int8", "int8-onnx"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=on.type, dtype=dtype)
