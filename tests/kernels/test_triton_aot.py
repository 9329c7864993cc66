"""Ahead-of-time compile report of every Triton kernel for sm_90a and sm_80, on the CPU: no GPU needed.

Each kernel of :mod:`opd_fast.kernels` is compiled with ``triton.compile`` for an explicit ``GPUTarget``
(Triton's bundled ``ptxas`` produces the cubin), with the argument types, constexprs and launch options its
backend passes on a GPU. From ``ptxas -v`` and the compiled kernel we report registers per thread, spill
bytes, shared memory, whether the PTX uses wgmma (Hopper's warpgroup MMA), its 128-bit global loads and the
exponentials (``ex2``) inside its loops, then fail when a **default** configuration (the first of an autotune
list, the one ``OPD_FAST_TRITON_FIXED_CONFIG=1`` runs)

* does not compile, or takes longer than ``COMPILE_BOUND_S``,
* spills registers to local memory,
* needs more shared memory than the architecture offers per block (227 KiB sm_90a, 163 KiB sm_80);

and when the chunked plan's statistics pass (``chunk_stats._stats_update_kernel``, which streams both
models' fp32 workspace rows), with or without the student's entropy fused in, needs more than 128 registers (four
128-thread blocks per SM), lacks 128-bit loads where the row stride is a multiple of 16 elements (the sweep pads it
to 64 on CUDA), or takes more than one exponential per model and element.

CI compiles the default configuration of every kernel for every MODE (about 100 compiles, 1–2 s each) in its own
step of .ci/run (marked slow: outside README's quick tier).
``OPD_FAST_AOT=all`` compiles every autotune configuration (bf16 and fp32 inputs, top-k at every power of two
up to MAX_K) and also fails on spilling configurations and on configurations that compile to the same code
as an earlier one of the list (the autotuner would time the same kernel twice). The report without pytest:

    python tests/kernels/test_triton_aot.py [--all] [--kernel NAME] [--arch sm_90a]

Compiles run in worker processes (``TRITON_INTERPRET=0``, an empty Triton cache, so times are real), two at
a time, each compile under a deadline after which its ``ptxas`` is killed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass, field

import pytest

from opd_fast.backends import epilogue
from opd_fast.backends.epilogue import MODES

# .ci/run's slow step runs this file's slow tests: python -m pytest -m "slow and ci_slow"
pytestmark = pytest.mark.ci_slow

# GPUTarget capability and the most dynamic shared memory one block may use (CUDA programming guide,
# "Compute capabilities": 227 KiB on sm_90, 163 KiB on sm_80).
ARCHS = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
# Seconds one compile (Triton passes + ptxas) may take. The defaults take 1-10 s, top-k at K = MAX_K = 128 up to
# ~40 s with two compiles sharing two cores; the bound catches kernels whose ptxas runs away (top-k at K = 256
# took ~2 minutes on sm_90a, at K = 1024 over 23 minutes).
COMPILE_BOUND_S = 90
AOT_ENV = "OPD_FAST_AOT"
# Compile processes at a time: two, or this test process's share of the cores under pytest-xdist (conftest.py).
WORKERS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# Default configurations that fail for a reason the config lists cannot fix: kernel -> (variant prefix, why).
# The test xfails on exactly these and fails once they are clean, so that the entry is removed.
KNOWN_PROBLEMS: dict[str, tuple[str, str]] = {}
# The modes of the statistics passes ("entropy" is a gradient pass only) and of the terms passes (JSD, the skew KLs,
# TVD), which the gradient also runs on its smaller tile.
STATS_MODES = {name: code for name, code in MODES.items() if name != "entropy"}
TERMS_MODES = {name: MODES[name] for name in epilogue.TERMS_MODES}
# Scalar float arguments of the kernels; every other non-pointer, non-constexpr argument is an i32.
FLOAT_ARGS = {"pre", "softcap", "post", "pre_s", "cap_s", "post_s", "pre_t", "cap_t", "post_t", "beta", "filter_eps"}
# Arguments that the launchers pass as multiples of 16 (pointers from torch allocations, hidden sizes and row
# strides of real models), which the JIT marks tt.divisibility=16 as well.
ALIGNED_ARGS = re.compile(r".*_ptr$|^stride_.*|^H$|^HS$|^HT$")
NO_HEAD = {"HAS_BIAS_S": False, "HAS_SOFTCAP_S": False, "HAS_BIAS_T": False, "HAS_SOFTCAP_T": False}
ONE_HEAD = {"HAS_BIAS": False, "HAS_SOFTCAP": False}
INPUT = "input"  # pointer dtype placeholder: the inputs' dtype (bf16, or fp32 with TF32 dots)
UNALIGNED = " stride%16≠0"  # variant suffix: the row strides compiled without the multiple-of-16 hint
STATS_KERNEL = "chunk_stats._stats_update_kernel"
STATS_MAX_REGISTERS = 128
# 128-bit global loads in PTX: four 32-bit (fp32, or bf16 pairs) or two 64-bit lanes.
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.[bfu]32|v2\.[bfu]64)\b")


@dataclass(frozen=True)
class KernelSpec:
    """How the backend launches one kernel: pointer dtypes, the constexprs it fixes, the variants it compiles."""

    module: str
    name: str
    pointers: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})
    # Variants also compiled as launched on rows whose stride is not a multiple of 16 elements (labelled UNALIGNED).
    unaligned: tuple[str, ...] = ()


def _by_mode(modes=MODES) -> dict[str, dict]:
    return {name: {"MODE": code} for name, code in modes.items()}


def _with_entropy(variants: dict[str, dict]) -> dict[str, dict]:
    """``variants`` as launched without the student's entropy, then each again with it (WITH_ENTROPY, labelled
    "<variant> entropy"): the statistics passes that fuse it (TritonEpilogue.stats_update's entropy state,
    TritonStreamingOps' spec.entropy)."""
    plain = {name: {**v, "WITH_ENTROPY": False} for name, v in variants.items()}
    return {**plain, **{f"{name} entropy": {**v, "WITH_ENTROPY": True} for name, v in variants.items()}}


def _topk_variants(max_k: int, every_k: bool) -> dict[str, dict]:
    ks = [16, max_k] if not every_k else [1 << i for i in range(4, max_k.bit_length())]
    # BV as topk_stats picks it on a GPU: at least K columns per tile.
    return {f"K={k}": {"K": k, "BV": max(k, 128)} for k in sorted(set(ks))}


def kernel_specs(max_k: int, every_k: bool) -> list[KernelSpec]:
    """Every Triton kernel with the launch arguments of opd_fast/kernels/*.py's host functions on a GPU."""
    two_inputs = {"hs_ptr": INPUT, "ws_ptr": INPUT, "ht_ptr": INPUT, "wt_ptr": INPUT}
    grad_tile = {"BN": 64, "BV": 128}  # linear_grad.tile_shape() on a GPU
    terms_grad_tile = {"BN": 64, "BV": 64}  # linear_grad.tile_shape(mode) of the TERMS_MODES
    grad_tiles = {"": {}, "terms tile": terms_grad_tile}  # the gradient GEMMs run on either
    epilogue_bv = {"BV": 2048}  # _common.epilogue_block() for chunks of ≥ 2048 columns on a GPU
    stats_bv = {"BV": 1024}  # chunk_stats._stats_block() for chunks of ≥ 1024 columns on a GPU
    return [
        KernelSpec(
            "linear_softmax",
            "_softmax_stats_fwd_kernel",
            {**two_inputs, "ids_ptr": "i64", "part_ptr": "fp32", "bias_s_ptr": "fp32", "bias_t_ptr": "fp32"},
            NO_HEAD,
            _with_entropy(_by_mode(STATS_MODES)),
        ),
        KernelSpec(
            "linear_softmax",
            "_divergence_terms_kernel",
            {
                **two_inputs,
                **dict.fromkeys(["lse_s_ptr", "lse_t_ptr", "lo_s_ptr", "lo_t_ptr", "part_ptr"], "fp32"),
                **dict.fromkeys(["bias_s_ptr", "bias_t_ptr"], "fp32"),
            },
            NO_HEAD,
            _by_mode(TERMS_MODES),
        ),
        KernelSpec(
            "linear_grad",
            "_logit_grad_kernel",
            {
                **two_inputs,
                "ids_ptr": "i64",
                **dict.fromkeys(["lse_s_ptr", "lse_t_ptr", "lo_s_ptr", "lo_t_ptr", "loss_ptr", "center_ptr"], "fp32"),
                "row_w_ptr": "fp32",
                "g_ptr": INPUT,
                "colsum_ptr": "fp32",
                "flag_ptr": "i32",
                "bias_s_ptr": "fp32",
                "bias_t_ptr": "fp32",
            },
            {**NO_HEAD, **grad_tile},
            {
                name: {**variant, **(terms_grad_tile if name in TERMS_MODES else {})}
                for name, variant in _by_mode().items()
            },
        ),
        KernelSpec(
            "linear_grad",
            "_grad_hidden_kernel",
            {"g_ptr": INPUT, "kept_ptr": "i32", "count_ptr": "i32", "w_ptr": INPUT, "dh_ptr": "fp32"},
            grad_tile,
            grad_tiles,
        ),
        KernelSpec(
            "linear_grad",
            "_grad_weight_kernel",
            {"g_ptr": INPUT, "kept_ptr": "i32", "count_ptr": "i32", "h_ptr": INPUT, "dw_ptr": INPUT},
            grad_tile,
            grad_tiles,
        ),
        KernelSpec(
            "linear_topk",
            "_topk_stats_kernel",
            {"h_ptr": INPUT, "w_ptr": INPUT, "keys_ptr": "i64", "part_ptr": "fp32", "bias_ptr": "fp32"},
            ONE_HEAD,
            _topk_variants(max_k, every_k),
        ),
        KernelSpec(
            "chunk_stats",
            "_stats_update_kernel",
            {
                "zs_ptr": "fp32",
                "zt_ptr": "fp32",
                "ids_ptr": "i64",
                "state_ptr": "fp32",
                "entropy_ptr": "fp32",
                "bias_s_ptr": "fp32",
                "bias_t_ptr": "fp32",
            },
            {**NO_HEAD, **stats_bv},
            _with_entropy(_by_mode(STATS_MODES)),
            unaligned=tuple(_with_entropy(_by_mode(STATS_MODES))),
        ),
        KernelSpec(
            "chunk_terms",
            "_terms_update_kernel",
            dict.fromkeys(
                [
                    "zs_ptr",
                    "zt_ptr",
                    "lse_s_ptr",
                    "lse_t_ptr",
                    "lo_s_ptr",
                    "lo_t_ptr",
                    "terms_ptr",
                    "bias_s_ptr",
                    "bias_t_ptr",
                ],
                "fp32",
            ),
            {**NO_HEAD, **epilogue_bv},
            _by_mode(TERMS_MODES),
        ),
        KernelSpec(
            "chunk_grad",
            "_logit_grad_kernel",
            {
                **dict.fromkeys(["zs_ptr", "zt_ptr"], "fp32"),
                "ids_ptr": "i64",
                **dict.fromkeys(["loss_ptr", "lse_s_ptr", "lse_t_ptr", "lo_s_ptr", "lo_t_ptr", "center_ptr"], "fp32"),
                "row_w_ptr": "fp32",
                "g_ptr": "bf16",  # the chunked plan's G feeds bf16 GEMMs
                "bias_s_ptr": "fp32",
                "bias_t_ptr": "fp32",
            },
            {**NO_HEAD, **epilogue_bv},
            _by_mode(),
        ),
    ]


KERNELS = [f"{s.module}.{s.name}" for s in kernel_specs(16, every_k=False)]


# ---- the worker: runs with TRITON_INTERPRET=0, where the kernel modules expose their real autotune lists ----


def _kernel_object(spec: KernelSpec):
    import importlib

    return getattr(importlib.import_module(f"opd_fast.kernels.{spec.module}"), spec.name)


def _list_jobs(every_config: bool, kernel_filter: str | None, arch_filter: str | None) -> dict:
    """The compile jobs (JSON-able dicts), and the kernels defined in opd_fast.kernels that no spec covers."""
    import importlib
    import pkgutil

    import triton

    from opd_fast import kernels
    from opd_fast.kernels.linear_topk import MAX_K

    specs = kernel_specs(MAX_K, every_k=every_config)
    defined = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"opd_fast.kernels.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.KernelInterface):
                defined.add(f"{info.name}.{name}")
    jobs = []
    dtypes = {"bf16": "tf32", "fp32": "tf32"} if every_config else {"bf16": "tf32"}
    for spec in specs:
        qualified = f"{spec.module}.{spec.name}"
        if kernel_filter and kernel_filter not in qualified:
            continue
        kernel = _kernel_object(spec)
        configs = getattr(kernel, "configs", None) or [None]
        for index, config in enumerate(configs if every_config else configs[:1]):
            options = {"num_warps": 4, "num_stages": 3}  # triton.jit's launch defaults
            meta = {}
            if config is not None:
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                meta = dict(config.kwargs)
            launch = f"w{options['num_warps']}s{options['num_stages']}"
            label = " ".join([*(f"{k}={v}" for k, v in meta.items()), launch])
            variants = [(name, constexprs, True) for name, constexprs in spec.variants.items()]
            variants += [(name + UNALIGNED, spec.variants[name], False) for name in spec.unaligned]
            for variant, constexprs, aligned in variants:
                for dtype, precision in dtypes.items():
                    for arch in ARCHS:
                        if arch_filter and arch != arch_filter:
                            continue
                        jobs.append(
                            {
                                "kernel": qualified,
                                "variant": " ".join(v for v in (variant, dtype) if v),
                                "config_index": index,
                                "config": label,
                                "arch": arch,
                                "dtype": dtype,
                                "constexprs": {**spec.constexprs, **constexprs, **meta, "PRECISION": precision},
                                "options": options,
                                "aligned_strides": aligned,
                            }
                        )
    return {"jobs": jobs, "uncovered": sorted(defined - {f"{s.module}.{s.name}" for s in specs})}


def _compile(job: dict) -> dict:
    """Compile one job; registers and spills from ptxas -v, shared memory from Triton's metadata."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = job["kernel"].split(".")
    spec = next(s for s in kernel_specs(16, every_k=False) if s.module == module and s.name == name)
    kernel = _kernel_object(spec)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
    constexprs = {k: v for k, v in job["constexprs"].items() if k in fn.arg_names}
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{job['kernel']}: no value for constexprs {missing}; add them to its KernelSpec")
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            dtype = spec.pointers[arg]
            signature[arg] = "*" + (job["dtype"] if dtype == INPUT else dtype)
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    aligned = [arg for arg in fn.arg_names if ALIGNED_ARGS.match(arg)]
    if not job["aligned_strides"]:
        aligned = [arg for arg in aligned if not arg.startswith("stride_")]
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    capability, _ = ARCHS[job["arch"]]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton after a successful ptxas run
    log = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(log):
        source = ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=job["options"])
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no register report in the ptxas log:\n{text}")
    ptx = compiled.asm["ptx"]
    return {
        "regs": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "smem": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
        "vector_loads": len(VECTOR_LOAD.findall(ptx)),
        "loop_ex2": loop_instructions(ptx, "ex2."),
        "seconds": seconds,
        "code_hash": hashlib.sha256(compiled.asm["cubin"]).hexdigest()[:16],
    }


def loop_instructions(ptx: str, opcode: str) -> int:
    """Instructions whose opcode starts with ``opcode`` inside the PTX's loops: between a label and a later branch
    back to it (each line counted once however deeply nested)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$\w+):", line))}
    inside: set[int] = set()
    for j, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", line)
        if branch and labels.get(branch.group(1), j) < j:
            inside.update(range(labels[branch.group(1)], j))
    return sum(1 for i in inside if _opcode(lines[i]).startswith(opcode))


