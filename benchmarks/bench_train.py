"""Side-by-side training benchmark: our `train` command against the plain loop every peer starts from.

The reference loop is the diffusers DreamBooth example's: VAE-encode and text-encode every step, AdamW, plain MSE,
`zero_grad(set_to_none=True)`, frozen parts in the mixed-precision dtype. Both run on the same model weights,
images, captions, resolution, batch, optimizer, precision and seed, each in its own process (so peak RSS is its
own), alternating reference / ours in one invocation.

    python benchmarks/bench_train.py --preset tiny       # CI smoke check, seconds
    python benchmarks/bench_train.py --preset cpu-real   # real SD1.5 architecture, random weights, 512 px
    python benchmarks/bench_train.py --preset cuda       # adds SDXL 1024 LoRA; needs a GPU

Reported per case: median seconds per optimizer step after warm-up (the first epoch, which fills our latent
cache, is warm-up), time from process start to the first finished step, peak RSS during training (and peak VRAM
on CUDA), and ours / reference ratios. Then, for our code alone: class-image generation throughput at batch 1 and
batched, export time of a full checkpoint, model creation time from a single-file checkpoint, and the UNet
forward+backward's achieved bf16 throughput as a fraction of the measured matmul peak. `--results FILE` appends
everything with date, machine, command and dependency versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    name: str
    family: str
    real: bool  # real architecture (random weights) rather than the tiny test model
    method: str  # 'lora' or 'dreambooth'
    resolution: int
    steps: int
    images: int = 2  # instance images; the first epoch (this many steps) is warm-up
    lora_rank: int = 4
    precision: str = "bf16"
    device: str = "cpu"

    @property
    def warmup(self) -> int:
        """Steps left out of the median: the first epoch, where our latent cache still encodes."""
        return min(self.images, self.steps - 1)


@dataclass
class Extras:
    """Our-code-only measurements of a preset: class images, export, model creation, UNet throughput."""

    family: str
    real: bool
    resolution: int
    class_images: int = 2  # per batch size measured
    class_steps: int = 4  # sampler steps per class image
    class_batch: int = 2
    unet_throughput: bool = True
    device: str = "cpu"


@dataclass
class Preset:
    cases: list[Case]
    extras: Extras


PRESETS: dict[str, Preset] = {
    "tiny": Preset([Case("tiny-sd1-lora", "sd1", False, "lora", 64, 6),
                    Case("tiny-sd1-dreambooth", "sd1", False, "dreambooth", 64, 6)],
                   Extras("sd1", False, 64)),
    "cpu-real": Preset([Case("sd15-512-lora-r4", "sd1", True, "lora", 512, 6),
                        Case("sd15-512-dreambooth", "sd1", True, "dreambooth", 512, 5)],
                       Extras("sd1", True, 512)),
    "cuda": Preset([Case("sd15-512-dreambooth-cuda", "sd1", True, "dreambooth", 512, 24, device="cuda"),
                    Case("sdxl-1024-lora-cuda", "sdxl", True, "lora", 1024, 24, device="cuda")],
                   Extras("sd1", True, 512, class_images=8, class_steps=20, class_batch=4, device="cuda")),
}

CAPTION = "photo of sks dog"
LEARNING_RATE = {"lora": 1e-4, "dreambooth": 2e-6}
GIB = 2**30


@dataclass
class RunResult:
    step_times: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    peak_rss_gib: float = 0.0
    peak_vram_gib: float | None = None


# --- shared setup ----------------------------------------------------------------------------------

def build_components(family: str, real: bool) -> Any:
    """The tiny test model, or the real architecture from the shipped configs with random weights."""
    from dreambooth.models.tiny import build_models, tiny_components

    if not real:
        return tiny_components(family, seed=0)
    import torch

    from dreambooth.families import get_family
    from dreambooth.models.components import Components, make_noise_scheduler
    from dreambooth.models.loading import shipped_configs
    from dreambooth.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet, vae, encoders = build_models(shipped_configs(family))
    scheduler = make_noise_scheduler(family)
    return Components(family=family, unet=unet, vae=vae, text_encoders=encoders,
                      tokenizers=[load_clip_tokenizer(pad) for pad in get_family(family).pad_tokens],
                      noise_scheduler=scheduler, prediction_type=scheduler.config.prediction_type)


def write_images(folder: Path, resolution: int, count: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(CAPTION)


def working_dir(workdir: Path) -> Path:
    return workdir / "models" / "dreambooth" / "bench" / "working"


def prepare_model(family: str, real: bool, workdir: Path) -> Any:
    """Create the model folder every worker of a preset loads; returns the ModelDir."""
    from dreambooth.models.components import save_components
    from dreambooth.store import Layout, ModelStore

    layout = Layout.under(workdir / "models").ensure()
    model = ModelStore(layout).model("bench")
    save_components(build_components(family, real), model.working)
    return model


def bench_config(case: Case, images: Path) -> Any:
    """Our settings for a case: the reference's optimizer, precision and data; everything else our defaults."""
    from dreambooth.config import Concept, TrainingConfig

    return TrainingConfig(
        model_name="bench", model_family=case.family, method=case.method, max_train_steps=case.steps,
        train_batch_size=1, learning_rate=LEARNING_RATE[case.method], lr_scheduler="constant", optimizer="adamw",
        mixed_precision=case.precision, train_text_encoder=False, with_prior_preservation=False,
        resolution=case.resolution, enable_bucketing=False, lora_rank=case.lora_rank,
        lora_alpha=float(case.lora_rank), save_on_end=False, log_every_n_steps=10, seed=0,
        concepts=[Concept(instance_data_dir=str(images), instance_prompt=CAPTION)])


