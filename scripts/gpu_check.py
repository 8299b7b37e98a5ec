"""GPU first-run kit (``make gpu-check``): build bitpress on a lent GPU machine and check it there.

One command, one report. On the lent machine (preinstalled python3 with torch and triton, no
package registry, no venv) it runs these stages, each under its own time budget, and writes
``report.md`` (plus ``report.json`` and the raw output of every stage in ``gpu-check.log``)
to GPU_CHECK_OUT (default build/gpu-check):

  env        versions (python, torch, triton, nvcc, driver, compute-sanitizer), the GPU and its
             compute capability, which sets TORCH_CUDA_ARCH_LIST (arch_list_for)
  build      ``setup.py build`` into build/gpu-check/setup (out of tree: nothing in python/ is
             touched), CUDA for that GPU's arch only, MAX_JOBS = nproc
  selftest   ``python -m bitpress selftest``
  gpu-tests  ``pytest -m gpu tests`` (a per-test timeout where pytest-timeout is installed)
  memcheck   ``compute-sanitizer --tool memcheck`` over scripts/sanitizer_cases.py (small cases
             of every CUDA op, torch's caching allocator off so that every tensor is its own
             allocation and an out-of-bounds access hits its edge)
  racecheck  ``compute-sanitizer --tool racecheck`` over the same cases
  bench      ``pytest bench -m gpu --benchmark-only``

Later stages run with PYTHONPATH at the built package. The report is rewritten after every
stage (a kill from outside leaves the stages done so far), and the exit status is non-zero only
after it is written. ``--dry-run`` prints and reports the plan without running it;
``--fake-capability 9.0`` stands in for the GPU (CI). ``--cpu`` is the CPU-only variant that CI
runs against an older torch (``make test-older-torch``): env, build (BITPRESS_CUDA=0),
selftest and the sanitizer cases on the CPU backends.

Environment: GPU_CHECK_OUT (report folder), GPU_CHECK_PYTHON (default: this interpreter),
GPU_CHECK_BUDGET (total seconds, default 525), GPU_CHECK_STAGES (comma list),
TORCH_CUDA_ARCH_LIST (overrides the detected arch), MAX_JOBS (default nproc),
GPU_CHECK_SANITIZER_ARGS (extra compute-sanitizer arguments, e.g. a kernel filter),
GPU_CHECK_SANITIZER_BACKENDS (default ``cuda``; ``cuda,triton`` adds the Triton kernels),
GPU_CHECK_TEST_WORKERS (pytest-xdist workers for the gpu tests, default 4; 1: none).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOTAL_BUDGET = 525.0  # seconds: under 9 minutes with room for the device tool's limit
TAIL_LINES = 40  # lines of each stage's output in report.md
LOG_LIMIT = 2_000_000  # bytes of one stage's output kept in gpu-check.log (head and tail)

# Seconds per stage on the lent machine (16 cores, one H200). They add up to the total budget.
BUDGETS = {
    "env": 15,
    "build": 180,
    "selftest": 40,
    "gpu-tests": 100,
    "memcheck": 50,
    "racecheck": 55,
    "bench": 85,  # builds and packs its Llama-sized weights on the CPU per case
}
CPU_BUDGETS = {"env": 30, "build": 1200, "selftest": 300, "cases-cpu": 300}


# ----- arch detection -------------------------------------------------------------------------


def arch_for(cc: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST entry for one GPU of compute capability ``cc`` (its arch only).

    9.0 (H100/H200) -> "9.0a": the arch-specific target, so that the ``_sm90a.cu`` sources
    (wgmma, setmaxnreg) are built too; ``_sm80.cu`` sources run there as sm_90a cubins.
    8.x (A100 8.0, A10/3090 8.6, L4/4090 8.9) -> "8.x": a native cubin of the ``_sm80.cu``
    sources. Newer (10.x, 12.x ...) -> "X.Y": native cubins of the portable sources (no
    arch-specific bitpress kernel exists for them yet). Below 8.0: no bitpress CUDA kernel.
    """
    major, minor = cc
    if major < 8:
        raise ValueError(
            f"compute capability {major}.{minor}: bitpress's CUDA kernels need 8.0 or newer"
        )
    if (major, minor) == (9, 0):
        return "9.0a"
    return f"{major}.{minor}"


