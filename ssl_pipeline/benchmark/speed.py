"""Speed mode: every measured step, ours (eager and compiled), the reference and lightly, against the roof."""
import importlib.metadata
import os
import platform
import resource
import time
from datetime import datetime, timezone

import psutil
import torch

from ssl_pipeline.benchmark.data import SEED, STAGES, Plan
from ssl_pipeline.benchmark.measure import measure_in_child
from ssl_pipeline.core.roofline import describe_flops, efficiency, measure_roof
from ssl_pipeline.core.runtime import available_cpus, has_cxx_compiler, setup_runtime


# ---------------------------------------------------------------------------------------------------
# Speed mode
# ---------------------------------------------------------------------------------------------------

class MachineLoad:
    """CPU seconds that processes other than this one and its children used while it ran: a direct
    measure of the noise that other work on the machine added (the load average lags by minutes)."""

    def __init__(self):
        self.load_before, self.started = os.getloadavg(), time.perf_counter()
        self.busy, self.steal, self.own = self.readings()

    @staticmethod
    def readings():
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return busy, getattr(times, "steal", 0.0), own

    def summary(self) -> dict:
        busy, steal, own = self.readings()
        return {"seconds": time.perf_counter() - self.started,
                "load_average_before": list(self.load_before), "load_average_after": list(os.getloadavg()),
                "other_processes_cpu_seconds": max(0.0, (busy - self.busy) - (own - self.own)),
                "steal_cpu_seconds": steal - self.steal}


