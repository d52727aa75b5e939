"""What every npgpt benchmark shares: the machine's facts, thread control, interleaved
timing, the ceilings (GEMM rate, streaming bandwidth), the two training steps and the
two generators (npgpt and PyTorch), and the JSON report.

These 2-core machines are shared and noisy, so a benchmark runs npgpt and its peer
round-robin in one process at the same thread count, and reports medians and their
ratio; /proc/loadavg at start and end says how busy the machine was.

Every `fraction_of_*` in a report is a measured rate over a ceiling measured in the same
run; one above 1.0 means the ceiling is wrong, and `check_fractions` stops the run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

from npgpt.config import GPTConfig
from npgpt.generate import GenerationStats, generate_ids
from npgpt.kernels.numpy_fast import by_columns
from npgpt.kernels.threads import parallel_rows
from npgpt.model import GPT
from npgpt.optim import AdamW, clipped_step, default_decay
from npgpt.sampling import SamplingConfig


class BenchError(Exception):
    """A benchmark cannot give honest numbers; `tools/bench.py` prints it as `error: ...`."""


# -- the machine -----------------------------------------------------------------------------
def load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


LOAD_AT_START = load_average()


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (platform.processor() elsewhere)."""
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_id() -> str:
    """Vendor, family, model and stepping from /proc/cpuinfo ("AuthenticAMD family 23 model 49
    stepping 0"): where the model name is only "AMD EPYC", these tell one generation from
    another. Empty elsewhere."""
    fields, keys = cpuinfo(), ("vendor_id", "cpu family", "model", "stepping")
    if not all(k in fields for k in keys):
        return ""
    return "{} family {} model {} stepping {}".format(*(fields[k] for k in keys))


def llc_bytes() -> int:
    """Size of CPU 0's last-level cache (the largest in /sys/devices/system/cpu/cpu0/cache),
    32 MiB where sysfs does not say."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(f"{root}/{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def optional_torch():
    """The torch module, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def blas_libraries() -> list[dict]:
    """NumPy's BLAS as threadpoolctl sees it (library, version, kernel, threads)."""
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "version", "threading_layer", "architecture", "num_threads")
    return [{k: p.get(k) for k in keys} for p in threadpool_info() if p.get("user_api") == "blas"]


def blas_kernel() -> str:
    """The BLAS kernel NumPy runs, as "<library>/<kernel>" (e.g. "openblas/Haswell"): the
    library's name for its code path, which is not the CPU's name."""
    return ", ".join(f"{b['internal_api']}/{b.get('architecture') or '?'}" for b in blas_libraries()) or "unknown"


def machine() -> dict:
    """Facts a reader needs to judge the numbers: CPU, cache, BLAS, versions, load, date."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpus": os.cpu_count(),
        "llc_bytes": llc_bytes(),
        "blas_kernel": blas_kernel(),
        "blas": blas_libraries(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "compiled_loops": compiled_loops(),
        "loadavg_1_5_15_start": LOAD_AT_START,
        "loadavg_1_5_15_end": load_average(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_mkl"] = torch.backends.mkl.is_available()
    return info


def compiled_loops() -> str | None:
    """"numba X.Y" where NumPy's fast kernels run the compiled loops (`npgpt[numba]`, not
    turned off by NPGPT_NUMBA=0), else None."""
    from npgpt.kernels.numpy_fast import compiled_loops as loops

    return f"numba {sys.modules['numba'].__version__}" if loops() is not None else None


# -- threads and timing ----------------------------------------------------------------------
@contextmanager
def threads(n: int | None):
    """Run the block with n threads: NumPy's BLAS (threadpoolctl), PyTorch (if imported:
    a process measuring npgpt alone must not load it, ~190 MB of RSS) and npgpt's own pool
    (NPGPT_NUM_THREADS). None: leave every setting as it is."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch else None
    env_before = os.environ.get("NPGPT_NUM_THREADS")
    os.environ["NPGPT_NUM_THREADS"] = str(n)
    with threadpool_limits(limits=n):
        if torch:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(torch_before)
            if env_before is None:
                os.environ.pop("NPGPT_NUM_THREADS", None)
            else:
                os.environ["NPGPT_NUM_THREADS"] = env_before