def arch_list_for(capabilities: list[tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST for the machine's GPUs: one entry per distinct capability, sorted."""
    if not capabilities:
        raise ValueError("no CUDA GPU found: nothing to build CUDA kernels for")
    return ";".join(sorted({arch_for(tuple(cc)) for cc in capabilities}))


def parse_capabilities(text: str) -> list[tuple[int, int]]:
    """Capabilities from the env stage's ``capabilities: 9.0,8.6`` line (or nvidia-smi's
    ``compute_cap`` column, one ``9.0`` per line), in device order."""
    m = re.search(r"^capabilities:[ \t]*([0-9., ]*)$", text, re.M)
    items = m[1].split(",") if m else re.findall(r"^\s*(\d+\.\d+)\s*$", text, re.M)
    out = []
    for item in items:
        item = item.strip()
        if item:
            major, minor = item.split(".")
            out.append((int(major), int(minor)))
    return out


# The env stage: what the machine has. `key: value` lines (parsed into the report's header).
ENV_SCRIPT = r"""
import importlib, json, os, shutil, subprocess, sys, platform
def ver(mod):
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:
        return f"missing ({type(e).__name__})"
def first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        return [l for l in out.splitlines() if l.strip()][-1] if out else "no output"
    except Exception as e:
        return f"not found ({type(e).__name__})"
print("python:", platform.python_version(), sys.executable)
print("nproc:", os.cpu_count())
import torch
print("torch:", torch.__version__, "cuda", torch.version.cuda)
for mod in ("triton", "pytest", "pytest_benchmark", "pytest_timeout", "xdist", "numpy",
            "setuptools", "ninja", "hypothesis", "safetensors", "transformers", "scipy"):
    print(f"{mod}:", ver(mod))
cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
nvcc = shutil.which("nvcc") or os.path.join(cuda_home, "bin", "nvcc")
print("nvcc:", first_line([nvcc, "--version"]))
san = shutil.which("compute-sanitizer") or os.path.join(cuda_home, "bin", "compute-sanitizer")
print("compute-sanitizer:", first_line([san, "--version"]))
print("driver:", first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
caps = [torch.cuda.get_device_capability(i) for i in range(n)]
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu{i}:", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
print("capabilities:", ",".join(f"{a}.{b}" for a, b in caps))
"""


# ----- stages ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    python: str
    out: str
    build_dir: str
    jobs: int
    cpu: bool = False
    dry_run: bool = False
    arch_list: str | None = None  # set by the env stage (or TORCH_CUDA_ARCH_LIST)
    arch_source: str = ""
    env_info: dict[str, str] = dataclasses.field(default_factory=dict)
    sanitizer: str = "compute-sanitizer"
    sanitizer_args: list[str] = dataclasses.field(default_factory=list)
    sanitizer_backends: str = "cuda"
    test_timeout: int = 60  # seconds per gpu test, with pytest-timeout
    test_workers: int = 4  # pytest-xdist workers for the gpu tests, where it is installed

    @property
    def lib(self) -> str:
        return os.path.join(self.build_dir, "lib")

    def pyenv(self) -> dict[str, str]:
        """Environment of the stages that use the built package."""
        old = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": self.lib + (os.pathsep + old if old else "")}


@dataclasses.dataclass
class Stage:
    name: str
    budget: float
    command: Callable[[Context], list[str]]
    env: Callable[[Context], dict[str, str]] = lambda ctx: {}
    needs: tuple[str, ...] = ()  # stages that must have passed first
    summarize: Callable[[str], str] = lambda text: ""
    tail_lines: int = TAIL_LINES


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # ok | fail | timeout | skipped | planned
    seconds: float
    budget: float
    command: str
    summary: str = ""
    returncode: int | None = None
    tail: str = ""


def summarize_pytest(text: str) -> str:
    """The final ``N passed, M failed ... in 12.3s`` line of a pytest run."""
    lines = re.findall(r"^=*\s*(\d+ \w+.*? in [\d.]+s.*?)\s*=*$", text, re.M)
    return lines[-1] if lines else ""


def summarize_selftest(text: str) -> str:
    m = re.findall(r"^(\d+ passed, \d+ failed)$", text, re.M)
    return m[-1] if m else ""


def summarize_sanitizer(text: str) -> str:
    """compute-sanitizer's summary line(s) and the case script's own count."""
    parts = []
    cases = re.findall(r"^(\d+ cases ok, \d+ failed.*)$", text, re.M)
    if cases:
        parts.append(cases[-1])
    for pat in (r"(ERROR SUMMARY: \d+ errors?)", r"(RACECHECK SUMMARY: .*)$"):
        found = re.findall(pat, text, re.M)
        if found:
            parts.append(found[-1].strip())
    if "Device not supported" in text:
        parts.append("compute-sanitizer: device not supported (gVisor runtime?)")
    return "; ".join(parts)


def summarize_build(text: str) -> str:
    steps = re.findall(r"^\[(\d+)/(\d+)\]", text, re.M)
    built = re.findall(r"(\S*_C\.\S*\.so)", text)
    parts = [f"{steps[-1][1]} compile steps"] if steps else []
    if built:
        parts.append(os.path.basename(built[-1]))
    return ", ".join(parts)


def summarize_env(text: str) -> str:
    info = parse_env(text)
    keys = ("gpu0", "torch", "triton", "nvcc", "capabilities")
    return "; ".join(f"{k} {info[k]}" for k in keys if info.get(k))


def parse_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_0-9-]+): (.*)$", line)
        if m:
            out[m[1]] = m[2].strip()
    return out


