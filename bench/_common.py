"""Helpers shared by the bench/ scripts: environment facts, timing, ORT latency, isolated
subprocess measurement (wall time + peak RSS), markdown tables and README sections.

Isolated measurement
--------------------
A benchmark script that wants to measure one job in a fresh interpreter (so the peak RSS is
that job's alone) calls :func:`run_child` with the path of a script and a JSON-able task. The
script must call :func:`child_main` when started with ``--child TASK.json RESULT.json``::

    if __name__ == "__main__":
        if len(sys.argv) > 1 and sys.argv[1] == "--child":
            child_main(HANDLERS)          # HANDLERS: {"kind": fn(task) -> dict}
        else:
            main()

The peak RSS is the child's own ``VmHWM`` (``/proc/self/status``), read by the child when its
job is done. ``ru_maxrss`` is NOT usable for this on Linux: whether from ``RUSAGE_CHILDREN``
(the maximum over *all* children reaped so far) or from ``os.wait4`` for one child, it includes
the high-water mark of the address space the child had before ``exec``, i.e. the parent's RSS at
spawn time (a 400 MB parent makes a 10 MB ``python -c`` child report 420 MB). The parent still
records ``wait4``'s ``ru_maxrss`` (``ChildResult.ru_maxrss_mb``) and falls back to it only where
``/proc`` is missing. Nothing is subtracted: to see what a job adds, run a baseline task that only
does the imports and loading.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Environment facts
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nproc() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def versions(*modules: str) -> dict[str, str]:
    """``{module: __version__}`` for the importable ones (``python`` is always included)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


def git_revision(repo: str | os.PathLike[str] = REPO) -> str:
    """Short HEAD commit of ``repo``, with '+ uncommitted changes' when the tree is dirty."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def environment_line(modules: Sequence[str]) -> str:
    """One markdown line: date, versions, machine."""
    v = versions(*modules)
    parts = ", ".join(f"{k} {val}" for k, val in v.items())
    today = _dt.date.today().isoformat()
    return (
        f"Measured {today} at commit {git_revision()}; {parts}; {nproc()} CPUs (`nproc`), {cpu_model()}, "
        f"{mem_total_gb():.0f} GB RAM, {platform.system()} {platform.machine()}."
    )


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all timings) of ``runs`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def as_proto(model: Any) -> Any:
    """A ModelProto from a ModelProto, serialized bytes or a path."""
    import onnx

    if hasattr(model, "SerializeToString"):
        return model
    return onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))


def ort_session(
    model: str | os.PathLike[str] | bytes | Any,
    threads: int = 1,
    level: str = "all",
    config: Mapping[str, str] | None = None,
):  # -> onnxruntime.InferenceSession
    """``onnxcomp.model_io.ort_session`` for a model given as a path, bytes or ModelProto."""
    from onnxcomp.runtime import ort_session as session

    return session(as_proto(model), level=level, threads=threads, config=dict(config or {}))


def interleaved_latency_ms(
    models: Sequence[Any],
    feeds: Mapping[str, Any],
    threads: int = 1,
    runs: int = 20,
    warmup: int = 5,
    level: str = "all",
) -> list[float]:
    """Median ``session.run`` time (ms) of each model, measured round-robin.

    Each of the ``runs`` rounds runs every model once, so a burst of load from other processes
    on a shared machine hits all models alike instead of whichever was being timed.
    """
    sessions = [ort_session(m, threads=threads, level=level) for m in models]
    feeds = dict(feeds)
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def load_average() -> str:
    """The 1-minute load average, e.g. '2.9', or '?' where unavailable."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# Isolated subprocess measurement
# --------------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    """What one child reported, plus what the parent measured about it."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float = float("nan")  # the child's VmHWM (MiB); ru_maxrss only without /proc
    ru_maxrss_mb: float = float("nan")  # os.wait4's ru_maxrss: includes the parent's RSS at spawn
    wall_s: float = float("nan")  # parent-side wall time, interpreter start to exit
    returncode: int = 0
    error: str = ""  # last line of the child's error, when not ok

    @property
    def hwm_mb(self) -> float:
        """The child's own VmHWM reading (MiB), NaN if it did not report one."""
        return float(self.result.get("_vm_hwm_mb", float("nan")))


