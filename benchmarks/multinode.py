"""A real two-node Ray cluster on one machine: placement, bit-for-bit equality, node loss.

Starts a Ray head and a second node with `ray start --address` (each its own temp dir, ports
and `--num-cpus 1`, bound to 127.0.0.1), runs `sophon-ray protect PIPELINE --workers 2
--ray-address ...` through the CLI with one worker per node (placement forced by resources: 1
CPU per node, 1 CPU per worker), and compares the protected weights (the sha256 of
`model.safetensors` in the model card) with the same protection on one 2-CPU node (a local
instance the CLI starts itself). Then the node-loss case: the second node's process session is
SIGKILLed by session (raylet, agents, its Train worker; `ray stop` would stop every Ray here)
once the run has written a checkpoint, a replacement node joins, and Ray Train's FailureConfig
restarts the worker group from the last checkpoint; the run must finish with the full iteration
count and a valid model. Recovery time is measured from the kill to the first progress line the
restarted worker group writes.

Other Ray instances on the machine are left alone: every port is chosen free, the temp dirs
are our own (short, under /tmp: Ray's socket paths must stay under 107 bytes), and cleanup kills
only the process sessions this script started.

Usage:
    .venv/bin/python benchmarks/multinode.py        # digits --smoke, 30 iterations: ~5.5 min on a busy 2-core machine
    .venv/bin/python benchmarks/multinode.py --iterations 40 --kill-after 2 --replace-delay 10

Prints a table, then (last line of stdout) one JSON object with every number.
Progress goes to stderr. tests/test_multinode.py runs the same scenarios with assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

BIN = Path(sys.executable).parent
QUIET = {
    "RAY_AUTH_MODE": "disabled",  # a single-machine test cluster, as tests/test_e2e.py (cluster/README.md)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep nodes (and the driver) on 127.0.0.1 (ray_local.py)
    "OMP_NUM_THREADS": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}
# `ray start` for a second node refuses to run while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with
# it on, Ray resolves 127.0.0.1 to the machine's external IP. This launcher lets one `ray start`
# process pass that check while every address stays as given (127.0.0.1); the processes it
# starts inherit the variable (0) and so also stay on the loopback address.
LOOPBACK_RAY_START = (
    "import sys; from ray._private import ray_constants, services; "
    "ray_constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)
NODE_PORT_FLAGS = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                   "--runtime-env-agent-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]


def log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # our own cluster's, never another instance's
        env.pop(k, None)
    return env


class LocalCluster:
    """Ray nodes of our own on this machine, each `ray start --block` in its own process session,
    so one node can be killed as a group without touching any other Ray here."""

    def __init__(self, root: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="srmn-", dir="/tmp")) if root is None else root
        self.env = base_env()
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port: int | None = None
        self.address: str | None = None

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        temp = self.root / name  # per-node temp dir (Ray allows it per node)
        temp.mkdir(parents=True, exist_ok=True)
        own = [x for flag in NODE_PORT_FLAGS for x in (flag, str(free_port()))]
        cmd = [sys.executable, "-c", LOOPBACK_RAY_START, "start", "--block", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(temp), "--disable-usage-stats", "--object-store-memory", str(200 * 2**20), *own, *args]
        with open(self.root / f"{name}.log", "w") as logf:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = proc
        return proc

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None, timeout: float = 90) -> str:
        """Start the head; returns its GCS address `127.0.0.1:port` once it runs."""
        self.port = free_port()
        args = ["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port())]
        if resources:
            args += ["--resources", json.dumps(resources)]
        self._start("head", args)
        self.address = f"127.0.0.1:{self.port}"
        self._wait(lambda: self._started("head"), "the head", timeout)
        return self.address

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 timeout: float = 90) -> float:
        """Join a worker node; returns the seconds until its `ray start` reported it running
        (its raylet registered with the head's GCS)."""
        assert self.address, "start_head first"
        t = time.perf_counter()
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        if resources:
            args += ["--resources", json.dumps(resources)]
        self._start(name, args)
        self._wait(lambda: self._started(name), f"node {name} to join", timeout)
        return time.perf_counter() - t

    def _started(self, name: str) -> bool:
        """`ray start` prints this once the node's raylet has registered (read from its log: no
        `ray status` process, which costs seconds of CPU on a busy 2-core machine)."""
        try:
            return "Ray runtime started" in (self.root / f"{name}.log").read_text()
        except OSError:
            return False

    def kill_node(self, name: str) -> None:
        """SIGKILL one node's whole session (its raylet, agents and workers), as a lost machine."""
        proc = self.nodes.pop(name)
        self._signal_session(proc.pid, signal.SIGKILL)
        proc.wait()

    @staticmethod
    def _signal_session(sid: int, sig: int) -> None:
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _wait(self, ok: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            dead = [n for n, p in self.nodes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray node(s) {dead} exited; see {self.root}/*.log")
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout} s for {what}; see {self.root}/*.log")

    def train_workers(self, name: str) -> int:
        """How many Ray Train worker processes run in this node's session now."""
        n = 0
        for pid in _session_pids(self.nodes[name].pid):
            with contextlib.suppress(OSError):
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    n += 1
        return n

    def stop(self, keep: bool = False) -> None:
        """Kill every node this object started (TERM, then KILL), and remove its temp dirs
        (`keep`: leave them, logs included, for a post-mortem)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.nodes.values():
                self._signal_session(p.pid, sig)
            deadline = time.time() + 8
            while time.time() < deadline and any(_session_pids(p.pid) for p in self.nodes.values()):
                time.sleep(0.2)
        for p in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.nodes.clear()
        _remove_address_file(self.port)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _session_pids(sid: int) -> set[int]:
    """PIDs of the live processes in session `sid` (a node's `ray start --block` was started in a
    session of its own: its raylet, agents and the workers the raylet spawned; each worker has a
    process group of its own, so killing the group alone would leave them running)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.add(int(d.name))
    return pids


def _remove_address_file(port: int | None) -> None:
    """A killed head leaves Ray's address file behind (see tests/test_e2e.py); drop it if it is ours."""
    f = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if port and f.read_text().strip().endswith(f":{port}"):
            f.unlink()


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    c = LocalCluster()
    ok = False
    try:
        yield c
        ok = True
    finally:
        c.stop(keep=not ok)
        if not ok:
            log(f"node logs kept in {c.root}")


def sophon(args: list[str], env: dict[str, str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the `sophon-ray` console script."""
    return subprocess.run([str(BIN / "sophon-ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def protect_args(pipeline: str, source: Path, out: Path, storage: Path, iterations: int,
                 address: str | None) -> list[str]:
    a = ["protect", pipeline, "--smoke", "--source", str(source), "--out", str(out), "--workers", "2",
         "--storage-path", str(storage), "--set", f"protect.iterations={iterations}", "--force"]
    return a + (["--ray-address", address] if address else [])


def model_sha(out: Path) -> str:
    card = json.loads((out / "model.json").read_text())
    return card["sha256"]


def file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def progress_file(storage: Path) -> Path | None:
    found = sorted(storage.glob("protect-*/progress.jsonl"))
    return found[0] if found else None


def progress_lines(storage: Path) -> list[dict]:
    p = progress_file(storage)
    if p is None or not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def registered_checkpoint(storage: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (its checkpoint manager snapshot
    names a latest checkpoint; a `checkpoint_*` folder alone can still be in flight, and a run
    restarted then begins again at iteration 0)."""
    for snap in storage.glob("protect-*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return True
    return False


def pretrain(pipeline: str, root: Path, env: dict[str, str]) -> Path:
    src = root / "source"
    r = sophon(["pretrain", pipeline, "--smoke", "--out", str(src)], env)
    if r.returncode != 0:
        raise RuntimeError(f"pretrain failed: {r.stderr[-2000:]}")
    return src


def run_single(pipeline: str, src: Path, root: Path, env: dict[str, str], iterations: int) -> dict:
    """`--workers 2` on one node: the local 2-CPU instance the CLI starts itself."""
    out, storage = root / "single", root / "single-storage"
    t = time.perf_counter()
    r = sophon(protect_args(pipeline, src, out, storage, iterations, None), env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"single-node protect failed: {r.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "sha256": model_sha(out), "out": str(out),
            "metrics": json.loads((out / "metrics.json").read_text())}


def run_two_nodes(cluster: LocalCluster, pipeline: str, src: Path, root: Path, iterations: int) -> dict:
    """`--workers 2` on head + node2 (1 CPU each): one worker per node."""
    out, storage = root / "two", root / "two-storage"
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "sophon-ray"), *protect_args(pipeline, src, out, storage, iterations,
                                                                     cluster.address)],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = {"head": 0, "node2": 0}
    while proc.poll() is None:  # sample where the Train workers run (OS process sessions)
        for name in seen:
            seen[name] = max(seen[name], cluster.train_workers(name))
        time.sleep(0.3)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"two-node protect failed (rc {proc.returncode}): {stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "sha256": model_sha(out), "out": str(out), "train_workers_seen": seen,
            "metrics": json.loads((out / "metrics.json").read_text())}


def _restart_index(lines: list[dict]) -> int | None:
    """Index of the first progress line of a restarted worker group: its loop clock (`seconds`,
    from the worker's loop start) went back."""
    for i in range(1, len(lines)):
        if lines[i]["seconds"] < lines[i - 1]["seconds"]:
            return i
    return None


def run_node_loss(cluster: LocalCluster, pipeline: str, src: Path, root: Path, iterations: int,
                  kill_after: int, replace_delay: float) -> dict:
    """Kill node2 once Ray Train has registered a checkpoint and iteration `kill_after` was
    reported, join a replacement node, and let Ray Train recover from the checkpoint.

    Returns (besides the run's figures) recovery_s: from the kill to the first iteration the
    restarted worker group completed; restart_after_capacity_s: the same from the moment the
    replacement node was listed as active."""
    out, storage = root / "loss", root / "loss-storage"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "sophon-ray"), *protect_args(pipeline, src, out, storage, iterations,
                                                                     cluster.address)],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res: dict = {}
    stderr = ""
    t_resumed = None
    try:
        while proc.poll() is None:
            lines = progress_lines(storage)
            if (lines and lines[-1]["iteration"] >= kill_after and registered_checkpoint(storage)
                    and cluster.train_workers("node2") > 0):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"run ended before the kill: {proc.communicate()[1][-3000:]}")
        res["killed_at_iteration"] = progress_lines(storage)[-1]["iteration"]
        t_kill = time.perf_counter()
        cluster.kill_node("node2")
        log(f"killed node2 at iteration {res['killed_at_iteration']}")
        time.sleep(replace_delay)
        res["replacement_join_s"] = round(cluster.add_node("node3", num_cpus=1), 2)
        t_capacity = time.perf_counter()
        log(f"replacement node3 joined ({res['replacement_join_s']} s after the kill)")
        while proc.poll() is None and t_resumed is None:
            if _restart_index(progress_lines(storage)) is not None:
                t_resumed = time.perf_counter()
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"node-loss protect failed (rc {proc.returncode}): {stderr[-3000:]}")
    lines = progress_lines(storage)
    i = _restart_index(lines)
    if t_resumed is None and i is not None:
        t_resumed = time.perf_counter()  # the run finished between two polls: an upper bound
    res.update(
        wall_s=round(wall, 2), sha256=model_sha(out), out=str(out), reported_iterations=[m["iteration"] for m in lines],
        resumed_from_iteration=lines[i]["iteration"] - 1 if i is not None else None,
        recovery_s=round(t_resumed - t_kill, 2) if t_resumed else None,
        restart_after_capacity_s=round(t_resumed - t_capacity, 2) if t_resumed else None,
        metrics=json.loads((out / "metrics.json").read_text()),
        safetensors_sha_ok=file_sha(out / "model.safetensors") == model_sha(out),
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="digits")
    p.add_argument("--iterations", type=int, default=30, help="protect.iterations (with --smoke)")
    p.add_argument("--kill-after", type=int, default=0,
                   help="kill node2 once this iteration was reported (default: the first checkpoint's)")
    p.add_argument("--replace-delay", type=float, default=0.0, help="seconds between the kill and the replacement")
    p.add_argument("--skip-loss", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="srmn-work-"))
    env = base_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    summary: dict = {"benchmark": "multinode", "pipeline": args.pipeline, "iterations": args.iterations,
                     "cpus_per_node": 1, "workers": 2, "date": time.strftime("%Y-%m-%d")}
    try:
        log("pretrain source")
        src = pretrain(args.pipeline, work, env)
        log("single node (local 2-CPU instance)")
        single = run_single(args.pipeline, src, work, env, args.iterations)
        with local_cluster() as cluster:
            t = time.perf_counter()
            cluster.start_head(num_cpus=1)
            summary["head_start_s"] = round(time.perf_counter() - t, 2)
            summary["node_join_s"] = round(cluster.add_node("node2", num_cpus=1), 2)
            cluster.env["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
            log(f"two nodes up at {cluster.address}")
            two = run_two_nodes(cluster, args.pipeline, src, work, args.iterations)
            loss = None
            if not args.skip_loss:
                kill_after = args.kill_after or max(args.iterations // 10, 1)
                loss = run_node_loss(cluster, args.pipeline, src, work, args.iterations, kill_after,
                                     args.replace_delay)
        from sophon_ray.train.driver import timings_of

        loop = lambda r: timings_of(r["out"]).get("loop")  # noqa: E731
        summary.update(
            single_node={"wall_s": single["wall_s"], "sha256": single["sha256"], "loop_s": loop(single)},
            two_nodes={"wall_s": two["wall_s"], "sha256": two["sha256"], "loop_s": loop(two),
                       "train_workers_seen": two["train_workers_seen"]},
            bit_for_bit=single["sha256"] == two["sha256"],
        )
        if loss:
            summary["node_loss"] = {k: v for k, v in loss.items() if k not in ("out", "metrics")} | {
                "iterations": loss["metrics"]["iterations"],
                "equals_uninterrupted": loss["sha256"] == two["sha256"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'run':<28} {'wall s':>8} {'loop s':>8}  sha256")
    for label, key in (("single node, 2 workers", "single_node"), ("two nodes, 1 worker each", "two_nodes")):
        r = summary[key]
        print(f"{label:<28} {r['wall_s']:>8.2f} {r['loop_s'] or float('nan'):>8.2f}  {r['sha256'][:16]}")
    if "node_loss" in summary:
        nl = summary["node_loss"]
        print(f"{'two nodes, node2 killed':<28} {nl['wall_s']:>8.2f} {'':>8}  {nl['sha256'][:16]}  "
              f"(killed at {nl['killed_at_iteration']}, resumed from {nl['resumed_from_iteration']}, "
              f"recovery {nl['recovery_s']} s, {nl['restart_after_capacity_s']} s after the replacement joined)")
    print(f"bit for bit: {summary['bit_for_bit']}")
    print(json.dumps(summary))
    return 0 if summary["bit_for_bit"] and summary.get("node_loss", {}).get("equals_uninterrupted", True) else 1


if __name__ == "__main__":
    sys.exit(main())