def prepare_case(case: Case, workdir: Path, model: Any) -> None:
    images = workdir / f"images-{case.name}"
    write_images(images, case.resolution, case.images)
    model.save_config(bench_config(case, images))


# --- the reference loop (what the diffusers DreamBooth / LoRA examples do) ------------------------

def reference_models(case: Case, workdir: Path) -> tuple[Any, list[Any]]:
    """Components placed as the examples do; returns them and the trained parameters."""
    import torch

    from dreambooth.models.components import load_components

    device = torch.device(case.device)
    weight_dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
    parts = load_components(working_dir(workdir))
    parts.vae.requires_grad_(False)
    for encoder in parts.text_encoders:
        encoder.requires_grad_(False)
        encoder.to(device, weight_dtype)
    parts.vae.to(device, weight_dtype if case.family != "sdxl" else torch.float32)
    unet = parts.denoiser
    if case.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        unet.to(device)
    return parts, [p for p in unet.parameters() if p.requires_grad]


def reference_conditioning(parts: Any, device: Any, size: int) -> tuple[Any, dict[str, Any] | None]:
    """Text-encode the caption (every step, as the examples do); SDXL adds pooled text and size ids."""
    import torch

    hiddens, pooled = [], None
    for encoder, tokenizer in zip(parts.text_encoders, parts.tokenizers, strict=True):
        ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        if parts.family == "sdxl":
            hiddens.append(output.hidden_states[-2])
            pooled = output[0]
        else:
            hiddens.append(output[0])
    hidden = torch.cat(hiddens, dim=-1)
    if parts.family != "sdxl":
        return hidden, None
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=hidden.dtype)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}


def load_image(path: Path) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def reference_run(case: Case, workdir: Path, on_step: Callable[[int], None]) -> None:
    import torch

    device = torch.device(case.device)
    weight_dtype = torch.bfloat16 if case.precision == "bf16" else torch.float32
    parts, params = reference_models(case, workdir)
    unet, vae, scheduler = parts.denoiser, parts.vae, parts.noise_scheduler
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[case.method], weight_decay=1e-2)
    images = sorted((workdir / f"images-{case.name}").glob("*.png"))
    torch.manual_seed(0)
    unet.train()
    for step in range(case.steps):
        pixels = load_image(images[step % len(images)])
        with torch.autocast(device.type, dtype=weight_dtype, enabled=case.precision != "no"):
            with torch.no_grad():
                latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                hidden, added = reference_conditioning(parts, device, case.resolution)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # the examples log the loss every step (a host sync on CUDA)
        on_step(step)


# --- ours -------------------------------------------------------------------------------------------

