"""The worker: the process of the image's own Python that runs the model.

The inference server (:mod:`cog.runtime`, in an environment of its own) starts
``python -m cog.worker`` and talks to it over a socket (:mod:`cog.worker.protocol`); the
worker imports the model, runs its setup, and runs predictions as the server hands them
over (:mod:`cog.worker.main`). The model's environment holds nothing of cog but these
pure-Python modules.
"""
