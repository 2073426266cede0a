"""Fault injection against a real ``bentoml serve``: kill a worker, then the arbiter, under load.

``python bench/fault.py --artifacts artifacts/digits --workers 1,2 --kills 3`` starts the service for
each worker count on loopback, waits until every worker answers, and runs ``--clients`` threads of
``POST /classify`` on real photos (scikit-image's samples, plus ``--images DIR``). Each request uses a
fresh connection, so a request without an HTTP answer is one that the killed worker held. Per kill:

* the victim is SIGSTOPped, its established connections on the port are counted (``in_flight``:
  the requests it holds), then it is SIGKILLed;
* ``failed``: requests that got no HTTP answer; ``status_503``: 503 answers after the kill;
  ``wrong``: 200 answers whose top-1 differs from the same image's answer before the load;
* ``first_200_s``: from the kill to the first 200 of a request sent after it;
* ``all_ready_s``: from the kill until the restarted worker answers ``GET /model`` (it reports its
  pid), polled every 50 ms on fresh connections (with one worker: until it answers 200).

Then the arbiter is SIGKILLed and ``workers_gone_s`` is the time until no worker process is left
(``port_free``: the port can be bound again). The table goes to stdout, the rows to ``--json``.
tests/test_fault.py runs the same functions with bounds; the README's reliability section quotes
the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from bench.common import format_table, machine_header, machine_info, positive_ints, write_results  # noqa: E402
from bench.httpclient import encode_post  # noqa: E402

WORKER_MODULE = "_bentoml_impl.worker.service"  # BentoML 1.4's worker command line
POLL_S = 0.05


def request(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on a fresh connection (``Connection: close``): ``(status, body)``; raises OSError
    (reset, refused, closed without an answer) or TimeoutError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise ConnectionError("closed without an HTTP answer")
    return int(head[9:12]), body


def _close(raw: bytes) -> bytes:
    return raw.replace(b"Connection: keep-alive", b"Connection: close", 1)


def encode_get(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Server:
    """``bentoml serve serving.service:Classifier`` in a session of its own, on a free loopback port."""

    artifacts: Path
    workers: int
    workdir: Path
    env: dict = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    seen: set = field(default_factory=set)  # every worker pid ever found: stop() kills survivors

    def start(self) -> "Server":
        env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "BENTOML_DO_NOT_TRACK": "True",
                            "BENTOML_HOME": str(self.workdir / "bentoml"), "RESDEPLOY_ARTIFACTS": str(self.artifacts),
                            "RESDEPLOY_WORKERS": str(self.workers)} | self.env
        self.log = self.workdir / f"server-{self.workers}w.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--host", "127.0.0.1",
                 "--port", str(self.port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def worker_pids(self) -> set[int]:
        """The arbiter's worker processes (each in a session of its own: a process group misses them)."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        pids = set()
        for c in children:
            try:
                if WORKER_MODULE in " ".join(c.cmdline()):
                    pids.add(c.pid)
            except psutil.Error:
                continue
        self.seen |= pids
        return pids

    def model_pid(self, timeout: float = 2.0) -> int | None:
        """The pid of the worker that answered ``GET /model`` with 200, else None."""
        try:
            status, body = request(self.port, encode_get(self.port, "/model"), timeout)
        except OSError:
            return None
        return json.loads(body)["worker"]["pid"] if status == 200 else None

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until every worker has answered ``/model`` with 200."""
        t0 = time.monotonic()
        seen: set[int] = set()
        while len(seen) < self.workers:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{len(seen)} of {self.workers} workers ready after {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            if (pid := self.model_pid()) is not None:
                seen.add(pid)
            else:
                time.sleep(POLL_S)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is None:
            return
        workers = self.worker_pids() | self.seen
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        import psutil

        for pid in workers:  # never leave a worker behind, whatever the product does
            try:
                proc = psutil.Process(pid)
                if WORKER_MODULE in " ".join(proc.cmdline()):  # not a recycled pid
                    proc.kill()
            except psutil.Error:
                pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Load:
    """``clients`` threads sending ``POST /classify`` round-robin over ``bodies`` until stopped."""

    def __init__(self, port: int, bodies: list[bytes], clients: int):
        self.port, self.bodies, self.stop_event = port, bodies, threading.Event()
        self.records: list[tuple[float, float, int | None, int, bytes]] = []  # t0, t1, status, image, body
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        n = i
        while not self.stop_event.is_set():
            image = n % len(self.bodies)
            t0 = time.monotonic()
            try:
                status, body = request(self.port, self.bodies[image])
            except OSError:
                status, body = None, b""
            with self.lock:
                self.records.append((t0, time.monotonic(), status, image, body))
            n += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=60)


def established(pid: int, port: int) -> int:
    """Established TCP connections of ``pid`` on the server's ``port``: the requests it holds."""
    import psutil

    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)


