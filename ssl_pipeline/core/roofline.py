"""How close a training step runs to the hardware's own limit.

Two figures make the comparison, both measured on the same device, threads and precision as the step:
- the step's FLOPs, counted by `torch.utils.flop_counter.FlopCounterMode` on the real model and loss
  (forward and backward; matmuls, convolutions and attention are counted, pointwise work such as
  BatchNorm, ReLU, the augmentation and the optimizer is not, as in every FLOP-based efficiency figure);
- the roof: the rate of one large convolution (3x3, 128 -> 128 channels at 14x14, channels_last, the
  shape of our encoder's widest stage) and of one large square matmul, in the step's precision.
The step's TFLOP/s over the convolution roof is its efficiency: the fraction of what this machine does on
the kind of work the encoder is made of.
"""
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

TERA = 1e12
# Problem sizes of the roof, per device type: large enough to saturate it, small enough to time in seconds.
ROOF_SHAPES = {
    "cpu": {"conv_batch": 256, "matmul_size": 2048},
    "cuda": {"conv_batch": 4096, "matmul_size": 8192},
}
CONV_CHANNELS, CONV_SIZE = 128, 14


def count_flops(run) -> int:
    """FLOPs of whatever `run()` executes (forward and backward alike), counted, not estimated."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(operation, flops: int, device, seconds: float, warmup: int = 2) -> float:
    """Best FLOP/s of `operation` over repeated runs for about `seconds` after `warmup` runs: the best,
    not the mean, because a roof is what the hardware can do, and noise only ever slows it down."""
    for _ in range(warmup):
        operation()
    synchronize(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        operation()
        synchronize(device)
        best = max(best, flops / (time.perf_counter() - started))
        if time.perf_counter() > deadline:
            return best


def measure_roof(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> dict:
    """TFLOP/s of a large convolution (forward) and a large matmul in `dtype` on `device`, with the
    threads torch uses now."""
    shapes = ROOF_SHAPES[device.type]
    batch, size = shapes["conv_batch"], shapes["matmul_size"]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs = tensor(batch, CONV_CHANNELS, CONV_SIZE, CONV_SIZE).contiguous(memory_format=torch.channels_last)
    weight = tensor(CONV_CHANNELS, CONV_CHANNELS, 3, 3).contiguous(memory_format=torch.channels_last)
    left, right = tensor(size, size), tensor(size, size)
    with torch.no_grad():
        conv_flops = count_flops(lambda: torch.nn.functional.conv2d(inputs, weight, padding=1))
        conv = timed_rate(lambda: torch.nn.functional.conv2d(inputs, weight, padding=1), conv_flops, device,
                          seconds)
        matmul = timed_rate(lambda: left @ right, 2 * size ** 3, device, seconds)
    return {
        "precision": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "conv_tflops": conv / TERA,
        "conv_shape": f"{batch}x{CONV_CHANNELS}x{CONV_SIZE}x{CONV_SIZE}, 3x3 to {CONV_CHANNELS}, channels_last",
        "matmul_tflops": matmul / TERA,
        "matmul_shape": f"{size}x{size} @ {size}x{size}",
    }


def efficiency(flops_per_image: float, images_per_second: float, roof: dict) -> dict:
    """The step's achieved TFLOP/s and its fractions of the two roofs."""
    achieved = flops_per_image * images_per_second / TERA
    return {"tflops": achieved,
            "fraction_of_conv_roof": achieved / roof["conv_tflops"],
            "fraction_of_matmul_roof": achieved / roof["matmul_tflops"]}


def describe_flops(flops: float) -> str:
    """1.74e8 -> '174 MFLOP'."""
    if flops <= 0:
        return "0 FLOP"
    exponent = min(4, max(0, int(math.log10(flops) // 3)))
    return f"{flops / 1000 ** exponent:.3g} {['', 'k', 'M', 'G', 'T'][exponent]}FLOP"