def default_worker_counts() -> list:
    """0 (loading in the training process), 1, half and all of the CPUs: workers compete with the
    training threads for the same cores, so more is not always faster."""
    cpus = available_cpus()
    return sorted({0, 1, max(1, cpus // 2), cpus})


def measured_steps(config: dict, stages) -> list:
    """(name, stage, config) per measured step: pretraining once per objective of config
    pretrain.objectives (both implementations with the same objective), fine-tuning once."""
    steps = []
    for stage in stages:
        if stage != "pretrain":
            steps.append((stage, stage, config))
            continue
        for objective in config["pretrain"]["objectives"]:
            steps.append((f"pretrain {objective}", stage,
                          {**config, "pretrain": {**config["pretrain"], "objective": objective}}))
    return steps


def machine_roof(compute: dict, plan: Plan, log=print) -> dict:
    """The convolution and matmul roof on the measurements' device, threads and precision."""
    runtime = setup_runtime({**compute, "compile": False}, SEED)
    log(f"roof: convolution and matmul, {runtime.device}, {threads(runtime.threads)}")
    return measure_roof(runtime.device, runtime.autocast_dtype, plan.roof_seconds)


def add_efficiency(run: dict, roof: dict) -> dict:
    return {**run, **efficiency(run["flops_per_image"], run["images_per_second"], roof)}


def fastest_of(stage, implementation, name, step_config, raw_dir, compute, plan, worker_counts, roof, log):
    """(fastest, all): one measurement per DataLoader worker count."""
    candidates = []
    for workers in worker_counts:
        log(f"{name}: {implementation}, {workers} DataLoader workers")
        candidates.append(add_efficiency(
            measure_in_child(stage, implementation, workers, step_config, raw_dir, compute, plan), roof))
    return max(candidates, key=lambda candidate: candidate["images_per_second"]), candidates


def speed(config: dict, raw_dir, compute: dict, plan: Plan, worker_counts, stages=STAGES, log=print,
          compiled=True, lightly=True) -> dict:
    """Every measured step eager ("ours"), compiled ("ours, compiled", unless compiled=False), as the
    reference and, in pretraining, as lightly (unless lightly=False) with each worker count; each with
    its FLOPs and its fraction of the roof measured first."""
    load = MachineLoad()
    roof = machine_roof(compute, plan, log)
    if compiled and not str(compute.get("device", "auto")).startswith("cuda") and not has_cxx_compiler():
        log("no C++ compiler on PATH: leaving out the compiled rows (torch.compile on the CPU needs one)")
        compiled = False
    results = {}
    eager, compile_on = {**compute, "compile": False}, {**compute, "compile": True}
    for name, stage, step_config in measured_steps(config, stages):
        log(f"{name}: ours")
        ours = add_efficiency(measure_in_child(stage, "ours", 0, step_config, raw_dir, eager, plan), roof)
        entry = {"ours": ours}
        if compiled:
            log(f"{name}: ours, compiled")
            entry["ours_compiled"] = add_efficiency(
                measure_in_child(stage, "ours", 0, step_config, raw_dir, compile_on, plan), roof)
        best, candidates = fastest_of(stage, "reference", name, step_config, raw_dir, eager, plan, worker_counts,
                                      roof, log)
        entry.update({"reference": best, "reference_candidates": candidates,
                      "speedup": ours["images_per_second"] / best["images_per_second"]})
        if compiled:
            entry["compiled_speedup"] = entry["ours_compiled"]["images_per_second"] / best["images_per_second"]
        if lightly and stage == "pretrain":  # lightly has no fine-tuning recipe to compare with
            peer, candidates = fastest_of(stage, "lightly", name, step_config, raw_dir, eager, plan, worker_counts,
                                          roof, log)
            entry.update({"lightly": peer, "lightly_candidates": candidates,
                          "speedup_over_lightly": ours["images_per_second"] / peer["images_per_second"]})
            if compiled:
                entry["compiled_speedup_over_lightly"] = (entry["ours_compiled"]["images_per_second"]
                                                          / peer["images_per_second"])
        results[name] = entry
    first = next(iter(results.values()))["ours"]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": first["device"],
        "device_name": first["device_name"],
        "threads": first["threads"],
        "precision": first["precision"],
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "lightly": importlib.metadata.version("lightly") if lightly else None,
        "python": platform.python_version(),
        **load.summary(),
        "raw_dir": str(raw_dir),
        "plan": plan.__dict__,
        "worker_counts": list(worker_counts),
    }
    return {"meta": meta, "roof": roof, "stages": results}


def machine_load(meta: dict) -> str:
    return (f"load average {meta['load_average_before'][0]:.2f} before; other processes used "
            f"{meta['other_processes_cpu_seconds']:.0f} CPU s during the {meta['seconds']:.0f} s run")


def threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def workers_of(run: dict) -> str:
    return f"{run['workers']} worker{'' if run['workers'] == 1 else 's'}"


def implementation_name(run: dict, lightly_version: str = None) -> str:
    if run["implementation"] == "ours":
        compiled = f", compiled ({run['compile_seconds']:.0f} s to compile)" if run["compiled"] else ""
        return f"ours: uint8 on device, batched augmentation{compiled}"
    if run["implementation"] == "lightly":
        return f"lightly {lightly_version}: its transforms, heads and loss + DataLoader, {workers_of(run)}"
    return f"reference: PIL + DataLoader, {workers_of(run)}"


def ratio(run: dict, best: dict) -> str:
    """run's images/s over the fastest setting `best`; ours in bold."""
    if best is None:
        return "–"
    if run == best:  # == rather than is: the same whether the figures come from memory or from JSON
        return "1.00× (fastest)"
    value = run["images_per_second"] / best["images_per_second"]
    return f"**{value:.2f}×**" if run["implementation"] == "ours" else f"{value:.2f}×"


def speed_table(results: dict) -> str:
    """Markdown: one row per measurement; the speed-ups are over the fastest reference and the fastest
    lightly setting of the step (ours / lightly in the last column), and the roof is the convolution's
    of ssl_pipeline/core/roofline.py, measured in the same run."""
    rows = ["| step | implementation | images/s (mean ± sd) | FLOPs/image | TFLOP/s | % of conv roof "
            "| peak RSS MiB | PSS MiB | CUDA peak MiB | speed-up over reference | speed-up over lightly |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    version = results["meta"].get("lightly")
    for stage, entry in results["stages"].items():
        label = "fine-tuning" if stage == "finetune" else f"pretraining {stage.split()[1]} (2 views/image)"
        runs = [entry["ours"]] + ([entry["ours_compiled"]] if "ours_compiled" in entry else [])
        for run in runs + entry["reference_candidates"] + entry.get("lightly_candidates", []):
            cuda = "–" if run["cuda_peak_allocated_mib"] is None else f"{run['cuda_peak_allocated_mib']:.0f}"
            rows.append(f"| {label} | {implementation_name(run, version)} | {run['images_per_second']:,.0f} ± "
                        f"{run['images_per_second_std']:,.0f} | {describe_flops(run['flops_per_image'])} | "
                        f"{run['tflops']:.3f} | {100 * run['fraction_of_conv_roof']:.0f} % | "
                        f"{run['host_peak_rss_mib']:.0f} | {run['host_pss_mib']:.0f} | {cuda} | "
                        f"{ratio(run, entry['reference'])} | {ratio(run, entry.get('lightly'))} |")
    meta, roof = results["meta"], results["roof"]
    rows.append("")
    rows.append(f"Roof ({roof['precision']}, {threads(roof['threads'])}): convolution {roof['conv_shape']} "
                f"{roof['conv_tflops']:.3f} TFLOP/s; matmul {roof['matmul_shape']} {roof['matmul_tflops']:.3f} "
                "TFLOP/s. FLOPs: forward and backward of model and loss (torch.utils.flop_counter).")
    rows.append(f"`{meta['command']}` on {meta['date'][:10]}; {meta['device_name']}; "
                f"{threads(meta['threads'])}, autocast {meta['precision']}; torch {meta['torch']}; "
                f"{machine_load(meta)}.")
    return "\n".join(rows)