def kill_worker(server: Server, load: Load, expected: list[int], after_s: float = 2.0,
                ready_timeout: float = 120.0) -> dict:
    """SIGKILL one worker under ``load``; see the module docstring for the fields."""
    before = server.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGSTOP)
    in_flight = established(victim, server.port)
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    n_before = len(load.records)
    ready_s = None
    while time.monotonic() - t_kill < ready_timeout:
        pid = server.model_pid()
        if pid is not None and pid not in before:
            ready_s = time.monotonic() - t_kill
            break
        time.sleep(POLL_S)
    time.sleep(after_s)
    with load.lock:
        records = load.records[n_before:] + [r for r in load.records[:n_before] if r[1] >= t_kill]
    failed = sum(1 for r in records if r[2] is None)
    statuses: dict[str, int] = {}
    for r in records:
        if r[2] is not None:
            statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    wrong = sum(1 for r in records if r[2] == 200 and json.loads(r[4])["top1"]["index"] != expected[r[3]])
    ok_after = [r[1] for r in records if r[2] == 200 and r[0] >= t_kill]
    return {"workers": server.workers, "in_flight": in_flight, "failed": failed,
            "status_503": statuses.get("503", 0), "statuses": statuses, "wrong": wrong,
            "requests": len(records), "first_200_s": round(min(ok_after) - t_kill, 3) if ok_after else None,
            "all_ready_s": round(ready_s, 3) if ready_s is not None else None}


def kill_arbiter(server: Server, timeout: float = 30.0) -> dict:
    """SIGKILL the arbiter; seconds until none of its workers is left, and whether the port is free."""
    import psutil

    workers = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    t0 = time.monotonic()
    alive = set(workers)
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # also when it exits between two calls
            return False

    while alive and time.monotonic() - t0 < timeout:
        alive = {p for p in alive if running(p)}
        time.sleep(POLL_S)
    gone_s = time.monotonic() - t0 if not alive else None
    return {"workers": server.workers, "worker_pids": len(workers), "survivors": len(alive),
            "workers_gone_s": round(gone_s, 3) if gone_s is not None else None, "port_free": port_free(server.port)}


def bodies_and_answers(port: int, images: list[tuple[str, bytes, str]]) -> tuple[list[bytes], list[int]]:
    """Encoded ``/classify`` requests and each image's top-1 on an idle server."""
    url = f"http://127.0.0.1:{port}"
    bodies = [_close(encode_post(url, "/classify", {"image": (n, data, mime)}, {})) for n, data, mime in images]
    answers = []
    for raw in bodies:
        status, body = request(port, raw)
        if status != 200:
            raise RuntimeError(f"/classify answered {status} before any fault: {body[:300]!r}")
        answers.append(json.loads(body)["top1"]["index"])
    return bodies, answers


def real_images(directory: str | None) -> list[tuple[str, bytes, str]]:
    from bench.load import make_images

    return make_images(0, 0, 0, directory, photos=True)


def run(artifacts: Path, workers: int, kills: int, clients: int, warm_s: float, workdir: Path,
        images: list) -> tuple[list[dict], dict, float]:
    """Worker kills and one arbiter kill for one worker count: ``(kill rows, arbiter row, cold start s)``."""
    server = Server(artifacts, workers, workdir).start()
    try:
        cold_s = server.wait_ready()
        bodies, answers = bodies_and_answers(server.port, images)
        rows = []
        with Load(server.port, bodies, clients) as load:
            for _ in range(kills):
                time.sleep(warm_s)
                rows.append(kill_worker(server, load, answers))
                server.wait_ready()
        return rows, kill_arbiter(server), cold_s
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/fault.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts/digits", help="artifact directory to serve")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    p.add_argument("--kills", type=int, default=3, help="worker kills per worker count (default 3)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--warm-s", type=float, default=3.0, help="load before each kill, seconds (default 3)")
    p.add_argument("--images", help="also send the image files of this folder")
    p.add_argument("--json", default="bench/results/fault.json", help="where the rows go")
    args = p.parse_args(argv)
    levels = positive_ints(args.workers)
    if levels is None or args.kills < 1 or args.clients < 1:
        p.error(f"--workers {args.workers!r}, --kills {args.kills}, --clients {args.clients}: use positive integers")
    if not (Path(args.artifacts) / "manifest.json").is_file():
        p.error(f"--artifacts {args.artifacts}: no manifest.json there; run `make demo` first")
    info = machine_info()
    print(machine_header(info))
    images = real_images(args.images)
    rows, arbiter_rows = [], []
    with tempfile.TemporaryDirectory(prefix="resdeploy-fault-") as tmp:
        for w in levels:
            kill_rows, arbiter, cold_s = run(Path(args.artifacts), w, args.kills, args.clients, args.warm_s,
                                             Path(tmp), images)
            for r in kill_rows:
                r["cold_start_s"] = round(cold_s, 3)
            rows += kill_rows
            arbiter_rows.append(arbiter)
    print(format_table(rows, ["workers", "requests", "in_flight", "failed", "status_503", "wrong", "first_200_s",
                              "all_ready_s", "cold_start_s"]))
    print()
    print(format_table(arbiter_rows, ["workers", "worker_pids", "survivors", "workers_gone_s", "port_free"]))
    write_results(rows + [dict(r, kind="arbiter_kill") for r in arbiter_rows], args.json, None,
                  meta={"artifacts": args.artifacts, "clients": args.clients, "kills": args.kills,
                        "images": [n for n, _, _ in images]}, machine=info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
