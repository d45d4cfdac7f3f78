"""``python -m cog.runtime`` starts the model's worker before it imports aiohttp, and the
supervisor adopts that process: everything it does with a worker it starts itself
(setup logs, crash and restart, a cancel that does not stop) works on the adopted one."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading

import aiohttp
import pytest

from cog.runtime import InferenceServer, ModelRef
from cog.runtime.worker_process import start_worker
from tests.test_runtime_predictions import (
    STUBBORN,
    cancel_a_stubborn_prediction,
    crash_and_wait_for_restart,
    eventually,
    model_dir,
)

WAIT = 20.0  # a bound for the test to give up, not a timing

SETUP_PRINTS = """
from cog import BasePredictor

class Predictor(BasePredictor):
    def setup(self):
        print("loading the weights")

    def predict(self) -> str:
        return "done"
"""


def run_until_listening(directory, *args):
    """Run ``python -X importtime -m cog.runtime`` until it listens; its stderr lines."""
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "cog.runtime", "--port", "0", *args],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        timer = threading.Timer(WAIT, process.kill)  # a bound, should it never listen
        timer.start()
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if "listening on" in line:
                break
        timer.cancel()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    return lines


def test_the_worker_starts_before_aiohttp_is_imported(tmp_path):
    directory = model_dir(tmp_path, SETUP_PRINTS)
    lines = run_until_listening(directory, "--host", "127.0.0.1")
    assert any("listening on" in line for line in lines), "\n".join(lines)
    # -X importtime writes a line as each module's import ends, to the same stderr as the
    # log: the worker's start must come before aiohttp's import (and its SSL contexts).
    started = next(i for i, line in enumerate(lines) if "started the model's worker" in line)
    aiohttp_modules = [i for i, line in enumerate(lines) if re.search(r"\|\s+aiohttp(\.|$)", line)]
    assert aiohttp_modules, "no import of aiohttp in:\n" + "\n".join(lines)
    assert started < aiohttp_modules[0]


def test_a_python_that_cannot_run_is_a_failed_setup(tmp_path):
    directory = model_dir(tmp_path, SETUP_PRINTS)
    missing = str(tmp_path / "no-python")
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1", "--port", "0"],
        cwd=directory,
        env={**os.environ, "COG_WORKER_PYTHON": missing},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in process.stderr:
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port = int(match[1])
                break
        assert port is not None

        async def ping():
            url = f"http://127.0.0.1:{port}/ping"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status, await response.json()

        status, body = asyncio.run(ping())
        assert status == 503
        assert body["status"] == "failed"
        assert body["error"].startswith(f"cannot start {missing}: [Errno 2]")
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


async def adopted(aiohttp_client, directory, **settings):
    """A server in this process that adopts a worker started as ``python -m cog.runtime``
    starts it."""
    model = ModelRef.from_directory(str(directory))
    started = start_worker(
        sys.executable, model.reference, directory=model.directory, concurrency=1
    )
    server = InferenceServer(model, started=started, **settings)
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    assert server.runner._process.pid == started.process.pid  # adopted, not started again
    return server, client


def waiters():
    return [t.name for t in threading.enumerate() if t.name.startswith("wait-worker-")]


async def no_waiters():
    return not waiters()


async def test_an_adopted_worker_gives_its_setup_logs(aiohttp_client, tmp_path):
    _, client = await adopted(aiohttp_client, model_dir(tmp_path, SETUP_PRINTS))
    body = await (await client.get("/health-check")).json()
    assert body["status"] == "READY"
    assert "loading the weights\n" in body["setup"]["logs"]
    assert body["setup"]["started_at"] < body["setup"]["completed_at"]
    response = await client.post("/predictions", json={"input": {}})
    assert (await response.json())["output"] == "done"


async def test_an_adopted_worker_that_crashes_is_started_again(aiohttp_client, tmp_path):
    server, client = await adopted(aiohttp_client, model_dir(tmp_path, STUBBORN))
    pid = server.runner._process.pid
    assert f"wait-worker-{pid}" in waiters()
    assert await crash_and_wait_for_restart(client) != f"pid {pid}"
    # The new worker is asyncio's own; the thread that waited for the adopted one is done.
    await eventually(no_waiters, "the thread that waited for it to end")


async def test_an_adopted_worker_that_ignores_cancel_is_killed_and_started_again(
    aiohttp_client, tmp_path
):
    server, client = await adopted(aiohttp_client, model_dir(tmp_path, STUBBORN), cancel_grace=0.5)
    pid = server.runner._process.pid
    await cancel_a_stubborn_prediction(client)

    async def ready():
        return (await (await client.get("/health-check")).json())["status"] == "READY"

    await eventually(ready, "the worker to be started again")
    assert server.runner._process.pid != pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed, and reaped by the thread that waited for it


async def test_closing_the_server_ends_an_adopted_worker(aiohttp_client, tmp_path):
    server, client = await adopted(aiohttp_client, model_dir(tmp_path, SETUP_PRINTS))
    process = server.runner._process
    await client.close()  # the app's cleanup: the worker's socket closes, it exits
    assert process.returncode is not None
    await eventually(no_waiters, "the thread that waited for it to end")