def _opcode(line: str) -> str:
    """The opcode of a PTX instruction line, past its guard predicate (``@%p1 ld.global…`` → ``ld.global…``)."""
    words = line.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def _worker() -> None:
    """Compile the JSON list of jobs on stdin, one JSON result line per job, flushed as each finishes."""
    for job in json.load(sys.stdin):
        try:
            result = {**job, **_compile(job), "error": None}
        except Exception as error:  # a compile error is a result to report, not the end of the batch
            result = {**job, "error": f"{type(error).__name__}: {str(error)[-2000:]}"}
        print(json.dumps(result), flush=True)


# ---- the parent: batches of jobs in worker processes, each job under a deadline ----------------------------


def _worker_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OPD_FAST_TRITON_FIXED_CONFIG")}
    env.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir)
    return env


def _spawn(args: list[str], cache_dir: str, stdin: str | None = None, stderr=None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_worker_env(cache_dir),
        start_new_session=True,  # its own process group: a deadline kills ptxas with it
    )
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    return proc


def list_jobs(every_config: bool, kernel_filter=None, arch_filter=None) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        args = ["--list", *(["--all"] if every_config else [])]
        args += ["--kernel", kernel_filter] if kernel_filter else []
        args += ["--arch", arch_filter] if arch_filter else []
        proc = _spawn(args, cache_dir, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"listing the kernels failed:\n{err}")
        return json.loads(out)


