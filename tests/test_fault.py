"""Fault injection on a real ``bentoml serve`` with two workers (issue #22), through bench/fault.py.

* A worker SIGKILLed under load costs at most the requests it held: every other request is answered
  200 with the same top-1 as before the fault, none 503 (its replacement loads its model before it
  accepts a connection), and the replacement is ready within a bound.
* A SIGKILLed arbiter leaves no worker behind, and the port is free again.
* A model that fails to load still gets answered (503 naming the failure), not a hanging socket.

Every server runs on loopback in a session of its own and is torn down, workers included, whatever
happens; every loop is bounded in time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.fault import Load, Server, bodies_and_answers, encode_get, kill_arbiter, kill_worker, real_images, request
from core.parent import GRACE_S, POLL_S

CLIENTS = 8
READY_BOUND_S = 90  # a fresh worker imports BentoML and loads the model: ~10 s idle, more on 2 busy cores
LEAVE_BOUND_S = GRACE_S + POLL_S + 5  # core/parent.py's promise, plus scheduling slack
# A warm-up of ~3 s on 2 cores: a replacement that accepted before its model was ready would answer
# some of the 8 clients' requests 503 in that window (seen: 0-2 503s per kill with the default warm-up,
# too short a window to catch the bug every time).
SLOW_WARMUP = {"RESDEPLOY_WARMUP_ITERS": "100"}


@pytest.fixture(scope="module")
def images():
    return real_images(None)  # scikit-image's sample photos as JPEG: real decoding work


def test_a_killed_worker_costs_only_its_in_flight_requests(digits_artifacts: Path, tmp_path: Path, images):
    with Server(digits_artifacts, 2, tmp_path, env=SLOW_WARMUP) as server:
        server.wait_ready()
        bodies, answers = bodies_and_answers(server.port, images)
        with Load(server.port, bodies, CLIENTS) as load:
            time.sleep(2)
            row = kill_worker(server, load, answers, after_s=2, ready_timeout=READY_BOUND_S)
        print(row)
        assert row["all_ready_s"] is not None, f"no replacement worker answered within {READY_BOUND_S} s:\n" \
                                               f"{server.log_tail()}"
        assert row["in_flight"] <= CLIENTS  # each client holds one request at a time
        assert row["failed"] <= row["in_flight"], row
        assert row["statuses"] == {"200": row["requests"] - row["failed"]}, row  # no 503, no other status
        assert row["wrong"] == 0, row
        assert row["first_200_s"] is not None and row["first_200_s"] < row["all_ready_s"] + 1, row
        assert len(server.worker_pids()) == 2


def test_workers_leave_when_the_arbiter_is_killed(digits_artifacts: Path, tmp_path: Path, images):
    with Server(digits_artifacts, 2, tmp_path) as server:
        server.wait_ready()
        assert len(server.worker_pids()) == 2  # found before the kill: they run in sessions of their own
        with Load(server.port, bodies_and_answers(server.port, images)[0], 2):
            time.sleep(1)
            row = kill_arbiter(server, timeout=LEAVE_BOUND_S)
    assert row["worker_pids"] == 2 and row["survivors"] == 0, row
    assert row["workers_gone_s"] <= LEAVE_BOUND_S and row["port_free"], row


def test_two_workers_whose_model_fails_to_load_still_answer(digits_artifacts: Path, tmp_path: Path):
    """Workers that wait for their model before accepting must accept once the load has failed."""
    art = tmp_path / "art"
    shutil.copytree(digits_artifacts, art)
    with open(art / "model.fp32.onnx", "ab") as f:
        f.write(b"tampered")
    with Server(art, 2, tmp_path) as server:
        deadline = time.monotonic() + READY_BOUND_S
        while True:
            assert server.proc.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, f"no answer in {READY_BOUND_S} s:\n{server.log_tail()}"
            try:
                status, body = request(server.port, encode_get(server.port, "/model"), timeout=5)
                break
            except OSError:  # refused before the arbiter binds; timeout while the workers load
                time.sleep(0.2)
        assert status == 503 and b"model failed to load" in body and b"sha256" in body, body
        assert request(server.port, encode_get(server.port, "/livez"))[0] == 200