def vm_hwm_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB, NaN when /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_child(
    script: str | os.PathLike[str],
    task: Mapping[str, Any],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    python: str = sys.executable,
) -> ChildResult:
    """Run ``python script --child TASK.json RESULT.json`` in a fresh process; measure its peak RSS.

    ``cwd`` defaults to a fresh temporary directory (removed afterwards), so whatever the job
    writes to its working directory stays out of the repository. ``env`` entries are added to
    the current environment. A child that outlives ``timeout`` seconds is killed (its process
    group) and reported as not ok.
    """
    import shutil

    own_cwd = cwd is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-child-")) if own_cwd else Path(cwd)
    task_path = workdir / "_task.json"
    result_path = workdir / "_result.json"
    task_path.write_text(json.dumps(dict(task)))
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [python, str(Path(script).resolve()), "--child", str(task_path), str(result_path)],
        cwd=workdir,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    stderr_chunks: list[bytes] = []
    import threading

    def _drain() -> None:  # keep the pipe from filling up (ORT's quantizer is chatty)
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read(65536), b""):
            stderr_chunks.append(chunk)
            if len(stderr_chunks) > 64:
                del stderr_chunks[:32]

    reader = threading.Thread(target=_drain, daemon=True)
    reader.start()
    status, rusage, timed_out = 0, None, False
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.perf_counter() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
    reader.join(timeout=5)
    ru_peak = rusage.ru_maxrss / 1024 if rusage is not None else float("nan")  # KiB on Linux
    out = ChildResult(ok=False, peak_rss_mb=ru_peak, ru_maxrss_mb=ru_peak, wall_s=wall, returncode=proc.returncode)
    try:
        if result_path.exists():
            data = json.loads(result_path.read_text())
            out.result = data
            hwm = float(data.get("_vm_hwm_mb", float("nan")))
            if hwm == hwm:
                out.peak_rss_mb = hwm
            out.ok = bool(data.get("_ok")) and proc.returncode == 0 and not timed_out
            out.error = data.get("_error", "")
        if timed_out:
            out.error = f"timed out after {timeout:.0f} s"
        elif not out.ok and not out.error:
            tail = b"".join(stderr_chunks).decode(errors="replace").strip().splitlines()
            out.error = tail[-1] if tail else f"exit code {proc.returncode}"
    finally:
        if own_cwd:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def child_main(handlers: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Entry point of a child started by :func:`run_child`: run ``handlers[task["kind"]](task)``.

    Writes the handler's dict plus ``_ok``, ``_error`` and ``_vm_hwm_mb`` to the result file.
    """
    task_path, result_path = Path(sys.argv[2]), Path(sys.argv[3])
    task = json.loads(task_path.read_text())
    try:
        result = dict(handlers[task["kind"]](task))
        result["_ok"] = True
    except BaseException as exc:  # noqa: BLE001 - report every failure to the parent
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        result = {"_ok": False, "_error": f"{type(exc).__name__}: {first}"}
    result["_vm_hwm_mb"] = vm_hwm_mb()
    result_path.write_text(json.dumps(result, default=float))
    sys.stdout.flush()
    os._exit(0 if result["_ok"] else 1)  # skip interpreter teardown: it is not part of any job


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as '-', the rest as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def char_accuracy(pred: list[str], ref: list[str]) -> float:
    """Character accuracy in percent: 1 - sum(edit distance) / sum(len(ref))."""
    dist = total = 0
    for p, r in zip(pred, ref, strict=True):
        prev = list(range(len(p) + 1))
        for i, rc in enumerate(r, 1):
            cur = [i]
            for j, pc in enumerate(p, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rc != pc)))
            prev = cur
        dist += prev[-1]
        total += len(r)
    return 100.0 * (1.0 - dist / max(total, 1))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column: l (default) or r."""
    align = align or "l" * len(headers)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)


def write_readme_section(readme: str | os.PathLike[str], heading: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the ``heading`` section (up to the next heading of the same or a higher level) of
    ``readme`` with ``heading`` + ``body``; append it if missing; create the file if needed.

    Every other section is kept byte for byte. The write is atomic (temp file + rename).
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    level = len(heading) - len(heading.lstrip("#"))
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n").rstrip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = len(lines)
        pattern = re.compile(rf"^(#{{1,{level}}})\s")
        in_fence = False
        for j in range(start + 1, len(lines)):
            if lines[j].lstrip().startswith("```"):
                in_fence = not in_fence  # a '# comment' inside a code block is no heading
            elif not in_fence and pattern.match(lines[j]):
                end = j
                break
        before = "".join(lines[:start])
        after = "".join(lines[end:])
        new = before + section + ("\n" + after if after else "")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# ORT optimized graphs and latency distributions (added for bench/latency.py)
# --------------------------------------------------------------------------------------------


def ort_optimized_model(
    model: str | os.PathLike[str] | bytes | Any, level: str = "all", config: Mapping[str, str] | None = None
) -> Any:  # -> onnx.ModelProto
    """The graph onnxruntime's CPU provider actually runs: the model after ORT's graph optimizations
    at ``level`` (disable | basic | extended | all), saved through ``optimized_model_filepath``.

    Plain onnxruntime (no onnxcomp import), so it shows ORT's own fusions and nothing else.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory(prefix="bench-ortopt-") as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        if isinstance(model, (str, os.PathLike)):
            ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        else:
            data = model if isinstance(model, bytes) else as_proto(model).SerializeToString()
            ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


@dataclass
class LatencyStats:
    """Per-run times (ms) of one session in an interleaved measurement."""

    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100, linear interpolation) of the run times."""
        if not self.times_ms:
            return float("nan")
        xs = sorted(self.times_ms)
        pos = (len(xs) - 1) * q / 100.0
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def p10(self) -> float:
        return self.percentile(10)


def interleaved_latency_stats(
    sessions: Sequence[Any],
    feeds: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    runs: int = 20,
    warmup: int = 3,
    budget_s: float | None = None,
    min_runs: int = 5,
) -> list[LatencyStats]:
    """``session.run`` times of every session, measured round-robin in ONE loop.

    ``sessions`` are ready onnxruntime sessions (e.g. one per model x thread count); ``feeds`` is
    one feed dict for all or one per session. Round ``i`` starts at session ``i mod n`` so no
    session always runs right after the same neighbour; a burst of load from other processes hits
    all sessions alike. Stops after ``runs`` rounds, or earlier (but after ``min_runs``) once
    ``budget_s`` seconds of timed rounds have passed.
    """
    n = len(sessions)
    per = [dict(f) for f in feeds] if isinstance(feeds, Sequence) else [dict(feeds)] * n
    for _ in range(warmup):
        for s, f in zip(sessions, per):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for i in range(runs):
        for k in range(n):
            j = (i + k) % n
            t0 = time.perf_counter()
            sessions[j].run(None, per[j])
            times[j].append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and i + 1 >= min_runs and time.perf_counter() - start > budget_s:
            break
    return [LatencyStats(t) for t in times]