def interleaved(contenders: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each zero-argument callable `repeats` times, round-robin (A B A B ...), so
    that load from other processes hits all contenders alike. Returns seconds per call.
    Each callable must wait for its own device work (the steps and generators here do)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs": len(seconds)}


CEILING_SAMPLING_S = 0.03  # seconds of samples per GEMM, at least: many for a small product, `repeats` for a large one


def best_seconds(fn, repeats: int, min_sample_s: float = 2e-3, min_total_s: float = 0.0) -> float:
    """Seconds per call of fn: the fastest of at least `repeats` samples (after one untimed
    call), each sample timing enough back-to-back calls to last >= min_sample_s, so that tiny
    calls are not lost in the timer and the scheduler's noise; more samples while they have
    taken under min_total_s in all (a ceiling: on a busy machine a few short samples can all
    land in another process's time slices and understate it)."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    best, samples, began = float("inf"), 0, time.perf_counter()
    while samples < repeats or time.perf_counter() - began < min_total_s:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best, samples = min(best, (time.perf_counter() - start) / calls), samples + 1
    return best


def torch_device(backend) -> str:
    """Where PyTorch runs as npgpt's peer: the CPU beside NumPy, the GPU beside any other backend."""
    return "cpu" if backend.name == "numpy" else "cuda"


def torch_for(device: str, required: bool):
    """(torch, None) if PyTorch can run on `device`, else (None, why not); raises BenchError
    instead when the peer was asked for on the CPU (there it must exist)."""
    torch = optional_torch()
    why = None
    if torch is None:
        why = "torch is not installed; pip install -e '.[test]'"
    elif device == "cuda" and not torch.cuda.is_available():
        why = f"torch {torch.__version__} sees no GPU (a CPU-only build?)"
    if why and required and device == "cpu":
        raise BenchError(f"--vs torch needs PyTorch: {why}")
    return (None, why) if why else (torch, None)


def _torch_sync(torch, device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# -- the workload's GEMMs and the ceilings ------------------------------------------------------
def forward_gemms(cfg: GPTConfig, B: int, T: int) -> list[tuple[tuple[int, int, int, int], float]]:
    """The forward pass's matrix products as ((batch, M, K, N) of one product, FLOPs of all
    of its kind in one forward): per layer the QKV, attention-output, MLP-up and MLP-down
    projections and attention's two products per head (Q K^T, then P V), and the LM head.
    Attention counts only the causal triangle, T(T+1)/2 of the T^2 scores: the least any
    exact implementation computes, so no fraction is inflated by work a masked kernel skips."""
    N, C, L, H, V = B * T, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    hs, causal = C // H, (T + 1) / (2 * T)
    linear = [(N, C, 3 * C), (N, C, C), (N, C, 4 * C), (N, 4 * C, C)]
    gemms = [((1, m, k, n), 2.0 * m * k * n * L) for m, k, n in linear]
    gemms += [((B * H, T, hs, T), 2.0 * B * H * T * hs * T * L * causal),
              ((B * H, T, T, hs), 2.0 * B * H * T * T * hs * L * causal)]  # fmt: skip
    return gemms + [((1, N, C, V), 2.0 * N * C * V)]


def train_gemms(cfg: GPTConfig, B: int, T: int) -> list[tuple[tuple[int, int, int, int], float]]:
    """A forward + backward's products: each forward (M, K, N) and its two gradients,
    dX (M, N, K) and dW (K, M, N), of the same FLOPs."""
    out = []
    for (b, m, k, n), flops in forward_gemms(cfg, B, T):
        out += [((b, m, k, n), flops), ((b, m, n, k), flops), ((b, k, m, n), flops)]
    return out


def total_flops(gemms) -> float:
    return sum(flops for _, flops in gemms)


def gemm_ceiling(gemms, backend, torch=None, device: str = "cpu", n_threads: int | None = None, repeats: int = 3,
                 min_total_s: float = CEILING_SAMPLING_S, reached_gflops: float = 0.0) -> dict:
    """`gemm_ceiling_once`; while its ceiling is below `reached_gflops` (the best rate a timed
    run of the same work reached: its samples were slowed by a busy machine, and a fraction
    above 1.0 means the ceiling is wrong), sampled again, up to twice, each time 4x longer,
    and the higher ceiling kept."""
    report = gemm_ceiling_once(gemms, backend, torch, device, n_threads, repeats, min_total_s)
    for _ in range(2):
        if report["gemm_ceiling_gflops"] >= reached_gflops:
            break
        min_total_s *= 4
        again = gemm_ceiling_once(gemms, backend, torch, device, n_threads, repeats, min_total_s)
        report = max(report, again, key=lambda r: r["gemm_ceiling_gflops"])
    return report


def gemm_ceiling_once(gemms, backend, torch=None, device: str = "cpu", n_threads: int | None = None, repeats: int = 3,
                      min_total_s: float = CEILING_SAMPLING_S) -> dict:
    """The FLOP/s these GEMMs can reach with up to `n_threads` threads (None: as set): for
    each shape the best of the backend's matmul (BLAS on NumPy) and, given `torch`,
    torch.matmul on `device`, at n_threads and at 1 thread (a library may run a small
    product on one thread, and on a busy machine a second thread can cost more than it
    gives), and on NumPy at n_threads > 1 one range of columns a thread, each on one BLAS
    thread (`numpy_fast.by_columns`, as npgpt's linear layers run), and one range of rows a
    thread, each on one BLAS thread (`by_rows`, as npgpt's batch pieces run), combined as total
    FLOPs over total time. Returns GFLOP/s: the ceiling and
    each library's own rate on the same shapes at n_threads."""
    rng = np.random.default_rng(0)
    xp, seconds = backend.xp, {"npgpt_backend": 0.0, "torch": 0.0, "best": 0.0}
    for (b, m, k, n), flops in gemms:
        a_host = rng.standard_normal((b, m, k) if b > 1 else (m, k), dtype=np.float32)
        b_host = rng.standard_normal((b, k, n) if b > 1 else (k, n), dtype=np.float32)
        once = 2.0 * b * m * k * n
        a, bb = backend.asarray(a_host), backend.asarray(b_host)
        calls = [lambda: (xp.matmul(a, bb), backend.synchronize())]
        if torch is not None:
            ta, tb, sync = torch.from_numpy(a_host).to(device), torch.from_numpy(b_host).to(device), _torch_sync(torch, device)
            calls.append(lambda: (torch.matmul(ta, tb), sync()))
        rates = [once / best_seconds(call, repeats, min_total_s=min_total_s) for call in calls]
        seconds["npgpt_backend"] += flops / rates[0]
        if torch is not None:
            seconds["torch"] += flops / rates[1]
        if backend.name == "numpy" and b == 1 and n_threads is not None and n_threads > 1:  # as linear_forward shares one
            rates.append(once / best_seconds(lambda: by_columns(a, bb, None, n_threads, align=64), repeats, min_total_s=min_total_s))
        if backend.name == "numpy" and n_threads is not None and n_threads > 1:  # as over_batch's pieces run
            rates.append(once / best_seconds(lambda: by_rows(a, bb), repeats, min_total_s=min_total_s))
        if n_threads is not None and n_threads > 1:
            with threads(1):
                rates += [once / best_seconds(call, repeats, min_total_s=min_total_s) for call in calls]
        seconds["best"] += flops / max(rates)
    work = total_flops(gemms)
    report = {"gemm_ceiling_gflops": work / seconds["best"] / 1e9, "gemm_gflops_numpy_or_backend": work / seconds["npgpt_backend"] / 1e9}
    if torch is not None:
        report["gemm_gflops_torch"] = work / seconds["torch"] / 1e9
    return report


def by_rows(a, b):
    """a @ b with each thread a range of a's rows (of the batch, for stacked products) on one
    BLAS thread: how npgpt's pieces of a batch (`over_batch`, `over_train_batch`) run their
    products, each on its own core."""
    out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)

    def rows(r0, r1):
        np.matmul(a[r0:r1], b if b.ndim == 2 else b[r0:r1], out=out[r0:r1])

    parallel_rows(rows, a.shape[0], 1 << 16, one_blas_thread=True)  # every range one thread's share
    return out


def bandwidth_meter(backend, torch=None, device: str = "cpu"):
    """`bandwidth` as a function (n_threads=None, repeats=5, min_total_s=CEILING_SAMPLING_S)
    -> its report, the matrices allocated once, so a benchmark can take a ceiling sample
    between its timed runs (each run against the ceiling measured next to it)."""
    nbytes = max(4 * llc_bytes(), 512 * 2**20)
    cols = 4096
    host = np.ones((nbytes // (4 * cols), cols), dtype=np.float32)
    vec = np.ones(cols, dtype=np.float32)
    a, x = backend.asarray(host), backend.asarray(vec)
    calls = {"gemv_gb_s_numpy_or_backend": lambda: (backend.xp.matmul(a, x), backend.synchronize())}
    if torch is not None:
        ta, tx, sync = torch.from_numpy(host).to(device), torch.from_numpy(vec).to(device), _torch_sync(torch, device)
        calls["gemv_gb_s_torch_mv"] = lambda: (torch.mv(ta, tx), sync())

    def measure(n_threads: int | None = None, repeats: int = 5, min_total_s: float = CEILING_SAMPLING_S) -> dict:
        report = {"gemv_bytes": host.nbytes, **{k: host.nbytes / best_seconds(call, repeats, min_total_s=min_total_s) / 1e9 for k, call in calls.items()}}
        best = max(report[k] for k in calls)
        if n_threads is not None and n_threads > 1:
            with threads(1):
                report["gemv_gb_s_best_at_1_thread"] = max(host.nbytes / best_seconds(call, repeats, min_total_s=min_total_s) / 1e9 for call in calls.values())
            best = max(best, report["gemv_gb_s_best_at_1_thread"])
        report["bandwidth_ceiling_gb_s"] = best
        return report

    return measure


def bandwidth(backend, torch=None, device: str = "cpu", n_threads: int | None = None, repeats: int = 5,
              min_total_s: float = CEILING_SAMPLING_S) -> dict:
    """Streaming-read bandwidth in GB/s with up to `n_threads` threads (None: as set): a
    float32 matrix of max(4 x the last-level cache, 512 MiB) times a vector (GEMV reads
    each byte once), through the backend's matmul (BLAS sgemv on NumPy) and, given
    `torch`, torch.mv on `device`. The ceiling is the best of them, at n_threads and at 1
    thread; the per-library figures are at n_threads."""
    return bandwidth_meter(backend, torch, device)(n_threads, repeats, min_total_s)


def check_fractions(report, where: str = "", fraction: bool = False) -> None:
    """Raise BenchError if any `fraction_of_*` value in the (nested) report exceeds 1.0,
    every number inside a `*fraction_of_*` dict or list included (per-run fractions)."""
    items = report.items() if isinstance(report, dict) else enumerate(report) if isinstance(report, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        is_fraction = fraction or "fraction_of" in str(key)
        if isinstance(value, (dict, list)):
            check_fractions(value, path, is_fraction)
        elif is_fraction and isinstance(value, float) and value > 1.0:
            raise BenchError(f"{path} = {value:.3f} exceeds 1.0: the ceiling measured in this run is not a ceiling; "
                             "rerun on a quieter machine, and if it persists the ceiling measurement needs fixing")  # fmt: skip


# -- model shapes ----------------------------------------------------------------------------
TINY = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_ctx=64)  # smoke runs (tests)


def model_config(name: str) -> GPTConfig:
    """A GPT-2 preset by name ("gpt2", "124M", ...), or "tiny" (a smoke-test shape)."""
    return GPTConfig(**TINY) if name == "tiny" else GPTConfig.preset(name)


# -- the two training steps --------------------------------------------------------------------
def torch_model(torch, cfg: GPTConfig, host: dict[str, np.ndarray], device: str = "cpu", train: bool = False):
    """transformers' GPT2LMHeadModel with npgpt's weights (no dropout) on `device`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))  # fmt: skip
    hf.load_state_dict({f"transformer.{k}": torch.from_numpy(v.copy()) for k, v in host.items()}, strict=False)
    return hf.to(device).train(train)


class NpgptStep:
    """One npgpt training step on a model: loss_and_grads, then clip to 1.0 and AdamW
    (`clipped_step`; optimizer=True) or nothing more. Returns the loss as a float (a device sync)."""

    def __init__(self, model: GPT, optimizer: bool = True, betas=(0.9, 0.95)):
        self.model = model
        self.opt = AdamW(model.params, model.backend, betas=betas) if optimizer else None

    def __call__(self, ids, targets, lr=1e-4):
        loss, grads = self.model.loss_and_grads(ids, targets)
        if self.opt is not None:
            clipped_step(self.opt, grads, 1.0, lr)
        return float(self.model.backend.to_numpy(loss))

    def val_loss(self, batches):
        return float(np.mean([float(self.model.backend.to_numpy(self.model.loss(x, y))) for x, y in batches]))


class TorchStep:
    """The same step in PyTorch: GPT2LMHeadModel (npgpt's weights), F.cross_entropy,
    clip_grad_norm_, torch.optim.AdamW with npgpt's decay groups. Returns the loss."""

    def __init__(self, torch, cfg, host, device="cpu", optimizer=True, betas=(0.9, 0.95)):
        self.torch, self.device = torch, device
        self.model = torch_model(torch, cfg, host, device, train=True)
        self.opt = None
        if optimizer:
            named = {n.removeprefix("transformer."): p for n, p in self.model.named_parameters()}
            groups = [{"params": [p for n, p in named.items() if default_decay(n, tuple(p.shape))], "weight_decay": 0.1},
                      {"params": [p for n, p in named.items() if not default_decay(n, tuple(p.shape))], "weight_decay": 0.0}]  # fmt: skip
            self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=betas, eps=1e-8)

    def _loss(self, ids, targets):
        torch = self.torch
        logits = self.model(torch.from_numpy(ids).to(self.device)).logits
        y = torch.from_numpy(targets).to(self.device).reshape(-1)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)

    def __call__(self, ids, targets, lr=1e-4):
        loss = self._loss(ids, targets)
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        if self.opt is not None:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        return loss.item()

    def val_loss(self, batches):
        with self.torch.no_grad():
            return float(np.mean([self._loss(x, y).item() for x, y in batches]))


# -- the two generators ------------------------------------------------------------------------
GREEDY = SamplingConfig(greedy=True)


def npgpt_generate(model: GPT, prompt: np.ndarray, new_tokens: int, use_cache: bool = True, stats: GenerationStats | None = None):
    """A zero-argument callable: npgpt's greedy ids after `prompt` (each id read back, so
    the device has finished when it returns)."""
    return lambda: list(generate_ids(model, prompt.tolist(), new_tokens, GREEDY, use_cache=use_cache, stats=stats))


def torch_generate(torch, hf, prompt: np.ndarray, new_tokens: int, device: str = "cpu"):
    """A zero-argument callable: transformers' greedy generate with its KV cache (never
    stopping early at <|endoftext|>), returning the new ids."""
    ids = torch.from_numpy(prompt[None, :]).to(device)

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    return run


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runs agree on (a correctness check: with random
    weights near-ties can make float32 paths part after a while)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- memory and the report ---------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak RSS: /proc's VmHWM (getrusage's ru_maxrss survives fork + exec,
    so a child process would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(report: dict, lines: list[str] = ()):
    """Check every fraction, print the report as JSON on stdout and a short summary
    (machine, load, the given lines) on stderr."""
    check_fractions(report)
    report = {"machine": machine(), **report}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    m = report["machine"]
    ident = f" [{m['cpu_id']}]" if m["cpu_id"] else ""
    log(f"cpu: {m['cpu_model']}{ident} ({m['cpus']} cpus, LLC {m['llc_bytes'] / 2**20:.0f} MiB) | BLAS kernel: {m['blas_kernel']}"
        f" | loadavg {m['loadavg_1_5_15_start']} -> {m['loadavg_1_5_15_end']} | {m['date_utc']}")  # fmt: skip
    for line in lines:
        log(line)


def log(*args):
    print(*args, file=sys.stderr, flush=True)