def ours_run(case: Case, workdir: Path, on_step: Callable[[int], None]) -> None:
    """`python -m dreambooth train --name bench` in this process: the CLI's own entry point, host and printed
    lines, run to its natural end (final save and snapshot included, after the last timed step)."""
    from dreambooth.cli_train import run_training
    from dreambooth.store import Layout
    from dreambooth.train.events import TrainObserver

    class StepClock(TrainObserver):
        def on_step(self, step: int) -> None:
            on_step(step - 1)

    status = run_training(Layout.under(workdir / "models"), "bench", observers=[StepClock()])
    if status != 0:
        raise RuntimeError(f"'train' ended with status {status}")


# --- extras: our code alone ---------------------------------------------------------------------------

def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def class_image_rates(extras: Extras, workdir: Path) -> dict[str, float]:
    """Images per second through the host's generator at batch 1 and batched (pipeline already loaded)."""
    from dreambooth.host.base import GenerationRequest
    from dreambooth.host.embedded import EmbeddedHost
    from dreambooth.store import Layout

    host = EmbeddedHost(Layout.under(workdir / "models"), device=extras.device)
    size = extras.resolution

    def request(count: int, batch: int) -> GenerationRequest:
        return GenerationRequest("photo of a dog", "", 0, extras.class_steps, 7.5, size, size, count, batch,
                                 model_dir=working_dir(workdir))

    host.generate(request(1, 1))  # load the pipeline and warm up
    rates = {}
    for batch in (1, extras.class_batch):
        seconds, _ = timed(lambda b=batch: host.generate(request(extras.class_images, b)))
        rates[f"class images/s, batch {batch} ({extras.class_steps} steps, {size} px)"] = extras.class_images / seconds
    host.release_model()
    return rates


def export_and_create(extras: Extras, workdir: Path) -> dict[str, float]:
    """Seconds to export the full model as one fp16 .safetensors and to create a model from that file."""
    from dreambooth.models.components import load_components
    from dreambooth.models.export import export_checkpoint
    from dreambooth.models.loading import CONFIGS_METADATA_KEY, create_model
    from dreambooth.models.tiny import tiny_configs
    from dreambooth.store import Layout, ModelStore

    components = load_components(working_dir(workdir))
    checkpoint = workdir / "export.safetensors"
    # A tiny model carries its configs (as the demo checkpoints do); real ones use the shipped configs.
    metadata = {} if extras.real else {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(extras.family))}
    start = time.perf_counter()
    export_checkpoint(components, checkpoint, precision="fp16", metadata=metadata)
    export_s = time.perf_counter() - start
    del components  # free it before the creation measurement
    store = ModelStore(Layout.under(workdir / "models"))
    create_s, _ = timed(lambda: create_model(store, "created", checkpoint))
    return {"export full checkpoint, fp16 (s)": export_s,
            "create model from single-file checkpoint (s)": create_s,
            "checkpoint size (GiB)": checkpoint.stat().st_size / GIB}


def matmul_peak_tflops(device: Any, real: bool) -> float:
    """Best bf16 matmul rate of a few square products: the card's (or CPU's) practical peak. The tiny preset
    (a smoke check) uses small products: a CPU without bf16 instructions takes about a minute per 2048^3."""
    import torch

    size = 8192 if device.type == "cuda" else (2048 if real else 256)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        seconds, _ = timed(lambda: synchronised(device, lambda: a @ b))
        best = min(best, seconds)
    return 2 * size**3 / best / 1e12


def synchronised(device: Any, action: Callable[[], Any]) -> Any:
    import torch

    value = action()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value


