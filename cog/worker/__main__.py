"""``python -m cog.worker``: see :mod:`cog.worker.main`."""

from cog.worker.main import main

main()
