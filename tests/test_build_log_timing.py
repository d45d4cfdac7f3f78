"""The seconds each step took, beside the line that ends it, in the Docker builder's log
(the engine's classic output has none; BuildKit's has its own ``#5 DONE 4.2s``)."""

from __future__ import annotations

from cog.builders.docker import StepTimer

# The engine's classic output for three steps: a cached one, one that runs, the last.
CLASSIC = [
    "Step 1/3 : FROM python:3.11-slim",
    " ---> 5f3c1b2a9d8e",
    "Step 2/3 : RUN python -m pip install pillow==11.3.0",
    " ---> Running in 0a1b2c3d4e5f",
    "Collecting pillow==11.3.0",
    " ---> Removed intermediate container 0a1b2c3d4e5f",
    " ---> 9f8e7d6c5b4a",
    "Step 3/3 : COPY package/ /src/",
    " ---> Using cache",
    " ---> 1234567890ab",
    "Successfully built 1234567890ab",
]


def test_each_step_ends_with_its_seconds():
    times = iter([10.0, 10.02, 11.0, 15.25, 16.0, 16.01])
    timer = StepTimer(clock=lambda: next(times))
    out = [timer.line(line) for line in CLASSIC]
    assert out == [
        "Step 1/3 : FROM python:3.11-slim",
        " ---> 5f3c1b2a9d8e (0.0s)",
        "Step 2/3 : RUN python -m pip install pillow==11.3.0",
        " ---> Running in 0a1b2c3d4e5f",
        "Collecting pillow==11.3.0",
        " ---> Removed intermediate container 0a1b2c3d4e5f",
        " ---> 9f8e7d6c5b4a (4.2s)",
        "Step 3/3 : COPY package/ /src/",
        " ---> Using cache",
        " ---> 1234567890ab (0.0s)",
        "Successfully built 1234567890ab",
    ]


def test_a_line_like_an_end_outside_a_step_is_left_alone():
    """A RUN step's own output may print such a line; only the first after a step's
    start ends it, and nothing is timed before the first step."""
    timer = StepTimer(clock=lambda: 1.0)
    assert timer.line(" ---> 5f3c1b2a9d8e") == " ---> 5f3c1b2a9d8e"
    timer.line("Step 1/1 : RUN echo")
    assert timer.line(" ---> 5f3c1b2a9d8e") == " ---> 5f3c1b2a9d8e (0.0s)"
    assert timer.line(" ---> 0a1b2c3d4e5f") == " ---> 0a1b2c3d4e5f"