def _env_after(ctx: Context, res: StageResult, text: str) -> None:
    ctx.env_info = parse_env(text)
    if ctx.cpu or ctx.arch_list:
        return
    try:
        ctx.arch_list = arch_list_for(parse_capabilities(text))
        ctx.arch_source = "compute capability " + ctx.env_info.get("capabilities", "?")
    except ValueError as e:
        res.status = "fail"
        res.summary = "; ".join(p for p in (str(e), res.summary) if p)


def _build_env(ctx: Context) -> dict[str, str]:
    # The interpreter's bin folder first: torch's cpp_extension runs `ninja` from PATH, which a
    # venv's ninja package puts there only when the venv is activated.
    path = os.path.dirname(ctx.python) + os.pathsep + os.environ.get("PATH", "")
    env = {"MAX_JOBS": str(ctx.jobs), "BITPRESS_CUDA": "0" if ctx.cpu else "1", "PATH": path}
    if not ctx.cpu:
        env["TORCH_CUDA_ARCH_LIST"] = ctx.arch_list or "(from the env stage)"
    return env


def _sanitizer_cmd(tool: str) -> Callable[[Context], list[str]]:
    def cmd(ctx: Context) -> list[str]:
        return [
            ctx.sanitizer,
            "--tool",
            tool,
            "--error-exitcode",
            "99",
            "--print-limit",
            "200",
            *ctx.sanitizer_args,
            ctx.python,
            os.path.join(ROOT, "scripts", "sanitizer_cases.py"),
            "--device",
            "cuda",
            "--backends",
            ctx.sanitizer_backends,
        ]

    return cmd


