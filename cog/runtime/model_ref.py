"""Which class is the model: cog.yaml's ``model:`` (2021), ``predict:`` or ``run:``
(today's Cog), and the predictions it may run at once (``concurrency.max``)."""

from __future__ import annotations

import os

import attrs
import yaml

from cog.worker.loader import ModelLoadError, describe, load_class, parse_reference

__all__ = ["CONFIG_FILE", "ModelLoadError", "ModelRef"]

CONFIG_FILE = "cog.yaml"


@attrs.frozen
class ModelRef:
    """A model class named by a Python file (relative to ``directory``) and a class name."""

    file: str
    class_name: str
    directory: str = "."
    #: predictions at once that cog.yaml asks for (today's ``concurrency: {max: N}``)
    concurrency: int = 1
    #: today's ``environment: [NAME=value]`` (images have them as ENV already)
    variables: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        reference: str,
        directory: str = ".",
        concurrency: int = 1,
        variables: tuple[str, ...] = (),
    ) -> ModelRef:
        """``"infer.py:Model"`` -> ModelRef."""
        file, class_name = parse_reference(reference)
        return cls(file, class_name, directory, concurrency, variables)

    @classmethod
    def from_directory(cls, directory: str = ".") -> ModelRef:
        """The model named by ``directory/cog.yaml``."""
        path = os.path.join(directory, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except FileNotFoundError:
            raise ModelLoadError(f"{path} not found") from None
        except yaml.YAMLError as e:
            raise ModelLoadError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(config, dict):
            config = {}
        reference = config.get("model") or config.get("predict") or config.get("run")
        if not isinstance(reference, str):
            raise ModelLoadError(
                f'{path} does not name the model (predict: "predict.py:Predictor", or '
                'model: "infer.py:Model")'
            )
        concurrency = config.get("concurrency")
        maximum = concurrency.get("max") if isinstance(concurrency, dict) else None
        if not isinstance(maximum, int) or isinstance(maximum, bool) or maximum < 1:
            maximum = 1
        variables = config.get("environment")
        if not isinstance(variables, list):
            variables = []
        assignments = tuple(v for v in variables if isinstance(v, str) and "=" in v)
        return cls.parse(reference, directory, maximum, assignments)

    @property
    def reference(self) -> str:
        return f"{self.file}:{self.class_name}"

    def worker_env(self) -> dict[str, str] | None:
        """The environment of the model's worker: this process's with cog.yaml's
        ``environment`` variables; None (this process's) when it has none."""
        if not self.variables:
            return None
        return {**os.environ, **dict(v.split("=", 1) for v in self.variables)}

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.file)

    def load(self) -> type:
        """Import the class in this process and check its signature (the worker does this
        in the model's own process; this is for tools and tests). Raises ModelLoadError,
        or SignatureError for wrongly declared inputs."""
        model_class = load_class(self.directory, self.file, self.class_name)
        describe(model_class)
        return model_class