def unet_inputs(unet: Any, extras: Extras, device: Any) -> tuple[Any, Any, Any]:
    import torch

    latent = extras.resolution // 8
    noisy = torch.randn(1, unet.config.in_channels, latent, latent, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    return noisy, torch.tensor([500], device=device), hidden


def unet_throughput(extras: Extras, workdir: Path) -> dict[str, float]:
    """The full-training UNet forward+backward (bf16 autocast, batch 1, our memory format): FLOPs, time,
    fraction of the matmul peak; then the frozen bf16 UNet's forward+backward with no adapter at all, the
    floor under any LoRA step on this machine."""
    import torch

    from dreambooth.models.components import load_components
    from dreambooth.train import runtime

    device = torch.device(extras.device)
    with runtime.reuse_freed_memory(enabled=device.type == "cpu"):  # as our trainer runs
        return unet_passes(load_components(working_dir(workdir)), extras, device)


def unet_passes(components: Any, extras: Extras, device: Any) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.train import runtime

    runtime.set_memory_format(components, runtime.use_channels_last(device))
    unet = components.denoiser.to(device).train()
    noisy, timestep, hidden = unet_inputs(unet, extras, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = unet(noisy, timestep, hidden).sample
        prediction.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = statistics.median([timed(lambda: synchronised(device, step))[0] for _ in range(2)])
    flops = counter.get_total_flops()
    peak = matmul_peak_tflops(device, extras.real)
    achieved = flops / seconds / 1e12
    unet.requires_grad_(False).to(torch.bfloat16)
    noisy.requires_grad_(True)  # gradients flow back through every layer, as they must to reach LoRA layers
    step()
    frozen = statistics.median([timed(lambda: synchronised(device, step))[0] for _ in range(2)])
    return {"UNet fwd+bwd TFLOP per step": flops / 1e12, "UNet fwd+bwd s": seconds,
            "UNet achieved bf16 TFLOP/s": achieved, "bf16 matmul peak TFLOP/s": peak,
            "UNet fraction of matmul peak": achieved / peak,
            "frozen bf16 UNet fwd+bwd, no adapter (LoRA floor) s": frozen}


def extras_run(extras: Extras, workdir: Path) -> dict[str, float]:
    import torch

    values = class_image_rates(extras, workdir)
    values.update(export_and_create(extras, workdir))
    if extras.unet_throughput:
        values.update(unet_throughput(extras, workdir))
    values["peak RSS of this worker (GiB)"] = peak_rss_gib()
    if torch.cuda.is_available():
        values["peak VRAM of this worker (GiB)"] = torch.cuda.max_memory_allocated() / GIB
    return values


# --- worker / parent --------------------------------------------------------------------------------

def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def worker(kind: str, case: Case, workdir: Path, started: float) -> RunResult:
    import torch

    result = RunResult()
    last = [time.time()]

    def on_step(step: int) -> None:
        if case.device == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        if not result.first_step_s:
            result.first_step_s = now - started
        else:
            result.step_times.append(now - last[0])
        last[0] = now
        # Peak RSS of the training itself, not of what a run does after its last step.
        result.peak_rss_gib = peak_rss_gib()
        if torch.cuda.is_available():
            result.peak_vram_gib = torch.cuda.max_memory_allocated() / GIB

    (reference_run if kind == "ref" else ours_run)(case, workdir, on_step)
    result.step_times = result.step_times[max(case.warmup - 1, 0):]
    return result


def run_worker(args: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise RuntimeError(f"benchmark worker {args[0]} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case_worker(kind: str, case: Case, workdir: Path) -> RunResult:
    started = time.time()
    args = [kind, "--case", json.dumps(asdict(case)), "--workdir", str(workdir), "--started", repr(started)]
    return RunResult(**run_worker(args))


def summarise(case: Case, runs: dict[str, list[RunResult]]) -> dict[str, Any]:
    def median_of(kind: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs[kind])

    step = {k: statistics.median([t for r in runs[k] for t in r.step_times]) for k in runs}
    row = {"case": case.name, "ours_s_step": step["ours"], "ref_s_step": step["ref"],
           "step_ratio": step["ours"] / step["ref"],
           "ours_first_s": median_of("ours", "first_step_s"), "ref_first_s": median_of("ref", "first_step_s"),
           "ours_rss_gib": median_of("ours", "peak_rss_gib"), "ref_rss_gib": median_of("ref", "peak_rss_gib"),
           "ours_steps": [round(t, 3) for r in runs["ours"] for t in r.step_times],
           "ref_steps": [round(t, 3) for r in runs["ref"] for t in r.step_times]}
    row["first_ratio"] = row["ours_first_s"] / row["ref_first_s"]
    if runs["ours"][0].peak_vram_gib is not None:
        row["ours_vram_gib"] = median_of("ours", "peak_vram_gib")
        row["ref_vram_gib"] = median_of("ref", "peak_vram_gib")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    vram = any("ours_vram_gib" in r for r in rows)
    head = ("| case | ours s/step | ref s/step | ratio | ours first step s | ref first step s | ratio "
            "| ours peak RSS GiB | ref peak RSS GiB |" + (" ours peak VRAM GiB | ref peak VRAM GiB |" if vram else ""))
    lines = [head, "|" + "---|" * (11 if vram else 9)]
    for r in rows:
        line = (f"| {r['case']} | {r['ours_s_step']:.3f} | {r['ref_s_step']:.3f} | {r['step_ratio']:.2f} "
                f"| {r['ours_first_s']:.1f} | {r['ref_first_s']:.1f} | {r['first_ratio']:.2f} "
                f"| {r['ours_rss_gib']:.2f} | {r['ref_rss_gib']:.2f} |")
        if vram:
            line += f" {r.get('ours_vram_gib', 0):.2f} | {r.get('ref_vram_gib', 0):.2f} |"
        lines.append(line)
    return "\n".join(lines)


def step_lists(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"- {r['case']}: ours {r['ours_steps']}, reference {r['ref_steps']} (s per measured step)"
                     for r in rows)


def extras_table(values: dict[str, float]) -> str:
    lines = ["| our code alone | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3g} |" for name, value in values.items()]
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "diffusers", "transformers", "accelerate", "peft")
    return ", ".join(f"{n} {version(n)}" for n in names)


def machine() -> str:
    cpu = platform.processor() or platform.system()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpu = ""
    import torch

    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM{gpu}"


def append_results(path: Path, command: str, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    block = (f"\n## {stamp}\n\nMachine: {machine()} (load average at the end {load}).\n"
             f"Versions: Python {platform.python_version()}, {versions()}.\n"
             f"Command: `{command}`\n\n{text}\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(block)


def selected(preset: Preset, args: argparse.Namespace) -> list[Case]:
    cases = [c for c in preset.cases if not args.only or c.name in args.only]
    if args.steps:
        cases = [replace(c, steps=max(args.steps, 2)) for c in cases]
    return cases


def run_cases(cases: list[Case], workdir: Path, model: Any, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        prepare_case(case, workdir, model)
        runs: dict[str, list[RunResult]] = {"ours": [], "ref": []}
        for _ in range(repeats):
            for kind in ("ref", "ours"):
                runs[kind].append(run_case_worker(kind, case, workdir))
        rows.append(summarise(case, runs))
        print(table(rows[-1:]), flush=True)
    return rows


def run_extras(extras: Extras, workdir: Path) -> dict[str, float]:
    values = run_worker(["extras", "--extras", json.dumps(asdict(extras)), "--workdir", str(workdir)])
    print(extras_table(values), flush=True)
    return values


def worker_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker == "extras":
        print(json.dumps(extras_run(Extras(**json.loads(args.extras)), Path(args.workdir))))
        return 0
    result = worker(args.worker, Case(**json.loads(args.case)), Path(args.workdir), args.started)
    print(json.dumps(asdict(result)))
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--repeats", type=int, default=1, help="alternating reference/ours pairs per case")
    parser.add_argument("--steps", type=int, help="override the optimizer steps of every case (at least 2)")
    parser.add_argument("--only", nargs="*", help="run only these case names")
    parser.add_argument("--no-extras", action="store_true", help="skip the our-code-only measurements")
    parser.add_argument("--results", type=Path, help="append the tables to this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--extras", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker_main(args)
    preset = PRESETS[args.preset]
    cases = selected(preset, args)
    with tempfile.TemporaryDirectory(prefix="db-bench-") as tmp:
        workdir = Path(tmp)
        families = {c.family for c in cases} | ({preset.extras.family} if not args.no_extras else set())
        text = ""
        for family in sorted(families):  # one model folder per family; cases of a family share it
            family_dir = workdir / family
            model = prepare_model(family, preset.extras.real or any(c.real for c in cases), family_dir)
            rows = run_cases([c for c in cases if c.family == family], family_dir, model, args.repeats)
            if rows:
                text += table(rows) + "\n\n" + step_lists(rows) + "\n\n"
            if not args.no_extras and family == preset.extras.family:
                text += extras_table(run_extras(preset.extras, family_dir)) + "\n"
    print("\n" + text)
    if args.results:
        command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(args.results, command, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
