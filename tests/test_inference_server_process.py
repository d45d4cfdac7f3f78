"""``python -m cog.runtime`` as a real process: the port, cog.yaml, and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import aiohttp
import pytest

WAIT = 15.0  # a bound for the test to give up, not a timing assertion

MODEL = textwrap.dedent(
    '''
    import os
    import time

    import cog


    class Model(cog.Model):
        """Waits for a file to appear, so the test controls when the inference ends."""

        @cog.input("marker", type=str)
        def run(self, marker):
            print(f"run started for {os.path.basename(marker)}")
            open(marker + ".started", "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(marker + ".release") and time.monotonic() < deadline:
                time.sleep(0.01)
            return "finished"
    '''
)


class ServerProcess:
    def __init__(self, directory, *args, env=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=directory,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._found = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._found.set()
        self._found.set()

    async def wait_for_line(self, text):
        """Wait until the server has logged a line containing ``text``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not any(text in line for line in self.lines):
            if loop.time() > deadline or self.process.poll() is not None:
                pytest.fail(f"the server never logged {text!r}:\n" + "\n".join(self.lines))
            await asyncio.sleep(0.01)

    def url(self, path):
        if not self._found.wait(WAIT) or self.port is None:
            pytest.fail("the server did not start:\n" + "\n".join(self.lines))
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self._reader.join(WAIT)
        self.process.stderr.close()


@pytest.fixture
def package(tmp_path):
    (tmp_path / "cog.yaml").write_text('model: "infer.py:Model"\n')
    (tmp_path / "infer.py").write_text(MODEL)
    return tmp_path


@pytest.fixture
def server_process(package):
    servers = []

    def start(*args, env=None):
        server = ServerProcess(package, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


async def wait_ready(session, server):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        async with session.get(server.url("/ping")) as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.02)
    pytest.fail("the server never became ready:\n" + "\n".join(server.lines))


async def wait_for_file(path):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not os.path.exists(path):
        if loop.time() > deadline:
            pytest.fail(f"{path} never appeared")
        await asyncio.sleep(0.01)


async def test_sigterm_finishes_the_running_inference_and_refuses_the_others(
    package, server_process
):
    server = server_process("--log-level", "debug")  # debug: a line when a request queues
    marker = str(package / "job")
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, server)
        running = asyncio.ensure_future(
            session.post(
                server.url("/infer"), data={"marker": marker}, headers={"X-Request-ID": "long"}
            )
        )
        await wait_for_file(marker + ".started")
        queued = asyncio.ensure_future(
            session.post(
                server.url("/infer"),
                data={"marker": marker + "q"},
                headers={"X-Request-ID": "waiting"},
            )
        )
        await server.wait_for_line("[waiting] queued (1 running")

        server.process.send_signal(signal.SIGTERM)
        # The queued request is refused at once, not after the running inference.
        refused = await asyncio.wait_for(queued, WAIT)
        assert refused.status == 503
        assert (await refused.json())["error"] == "the server is shutting down"
        refused.release()
        assert not running.done()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:  # until the signal has been handled
            async with session.get(server.url("/ping")) as response:
                status = await response.json()
            if status["status"] == "stopping":
                break
            assert loop.time() < deadline, status
            await asyncio.sleep(0.01)
        assert response.status == 503

        async with session.post(server.url("/infer"), data={"marker": marker + "2"}) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"] == "the server is shutting down"
        assert server.process.poll() is None  # still finishing the running inference

        open(marker + ".release", "w").close()
        response = await asyncio.wait_for(running, WAIT)
        assert response.status == 200
        assert await response.text() == "finished"
        response.release()

    assert server.process.wait(WAIT) == 0
    server._reader.join(WAIT)
    log = "\n".join(server.lines)
    assert "[long] stdout: run started for job" in log
    assert (
        "shutting down: finishing 1 running inference(s); refused 1 queued request(s) "
        "and refusing new ones" in log
    )
    assert not os.path.exists(marker + "q.started")
    assert not os.path.exists(marker + "2.started")