def _sanitizer_env(ctx: Context) -> dict[str, str]:
    # Every tensor its own cudaMalloc: an access past a tensor's end leaves its allocation
    # (with the caching allocator it would land in a neighbour inside the same segment).
    return {**ctx.pyenv(), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


def _pytest_gpu(ctx: Context) -> list[str]:
    cmd = [ctx.python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"]
    cmd += ["--maxfail", "30"]
    if _installed(ctx, "pytest_timeout"):
        cmd += ["--timeout", str(ctx.test_timeout)]
    if _installed(ctx, "xdist") and ctx.test_workers > 1:
        # Workers compile the Triton kernels in parallel (16 cores); one GPU holds them all.
        cmd += ["-n", str(ctx.test_workers)]
    return cmd


def _installed(ctx: Context, module: str) -> bool:
    """Whether the env stage found ``module`` importable (dry runs: assume it is)."""
    if ctx.dry_run and not ctx.env_info:
        return True
    return not ctx.env_info.get(module, "missing").startswith("missing")


def stages(ctx: Context, budgets: dict[str, float] | None = None) -> list[Stage]:
    """The plan: the GPU stages, or with ``ctx.cpu`` the CPU-only check (older torch, CI)."""
    b = dict(CPU_BUDGETS if ctx.cpu else BUDGETS)
    b.update(budgets or {})
    py = ctx.python
    env = Stage(
        "env",
        b["env"],
        lambda ctx: [py, "-c", ENV_SCRIPT],
        summarize=summarize_env,
    )
    build = Stage(
        "build",
        b["build"],
        lambda ctx: [
            py,
            os.path.join(ROOT, "setup.py"),
            "build",
            "--build-base",
            ctx.build_dir,
            "--build-lib",
            ctx.lib,
        ],
        env=_build_env,
        needs=("env",),
        summarize=summarize_build,
    )
    selftest = Stage(
        "selftest",
        b["selftest"],
        lambda ctx: [py, "-m", "bitpress", "selftest"],
        env=lambda ctx: ctx.pyenv(),
        needs=("build",),
        summarize=summarize_selftest,
    )
    if ctx.cpu:
        cases = Stage(
            "cases-cpu",
            b["cases-cpu"],
            lambda ctx: [
                py,
                os.path.join(ROOT, "scripts", "sanitizer_cases.py"),
                "--device",
                "cpu",
                "--backends",
                "cpu",
            ],
            env=lambda ctx: ctx.pyenv(),
            needs=("build",),
            summarize=summarize_sanitizer,
        )
        return [env, build, selftest, cases]
    return [
        env,
        build,
        selftest,
        Stage(
            "gpu-tests",
            b["gpu-tests"],
            _pytest_gpu,
            env=lambda ctx: ctx.pyenv(),
            needs=("build",),
            summarize=summarize_pytest,
        ),
        Stage(
            "memcheck",
            b["memcheck"],
            _sanitizer_cmd("memcheck"),
            env=_sanitizer_env,
            needs=("build",),
            summarize=summarize_sanitizer,
        ),
        Stage(
            "racecheck",
            b["racecheck"],
            _sanitizer_cmd("racecheck"),
            env=_sanitizer_env,
            needs=("build",),
            summarize=summarize_sanitizer,
        ),
        Stage(
            "bench",
            b["bench"],
            lambda ctx: [
                py,
                "-m",
                "pytest",
                "bench",
                "-m",
                "gpu",
                "--benchmark-only",
                "-q",
                "-s",
                "-p",
                "no:cacheprovider",
            ],
            env=lambda ctx: ctx.pyenv(),
            needs=("build",),
            summarize=summarize_pytest,
            tail_lines=80,  # the benchmark table
        ),
    ]


def _collect_bench_csv(ctx: Context, since: float) -> None:
    """Copy the CSVs the bench stage wrote (bench/results/) next to the report (at most 4: the
    device tool brings back 8 files)."""
    results = os.path.join(ROOT, "bench", "results")
    wall_since = time.time() - (time.monotonic() - since)
    if not os.path.isdir(results):
        return
    fresh = sorted(
        f
        for f in os.listdir(results)
        if f.endswith(".csv") and os.path.getmtime(os.path.join(results, f)) >= wall_since - 1
    )
    for f in fresh[:4]:
        shutil.copy(os.path.join(results, f), os.path.join(ctx.out, "bench-" + f))


def show_command(cmd: list[str]) -> str:
    """The command as a shell line, inline scripts shortened (report and plan)."""
    return shlex.join(f"<script: {len(a.splitlines())} lines>" if "\n" in a else a for a in cmd)


def show_env(env: dict[str, str]) -> str:
    out = []
    for k, v in env.items():
        if k == "PATH":  # the interpreter's folder, then the inherited PATH
            v = v.split(os.pathsep)[0] + os.pathsep + "$PATH"
        out.append(f"{k}={v}")
    return " ".join(out)


# ----- running --------------------------------------------------------------------------------


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _clip(text: str, limit: int = LOG_LIMIT) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + f"\n[... {len(text) - limit} characters left out ...]\n" + text[-half:]


def run_command(
    cmd: list[str], env: dict[str, str], timeout: float, cwd: str = ROOT
) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group; on timeout the whole group is killed (SIGTERM,
    then SIGKILL). Returns (returncode or None on timeout, output, seconds)."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        return 127, f"cannot start {cmd[0]}: {e}\n", time.monotonic() - t0
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                out = b""
        rc = None
    text = (out or b"").decode("utf-8", "replace")
    return rc, text, time.monotonic() - t0


class Runner:
    def __init__(self, ctx: Context, plan: list[Stage], total_budget: float):
        self.ctx, self.plan, self.total = ctx, plan, total_budget
        self.results: list[StageResult] = []
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t0 = time.monotonic()
        os.makedirs(ctx.out, exist_ok=True)
        self.log_path = os.path.join(ctx.out, "gpu-check.log")
        with open(self.log_path, "w") as f:
            f.write(f"bitpress gpu-check, started {self.started.isoformat()}\n")

    def _log(self, res: StageResult, env: dict[str, str], text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"\n===== stage {res.name}: {res.status} in {res.seconds:.1f} s ")
            f.write(f"(budget {res.budget:.0f} s) =====\n$ {res.command}\n")
            if env:
                f.write(f"env: {show_env(env)}\n")
            f.write(_clip(text))
            if not text.endswith("\n"):
                f.write("\n")

    def run(self) -> list[StageResult]:
        passed: set[str] = set()
        for stage in self.plan:
            missing = [n for n in stage.needs if n not in passed]
            env = stage.env(self.ctx)
            cmd = show_command(stage.command(self.ctx))
            remaining = self.total - (time.monotonic() - self.t0)
            res = StageResult(stage.name, "skipped", 0.0, stage.budget, cmd)
            if self.ctx.dry_run:
                res.status = "planned"
                res.summary = "dry run"
                if stage.name == "env" and not self.ctx.cpu and self.ctx.arch_list:
                    res.summary += f"; TORCH_CUDA_ARCH_LIST={self.ctx.arch_list}"
            elif missing:
                res.summary = f"skipped: {', '.join(missing)} did not pass"
            elif remaining < 1:
                res.summary = "skipped: the total budget is spent"
            else:
                timeout = min(stage.budget, remaining)
                rc, text, secs = run_command(stage.command(self.ctx), env, timeout)
                res.seconds, res.returncode = secs, rc
                res.tail = _tail(text, stage.tail_lines)
                if rc is None:
                    res.status = "timeout"
                    res.summary = f"killed after {timeout:.0f} s"
                else:
                    res.status = "ok" if rc == 0 else "fail"
                try:
                    s = stage.summarize(text)
                except Exception as e:  # a summary never fails the run
                    s = f"(no summary: {type(e).__name__})"
                res.summary = "; ".join(p for p in (res.summary, s) if p)
                if rc is not None and rc != 0 and not s:
                    res.summary = f"exit status {rc}"
                if stage.name == "env":  # the build's arch list comes from what env found
                    _env_after(self.ctx, res, text)
                if stage.name == "bench":
                    _collect_bench_csv(self.ctx, time.monotonic() - secs)
                self._log(res, env, text)
            if res.status == "ok":
                passed.add(stage.name)
            self.results.append(res)
            self.write_report()
            print(
                f"[gpu-check] {res.name}: {res.status} ({res.seconds:.1f} s of "
                f"{res.budget:.0f}) {res.summary}",
                flush=True,
            )
        return self.results

    def write_report(self) -> None:
        elapsed = time.monotonic() - self.t0
        md = format_report(
            self.results,
            self.ctx,
            self.plan,
            started=self.started.isoformat(timespec="seconds"),
            elapsed=elapsed,
            total_budget=self.total,
        )
        with open(os.path.join(self.ctx.out, "report.md"), "w") as f:
            f.write(md)
        data = {
            "started": self.started.isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "total_budget_s": self.total,
            "arch_list": self.ctx.arch_list,
            "env": self.ctx.env_info,
            "ok": overall_ok(self.results, self.plan),
            "stages": [dataclasses.asdict(r) for r in self.results],
        }
        with open(os.path.join(self.ctx.out, "report.json"), "w") as f:
            json.dump(data, f, indent=1)


def overall_ok(results: list[StageResult], plan: list[Stage]) -> bool:
    return len(results) == len(plan) and all(r.status in ("ok", "planned") for r in results)


def format_report(
    results: list[StageResult],
    ctx: Context,
    plan: list[Stage],
    started: str,
    elapsed: float,
    total_budget: float,
) -> str:
    """report.md: a header (machine, arch, result), one table row per stage, then per stage its
    command and the tail of its output."""
    done = len(results) == len(plan)
    bad = [r.name for r in results if r.status not in ("ok", "planned")]
    if not done:
        verdict = f"INCOMPLETE ({len(results)} of {len(plan)} stages ran)"
    elif bad:
        verdict = f"FAIL ({', '.join(bad)})"
    elif any(r.status == "planned" for r in results):
        verdict = "DRY RUN (nothing ran)"
    else:
        verdict = "PASS"
    info = ctx.env_info
    lines = [
        "# bitpress GPU check",
        "",
        f"- result: **{verdict}**",
        f"- started {started} (UTC), {elapsed:.1f} s of a {total_budget:.0f} s budget",
    ]
    for key in ("gpu0", "driver", "python", "torch", "triton", "nvcc", "compute-sanitizer"):
        if info.get(key):
            lines.append(f"- {key}: {info[key]}")
    if ctx.cpu:
        lines.append("- mode: CPU only (BITPRESS_CUDA=0)")
    else:
        src = f" (from {ctx.arch_source})" if ctx.arch_source else ""
        lines.append(f"- TORCH_CUDA_ARCH_LIST: {ctx.arch_list or 'not determined'}{src}")
    lines.append(f"- MAX_JOBS: {ctx.jobs}; built package: {ctx.lib}")
    lines += [
        "",
        "| stage | status | seconds | budget | summary |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        summary = r.summary.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget:.0f} | {summary} |")
    for s in plan[len(results) :]:
        lines.append(f"| {s.name} | not run yet | | {s.budget:.0f} | |")
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", "", f"`{r.command}`"]
        if r.tail:
            lines += ["", "```text", r.tail.replace("```", "'''"), "```"]
    lines += ["", "Full output of every stage: gpu-check.log beside this file.", ""]
    return "\n".join(lines)


def _find_sanitizer() -> str:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.join(home, "bin", "compute-sanitizer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "build/gpu-check")
    ap.add_argument("--python", default=os.environ.get("GPU_CHECK_PYTHON") or sys.executable)
    ap.add_argument("--build-dir", default=None, help="default: build/gpu-check/setup")
    ap.add_argument("--cpu", action="store_true", help="CPU-only check (older torch, CI)")
    ap.add_argument("--dry-run", action="store_true", help="print and report the plan only")
    ap.add_argument(
        "--fake-capability",
        action="append",
        default=[],
        help="compute capability to plan for instead of detecting it (dry runs, tests)",
    )
    ap.add_argument("--stages", default=os.environ.get("GPU_CHECK_STAGES", ""))
    ap.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET") or DEFAULT_TOTAL_BUDGET),
        help="total seconds (default %(default)s)",
    )
    ap.add_argument(
        "--stage-budget",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="another budget for one stage (e.g. build=1200 on a 2-core machine)",
    )
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 0) or None)
    ap.add_argument(
        "--test-workers",
        type=int,
        default=int(os.environ.get("GPU_CHECK_TEST_WORKERS") or 4),
        help="pytest-xdist workers for the gpu tests (1: none)",
    )
    args = ap.parse_args(argv)

    out = os.path.abspath(args.out)
    build_dir = os.path.abspath(
        args.build_dir or os.path.join(ROOT, "build", "gpu-check-cpu" if args.cpu else "gpu-check")
    )
    if args.build_dir is None:
        build_dir = os.path.join(build_dir, "setup")
    python = shutil.which(args.python) or args.python
    ctx = Context(
        python=os.path.abspath(python) if os.sep in python else python,
        out=out,
        build_dir=build_dir,
        jobs=args.jobs or os.cpu_count() or 1,
        cpu=args.cpu,
        dry_run=args.dry_run,
        sanitizer=_find_sanitizer(),
        sanitizer_args=shlex.split(os.environ.get("GPU_CHECK_SANITIZER_ARGS", "")),
        sanitizer_backends=os.environ.get("GPU_CHECK_SANITIZER_BACKENDS") or "cuda",
        test_workers=args.test_workers,
    )
    if not args.cpu:
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            ctx.arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
            ctx.arch_source = "TORCH_CUDA_ARCH_LIST in the environment"
        elif args.fake_capability:
            ctx.arch_list = arch_list_for(parse_capabilities("\n".join(args.fake_capability)))
            ctx.arch_source = "--fake-capability " + ",".join(args.fake_capability)
    try:
        budgets = {k: float(v) for k, v in (b.split("=", 1) for b in args.stage_budget)}
    except ValueError:
        ap.error(f"--stage-budget takes STAGE=SECONDS, got {args.stage_budget}")
    plan = stages(ctx, budgets)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in plan})
        if unknown:
            ap.error(f"unknown stage(s) {unknown}; stages: {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in wanted]
        for s in plan:  # a stage chosen without its prerequisites runs anyway
            s.needs = tuple(n for n in s.needs if n in wanted)
    budget = sum(s.budget for s in plan) if args.cpu else args.budget
    if args.dry_run:
        print(f"[gpu-check] plan ({budget:.0f} s budget), report in {out}")
        for s in plan:
            env = show_env(s.env(ctx))
            print(f"  {s.name:10s} {s.budget:5.0f} s  {env} {show_command(s.command(ctx))}")
    runner = Runner(ctx, plan, budget)
    results = runner.run()
    ok = overall_ok(results, plan)
    print(f"[gpu-check] {'PASS' if ok else 'FAIL'}: report {os.path.join(out, 'report.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
