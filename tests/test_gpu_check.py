"""The GPU first-run kit (scripts/gpu_check.py, scripts/sanitizer_cases.py) without a GPU: arch
detection from fake capabilities, the stage runner and report on fake stages, the summaries on
canned tool output, the dry-run plan, the Makefile targets, and every sanitizer case on the CPU.
(The build against an older torch is ``make test-older-torch``.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bitpress._core import registry
from bitpress._core.registry import OpSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


gc = _load("bitpress_gpu_check", "scripts/gpu_check.py")
sc = _load("bitpress_sanitizer_cases", "scripts/sanitizer_cases.py")
setup_mod = _load("bitpress_setup_for_gpu_check", "setup.py")


# ----- arch detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caps, want",
    [
        ([(9, 0)], "9.0a"),
        ([(8, 0)], "8.0"),
        ([(8, 6)], "8.6"),
        ([(8, 9)], "8.9"),
        ([(10, 0)], "10.0"),
        ([(12, 0)], "12.0"),
        ([(9, 0), (8, 0), (9, 0)], "8.0;9.0a"),
    ],
)
def test_arch_list_for(caps, want):
    assert gc.arch_list_for(caps) == want
    # setup.py accepts it, and builds every CUDA source a GPU of that capability runs.
    archs = setup_mod.parse_archs(want)
    sources = [os.path.basename(p) for p in _cuda_sources()]
    for cu in sources:
        built = setup_mod.source_archs(cu, archs)
        if cu.endswith("a.cu"):  # arch-specific: only on that arch
            assert bool(built) == any(cc == (9, 0) for cc in caps), cu
        else:
            assert built, (cu, want)


def _cuda_sources():
    import glob

    return glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))


@pytest.mark.parametrize("caps", [[(7, 5)], [(6, 0)], []])
def test_arch_list_refuses_old_or_no_gpu(caps):
    with pytest.raises(ValueError, match="8.0 or newer|no CUDA GPU"):
        gc.arch_list_for(caps)


def test_parse_capabilities():
    assert gc.parse_capabilities("torch: 2.11.0\ncapabilities: 9.0,8.6\n") == [(9, 0), (8, 6)]
    assert gc.parse_capabilities("capabilities: \n") == []
    assert gc.parse_capabilities("9.0\n9.0\n") == [(9, 0), (9, 0)]  # nvidia-smi compute_cap


# ----- summaries of canned tool output ---------------------------------------------------------

MEMCHECK_OK = """\
========= COMPUTE-SANITIZER
case int4_gemm [cuda] M=1 K=1024 N=256 g=128 float16 sym: ok (rel err 1.0e-04, 812 ms)
17 cases ok, 0 failed
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_BAD = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at void bitpress::int4_gemm_kernel<...>+0x1a40 in int4_gemm_sm80.cu:201
case int4_gemm [cuda] M=65 K=256 N=129 g=128 float16 asym act-order bias: FAIL (x, 3 ms)
16 cases ok, 1 failed
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """\
========= COMPUTE-SANITIZER
17 cases ok, 0 failed
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""


def test_summaries():
    assert gc.summarize_sanitizer(MEMCHECK_OK) == "17 cases ok, 0 failed; ERROR SUMMARY: 0 errors"
    assert "ERROR SUMMARY: 3 errors" in gc.summarize_sanitizer(MEMCHECK_BAD)
    assert "RACECHECK SUMMARY: 0 hazards displayed" in gc.summarize_sanitizer(RACECHECK)
    assert "not supported" in gc.summarize_sanitizer("========= Device not supported\n")
    pytest_out = "....s\n339 passed, 24 skipped, 2 warnings in 97.13s (0:01:37)\n"
    assert gc.summarize_pytest(pytest_out).startswith("339 passed, 24 skipped")
    pytest_fail = "=== 3 failed, 336 passed in 88.20s (0:01:28) ===\n"
    assert gc.summarize_pytest(pytest_fail).startswith("3 failed, 336 passed")
    assert gc.summarize_selftest("| op | ... |\n\n41 passed, 0 failed\n") == "41 passed, 0 failed"
    build = "[1/21] c++ -c a.cpp\n[21/21] c++ -c z.cpp\ncopying build/x/_C.cpython-312.so\n"
    assert gc.summarize_build(build).startswith("21 compile steps")
    env = "torch: 2.11.0+cu130 cuda 13.0\ngpu0: NVIDIA H200 140 GiB 132 SMs\ncapabilities: 9.0\n"
    assert gc.parse_env(env)["gpu0"] == "NVIDIA H200 140 GiB 132 SMs"
    assert "capabilities 9.0" in gc.summarize_env(env)


# ----- the stage runner and the report, with fake stages ---------------------------------------


def _ctx(tmp_path, **kw):
    return gc.Context(
        python=sys.executable,
        out=str(tmp_path / "out"),
        build_dir=str(tmp_path / "b"),
        jobs=3,
        **kw,
    )


def _py(code: str):
    return lambda ctx: [sys.executable, "-c", code]


def test_runner_report(tmp_path):
    ctx = _ctx(tmp_path, arch_list="9.0a", arch_source="compute capability 9.0")
    plan = [
        gc.Stage("env", 10, _py("print('gpu0: Fake GPU'); print('torch: 2.11.0')")),
        gc.Stage("build", 10, _py("print('[1/2] a'); print('[2/2] b')"), needs=("env",)),
        gc.Stage("broken", 10, _py("import sys; print('boom | pipe'); sys.exit(3)")),
        gc.Stage("slow", 1, _py("import time; print('started', flush=True); time.sleep(30)")),
        gc.Stage("after-broken", 10, _py("print('never')"), needs=("broken",)),
        gc.Stage("last", 10, _py("print('ran')"), env=lambda ctx: {"BITPRESS_X": "1"}),
    ]
    plan[1].summarize = gc.summarize_build
    results = gc.Runner(ctx, plan, total_budget=60).run()
    status = {r.name: r.status for r in results}
    assert status == {
        "env": "ok",
        "build": "ok",
        "broken": "fail",
        "slow": "timeout",
        "after-broken": "skipped",
        "last": "ok",
    }
    by = {r.name: r for r in results}
    assert by["slow"].seconds < 15  # killed at its budget (1 s), not after 30 s
    assert "started" in by["slow"].tail
    assert by["broken"].returncode == 3 and "exit status 3" in by["broken"].summary
    assert "broken did not pass" in by["after-broken"].summary

    md = (tmp_path / "out" / "report.md").read_text()
    assert "result: **FAIL (broken, slow, after-broken)**" in md
    assert "TORCH_CUDA_ARCH_LIST: 9.0a (from compute capability 9.0)" in md
    assert "- gpu0: Fake GPU" in md
    assert "| build | ok |" in md and "2 compile steps" in md
    assert "| broken | fail |" in md and "boom | pipe" in md  # tail in a code block
    assert "## slow: timeout" in md
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["ok"] is False and [s["name"] for s in data["stages"]] == [s.name for s in plan]
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "===== stage last: ok" in log and "BITPRESS_X=1" in log and "ran" in log


def test_runner_pass_and_total_budget(tmp_path):
    ctx = _ctx(tmp_path)
    ok = gc.Runner(ctx, [gc.Stage("a", 5, _py("pass"))], total_budget=30).run()
    assert [r.status for r in ok] == ["ok"]
    assert "result: **PASS**" in (tmp_path / "out" / "report.md").read_text()
    # The total budget caps every stage and skips what no longer fits.
    plan = [gc.Stage("a", 30, _py("import time; time.sleep(30)")), gc.Stage("b", 5, _py("pass"))]
    res = gc.Runner(_ctx(tmp_path), plan, total_budget=1.5).run()
    assert [r.status for r in res] == ["timeout", "skipped"]
    assert "total budget is spent" in res[1].summary


def test_report_written_while_running(tmp_path):
    """A kill from outside leaves the stages done so far in the report."""
    ctx = _ctx(tmp_path)
    plan = [gc.Stage("a", 5, _py("pass")), gc.Stage("b", 5, _py("pass"))]
    runner = gc.Runner(ctx, plan, total_budget=30)
    runner.results.append(gc.StageResult("a", "ok", 1.0, 5, "x"))
    runner.write_report()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "INCOMPLETE (1 of 2 stages ran)" in md and "| b | not run yet |" in md


# ----- the plan (dry run) ----------------------------------------------------------------------


def test_dry_run_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    out = tmp_path / "plan"
    rc = gc.main(["--dry-run", "--fake-capability", "9.0", "--out", str(out), "--jobs", "16"])
    assert rc == 0
    text = capsys.readouterr().out
    for want in (
        "TORCH_CUDA_ARCH_LIST=9.0a",
        "MAX_JOBS=16",
        "BITPRESS_CUDA=1",
        "setup.py build --build-base",
        "-m bitpress selftest",
        "-m pytest -m gpu tests",
        "--timeout 60",  # pytest-timeout and pytest-xdist, where the env stage finds them
        "-n 4",
        "--tool memcheck",
        "--tool racecheck",
        "scripts/sanitizer_cases.py --device cuda --backends cuda",
        "PYTORCH_NO_CUDA_MEMORY_CACHING=1",
        "-m pytest bench -m gpu --benchmark-only",
    ):
        assert want in text, want
    md = (out / "report.md").read_text()
    assert "DRY RUN" in md
    names = [s.name for s in gc.stages(_ctx(tmp_path))]
    assert names == ["env", "build", "selftest", "gpu-tests", "memcheck", "racecheck", "bench"]
    # Under 9 minutes in all, inside the total budget, with time left for the device tool.
    assert sum(gc.BUDGETS.values()) <= gc.DEFAULT_TOTAL_BUDGET < 540


def test_gpu_tests_without_plugins(tmp_path):
    ctx = _ctx(tmp_path, env_info={"pytest_timeout": "missing (ModuleNotFoundError)"})
    cmd = gc._pytest_gpu(ctx)
    assert "--timeout" not in cmd and "-n" not in cmd
    ctx.env_info = {"pytest_timeout": "2.4.0", "xdist": "3.8.0"}
    cmd = gc._pytest_gpu(ctx)
    assert cmd[cmd.index("--timeout") + 1] == "60" and cmd[cmd.index("-n") + 1] == "4"


def test_cpu_plan_and_stage_choice(tmp_path, capsys):
    rc = gc.main(["--dry-run", "--cpu", "--out", str(tmp_path / "p"), "--stages", "build,selftest"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "BITPRESS_CUDA=0" in text and "TORCH_CUDA_ARCH_LIST" not in text
    assert "memcheck" not in text
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--stages", "nope", "--out", str(tmp_path / "q")])
    rc = gc.main(["--dry-run", "--cpu", "--out", str(tmp_path / "r"), "--stage-budget", "build=7"])
    assert rc == 0 and "| build | planned | 0.0 | 7 |" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--stage-budget", "build", "--out", str(tmp_path / "s")])


def test_makefile_targets():
    """`make gpu-check` uses the machine's python3 (no venv, no registry); `make test` adds the
    older-torch build only when asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("BITPRESS_SKIP_OLDER_TORCH", None)

    def dry(*args):
        return subprocess.run(
            ["make", "-n", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout

    gpu = dry("gpu-check", "GPU_CHECK_OUT=/tmp/x", "GPU_JOBS=16")
    assert "GPU_CHECK_OUT=/tmp/x python3 scripts/gpu_check.py --jobs 16" in gpu
    assert ".venv" not in gpu and "pip" not in gpu
    assert "gpu_check.py --cpu" in dry("test-older-torch", "OLDER_VENV=/nonexistent-venv")
    assert "gpu_check.py --cpu" in dry("test")
    assert "gpu_check.py" not in dry("test", "BITPRESS_SKIP_OLDER_TORCH=1")


# ----- the sanitizer cases, on the CPU ---------------------------------------------------------


def test_sanitizer_cases_cover_every_op_and_int4_gemm_regime():
    by_op = sc.cases()
    assert set(by_op) == set(registry.ops())
    assert all(by_op.values()), {k: len(v) for k, v in by_op.items()}
    names = [c.name for c in by_op["int4_gemm"]]

    def has(pred):
        return any(pred(dict(kv.split("=") for kv in n.split() if "=" in kv), n) for n in names)

    # split-K GEMV (M=1, >= 4 stages of 128 K-rows), 2 and 4 m16 tiles, dense fallback (M > 64),
    # float32 x (dense), act-order on the kernel and on the dense path.
    assert has(lambda d, n: d["M"] == "1" and int(d["K"]) >= 512)
    assert has(lambda d, n: 16 < int(d["M"]) <= 32)
    assert has(lambda d, n: 32 < int(d["M"]) <= 64)
    assert has(lambda d, n: int(d["M"]) > 64)
    assert has(lambda d, n: "float32" in n)
    assert has(lambda d, n: "act-order" in n and int(d["M"]) <= 64)
    assert has(lambda d, n: "act-order" in n and int(d["M"]) > 64)
    # Small: a sanitizer run multiplies the time of every kernel by 10 to 1000.
    assert all(c.size <= sc.DEFAULT_MAX_WORK for v in by_op.values() for c in v)


def test_sanitizer_cases_run_on_cpu(capsys):
    rc = sc.run(torch.device("cpu"), ["cpu"], max_work=2**16)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cases ok, 0 failed" in out
    for name in registry.ops():
        assert f"case {name} [cpu]" in out


def test_sanitizer_cases_fail_for_an_op_without_cases(monkeypatch, capsys):
    def fn(*args):
        raise AssertionError("not called")

    monkeypatch.setattr(registry, "_OPS", {"fake_op": OpSpec("fake_op", "fake", fn, fn)})
    rc = sc.run(torch.device("cpu"), ["cpu"], max_work=2**12)
    assert rc == 1
    assert "fake_op: no case ran" in capsys.readouterr().out