def _pump(stream, lines: queue.Queue) -> None:
    """Forward a worker's result lines to ``lines``, then None at its end of output."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_batch(jobs: list[dict], bound_s: float) -> list[dict]:
    """Results of ``jobs`` in one worker; a job past its deadline is killed, recorded, and the rest restarted."""
    results: list[dict] = []
    while jobs:
        with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryFile("w+") as err:
            proc = _spawn(["--worker"], cache_dir, stdin=json.dumps(jobs), stderr=err)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            done = 0
            for job in jobs:
                # The first job's deadline also covers the worker's start (imports: a few seconds).
                try:
                    line = lines.get(timeout=bound_s + (30 if done == 0 else 0))
                except queue.Empty:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    results.append({**job, "error": f"did not compile within {bound_s} s (killed)"})
                    done += 1
                    break
                if line is None:  # the worker died without a report for this job
                    proc.wait()
                    err.seek(0)
                    results.append({**job, "error": f"worker exited {proc.returncode}: {err.read()[-2000:]}"})
                    done += 1
                    break
                results.append(json.loads(line))
                done += 1
            else:
                proc.wait()
            jobs = jobs[done:]
    return results


def run_jobs(jobs: list[dict], bound_s: float = COMPILE_BOUND_S, progress=None) -> list[dict]:
    """Compile all jobs, one batch per (kernel, arch), ``WORKERS`` batches at a time; results in job order."""
    batches: dict[tuple, list[dict]] = {}
    for job in jobs:
        batches.setdefault((job["kernel"], job["arch"]), []).append(job)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(_run_batch, batch, bound_s) for batch in batches.values()]
        results = []
        for future in futures:
            results.extend(future.result())
            if progress is not None:
                progress(len(results), len(jobs))
    return results


# ---- checks and the table ------------------------------------------------------------------------------------


def problems(result: dict, bound_s: float = COMPILE_BOUND_S) -> list[str]:
    """What is wrong with one compiled configuration (empty when it is clean)."""
    if result["error"]:
        return [result["error"].splitlines()[0] if result["error"] else ""]
    found = []
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    limit = ARCHS[result["arch"]][1]
    if result["smem"] > limit:
        found.append(f"shared memory {result['smem']} B > {limit} B")
    if result["seconds"] > bound_s:
        found.append(f"compiled in {result['seconds']:.0f} s > {bound_s} s")
    return found


def duplicates(results: list[dict]) -> dict[int, int]:
    """{id(result): index of the earlier configuration with identical code} within (kernel, variant, arch)."""
    first: dict[tuple, int] = {}
    dup = {}
    for r in results:
        if r["error"]:
            continue
        key = (r["kernel"], r["variant"], r["arch"], r["code_hash"])
        if key in first:
            dup[id(r)] = first[key]
        else:
            first[key] = r["config_index"]
    return dup


def table(results: list[dict], bound_s: float = COMPILE_BOUND_S) -> str:
    dup = duplicates(results)
    head = ("kernel", "variant", "config", "arch", "regs", "spills", "smem KiB", "wgmma", "v4 ld", "loop ex2", "s")
    head += ("status",)
    rows = [head]
    for r in results:
        status = "; ".join(problems(r, bound_s)) or "ok"
        if id(r) in dup:
            status += f"; same code as config #{dup[id(r)]}"
        config = f"#{r['config_index']} {r['config']}"
        if r["error"]:
            rows.append((r["kernel"], r["variant"], config, r["arch"], *["-"] * 7, status))
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        usage = (str(r["regs"]), spills, f"{r['smem'] / 1024:.0f}", "yes" if r["wgmma"] else "no")
        usage += (str(r["vector_loads"]), str(r["loop_ex2"]))
        rows.append((r["kernel"], r["variant"], config, r["arch"], *usage, f"{r['seconds']:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# ---- pytest ----------------------------------------------------------------------------------------------------


def _every_config() -> bool:
    return os.environ.get(AOT_ENV, "") == "all"


# Every test here but the last reads the compile report (2-4 minutes on 2 cores).
COMPILES = pytest.mark.slow


@pytest.fixture(scope="module")
def report(request):
    from triton.backends.nvidia.compiler import get_ptxas

    if not os.path.exists(get_ptxas(90).path):
        pytest.skip("this Triton install has no bundled ptxas")
    listing = list_jobs(_every_config())
    started = time.perf_counter()
    results = run_jobs(listing["jobs"])
    text = table(results)
    elapsed = time.perf_counter() - started
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # shown even when pytest captures output
        reporter.write_line(f"\nTriton AOT report ({len(results)} compiles, {elapsed:.0f} s):\n{text}")
    return listing, results


@COMPILES
def test_every_kernel_is_covered(report):
    listing, _ = report
    assert not listing["uncovered"], f"Triton kernels without a KernelSpec here: {listing['uncovered']}"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kernel", KERNELS)
@COMPILES
def test_default_config_compiles_cleanly(report, kernel, arch):
    """The default configuration of each kernel compiles in bounded time, without spills, within shared memory."""
    _, results = report
    mine = [r for r in results if r["kernel"] == kernel and r["arch"] == arch and r["config_index"] == 0]
    assert mine, f"no default configuration of {kernel} was compiled for {arch}"
    known = KNOWN_PROBLEMS.get(kernel)
    bad = [f"{r['variant']} {r['config']}: {'; '.join(problems(r))}" for r in mine if problems(r)]
    unknown = [line for line in bad if known is None or not line.startswith(known[0])]
    assert not unknown, f"{kernel} on {arch}:\n" + "\n".join(unknown)
    if known is not None:
        assert bad, f"{kernel} {known[0]} is clean now: remove it from KNOWN_PROBLEMS"
        pytest.xfail(f"{known[1]}: " + "; ".join(bad))


@pytest.mark.parametrize("arch", list(ARCHS))
@COMPILES
def test_chunk_stats_kernel_is_occupancy_friendly(report, arch):
    """The chunked plan's statistics pass reads both models' fp32 workspace rows once and is memory-bound: per
    variant (mode; with the student's entropy or without; row stride a multiple of 16 elements or not) at most 128
    registers and no spills, 128-bit loads of both tiles where the stride allows them (the sweep pads it to 64
    elements on CUDA), and in its loop one exponential per model and element (the online max and sum of
    ``_online_step``, whose exponential the entropy's sum shares)."""
    _, results = report
    mine = [r for r in results if r["kernel"] == STATS_KERNEL and r["arch"] == arch and r["config_index"] == 0]
    assert {r["variant"].split()[0] for r in mine} == set(STATS_MODES)
    assert {(r["variant"].split()[0], r["constexprs"]["WITH_ENTROPY"]) for r in mine} == {
        (mode, fused) for mode in STATS_MODES for fused in (False, True)
    }
    for r in mine:
        assert not r["error"], r["error"]
        name = f"{r['variant']} on {arch}"
        assert r["regs"] <= STATS_MAX_REGISTERS, f"{name}: {r['regs']} registers > {STATS_MAX_REGISTERS}"
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{name} spills"
        models = 2 if r["constexprs"]["MODE"] < MODES["token_logprob"] else 1
        per_thread = r["constexprs"]["BV"] // (32 * r["options"]["num_warps"])
        assert r["loop_ex2"] <= models * per_thread, f"{name}: {r['loop_ex2']} ex2 per {per_thread} columns"
        if UNALIGNED not in r["variant"]:
            assert r["vector_loads"] >= models, f"{name}: {r['vector_loads']} 128-bit loads"


@pytest.mark.skipif(not _every_config(), reason=f"every autotune configuration: {AOT_ENV}=all")
@COMPILES
def test_autotune_lists_are_clean(report):
    """No configuration of an autotune list spills, overflows shared memory or repeats an earlier one's code."""
    _, results = report
    dup = duplicates(results)
    bad = [
        f"{r['kernel']} {r['variant']} {r['arch']} #{r['config_index']} {r['config']}: "
        + "; ".join(problems(r) + ([f"same code as #{dup[id(r)]}"] if id(r) in dup else []))
        for r in results
        if problems(r) or id(r) in dup
    ]
    assert not bad, "prune these from the kernels' autotune lists:\n" + "\n".join(bad)


def test_topk_beyond_max_k_streams_with_the_torch_epilogue():
    """k > MAX_K (longer than the kernel's register budget) falls back to the torch stream, same results."""
    import torch

    from opd_fast.backends.torch_backend import TorchOps
    from opd_fast.backends.triton_backend import TritonStreamingOps
    from opd_fast.kernels.linear_topk import MAX_K
    from opd_fast.types import Side

    h, w = torch.randn(4, 8), torch.randn(MAX_K + 200, 8)
    ours = TritonStreamingOps().topk(Side(h, w), MAX_K + 1, 1.0)
    ref = TorchOps().topk(Side(h, w), MAX_K + 1, 1.0)
    assert torch.equal(ours[0], ref[0])
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every autotune configuration, not just the defaults")
    parser.add_argument("--kernel", help="only kernels whose module.name contains this")
    parser.add_argument("--arch", choices=list(ARCHS))
    parser.add_argument("--bound", type=float, default=COMPILE_BOUND_S, help="seconds per compile")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker()
        return 0
    if args.list:
        print(json.dumps(_list_jobs(args.all, args.kernel, args.arch)))
        return 0
    jobs = list_jobs(args.all, args.kernel, args.arch)["jobs"]
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="compiling", unit="kernel") as bar:
        results = run_jobs(jobs, args.bound, progress=lambda done, _total: bar.update(done - bar.n))
    print(table(results, args.bound))
    bad = [r for r in results if problems(r, args.bound)]
    print(f"\n{len(results)} compiles, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