async def test_port_from_the_environment_and_a_missing_model(tmp_path):
    (tmp_path / "cog.yaml").write_text('model: "nothere.py:Model"\n')
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1"],
        cwd=tmp_path,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/ping") as response:
                        status = await response.json()
                    if status["status"] != "starting":
                        break
                except aiohttp.ClientConnectionError:
                    pass
                assert loop.time() < deadline, "the server did not answer"
                await asyncio.sleep(0.02)
        assert response.status == 503
        assert status == {"status": "failed", "error": "model file nothere.py not found in ."}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0


async def test_a_queued_inference_whose_client_hung_up_is_not_run(package, server_process):
    """One at a time (the default): while one inference runs, a second client queues and
    then hangs up. The real server must drop the queued job, not run it for nobody."""
    server = server_process("--log-level", "debug")  # debug: a line when a request queues
    first, second, third = (str(package / name) for name in ("first", "second", "third"))
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, server)
        running = asyncio.ensure_future(session.post(server.url("/infer"), data={"marker": first}))
        await wait_for_file(first + ".started")

        async with aiohttp.ClientSession() as impatient:
            queued = asyncio.ensure_future(
                impatient.post(
                    server.url("/infer"), data={"marker": second}, headers={"X-Request-ID": "gone"}
                )
            )
            await server.wait_for_line("[gone] queued (1 running")
            queued.cancel()  # the client gives up: its connection closes with the session
        await asyncio.gather(queued, return_exceptions=True)
        await server.wait_for_line("[gone] the client hung up; dropped from the queue")

        followed = asyncio.ensure_future(session.post(server.url("/infer"), data={"marker": third}))
        open(first + ".release", "w").close()
        response = await asyncio.wait_for(running, WAIT)
        assert await response.text() == "finished"
        response.release()

        await wait_for_file(third + ".started")
        open(third + ".release", "w").close()
        response = await asyncio.wait_for(followed, WAIT)
        assert await response.text() == "finished"
        response.release()

    assert not os.path.exists(second + ".started")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--concurrency", "2", "--max-queue", "0"], {"COG_CONCURRENCY": "1"}),  # flags win
        ([], {"COG_CONCURRENCY": "2", "COG_MAX_QUEUE": "0"}),
    ],
    ids=["flags", "environment"],
)
async def test_concurrency_and_queue_settings(package, server_process, args, env):
    """Two inferences at once and no queue: both run together, a third is refused."""
    server = server_process(*args, env=env)
    first, second = str(package / "first"), str(package / "second")
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, server)
        running = [
            asyncio.ensure_future(session.post(server.url("/infer"), data={"marker": marker}))
            for marker in (first, second)
        ]
        await wait_for_file(first + ".started")
        await wait_for_file(second + ".started")  # the second did not wait for the first
        async with session.post(server.url("/infer"), data={"marker": "third"}) as refused:
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "1"
            assert (await refused.json())["error"] == (
                "busy: 2 running and 0 waiting; try again later"
            )
        for marker in (first, second):
            open(marker + ".release", "w").close()
        for response in await asyncio.wait_for(asyncio.gather(*running), WAIT):
            assert await response.text() == "finished"
            response.release()


def test_a_setting_that_is_not_a_number_is_one_line(package):
    result = subprocess.run(
        [sys.executable, "-m", "cog.runtime"],
        cwd=package,
        env={**os.environ, "COG_CONCURRENCY": "two"},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 1
    assert result.stderr == "$COG_CONCURRENCY must be an integer, not 'two'\n"


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_it_listens_on_a_unix_socket_when_told(package, tmp_path, how):
    """As the cog server and `cog infer` run it: no network, a socket in a directory they
    share with the container (COG_UNIX_SOCKET), reachable whoever runs the model."""
    socket_path = tmp_path / "run" / "model.sock"
    socket_path.parent.mkdir()
    args = ["--unix-socket", str(socket_path)] if how == "flag" else []
    env = {**os.environ, "COG_UNIX_SOCKET": str(socket_path)} if how == "env" else None
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.runtime", *args],
        cwd=package,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), WAIT)
        while "listening on" not in line:
            line = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), WAIT)
        assert line.rstrip().endswith(f"listening on unix:{socket_path}")
        assert oct(socket_path.stat().st_mode & 0o777) == "0o666"
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = asyncio.get_running_loop().time() + WAIT
            while True:  # the socket is open at once; the model is set up meanwhile
                async with session.get("http://model/ping") as response:
                    if response.status == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, "never ready"
                await asyncio.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=WAIT)
        process.stderr.close()
