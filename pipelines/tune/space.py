"""Search spaces: YAML naming job-config keys and their distributions, validated against the
task's config before Ray starts.

    # jobs/configs/tune_vqa.yaml
    parameters:
      optim.lr: {loguniform: [1.0e-5, 1.0e-4]}
      optim.visual_lr: {loguniform: [1.0e-6, 1.0e-5]}
      optim.warmup_steps: {choice: [0, 500, 1000]}
      data.batch_size: {grid: [8, 16]}
      run.epochs: {randint: [2, 6]}         # 2..5 (upper bound excluded, as numpy and Tune)

Distributions: `loguniform: [low, high]` (0 < low < high), `uniform: [low, high]`, `choice:
[values…]`, `randint: [low, high)` and `grid: [values…]` (every value, crossed with the other grid
keys, each combination sampled `num_samples` times). Every value a distribution can draw is
checked against the job config (an unknown key, a wrong type or an invalid value is an error
naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.train.config import ConfigError, TrainConfig, apply_overrides

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


@dataclass(frozen=True)
class Parameter:
    key: str  # dotted config key, e.g. "optim.lr"
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) for the ranges, the candidates otherwise

    def checked_values(self) -> list[Any]:
        """Values that stand for everything the distribution can draw (the bounds of a range)."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def tune_domain(self):
        from ray import tune

        low_high = self.values
        if self.kind == "loguniform":
            return tune.loguniform(*low_high)
        if self.kind == "uniform":
            return tune.uniform(*low_high)
        if self.kind == "randint":
            return tune.randint(*low_high)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def describe(self) -> str:
        if self.kind in ("loguniform", "uniform", "randint"):
            return f"{self.key} ~ {self.kind}[{self.values[0]}, {self.values[1]}{')' if self.kind == 'randint' else ']'}"
        return f"{self.key} ∈ {self.kind} {list(self.values)}"


@dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    source: str

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def param_space(self) -> dict[str, Any]:
        """Tune's `param_space`: dotted keys → domains."""
        return {p.key: p.tune_domain() for p in self.parameters}

    def grid_size(self) -> int:
        size = 1
        for p in self.parameters:
            if p.kind == "grid":
                size *= len(p.values)
        return size


def _parameter(key: str, spec: Any, source: str) -> Parameter:
    where = f"search space {source}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: expected one distribution, e.g. {{loguniform: [1e-5, 1e-4]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform", "randint"):
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"{where}: {kind} takes [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}: randint takes integers, got {values!r}")
        if kind == "randint" and high - low < 1:
            raise ConfigError(f"{where}: randint [{low}, {high}) holds no integer")
    return Parameter(key, kind, tuple(values))


def load_space(path_or_uri: str) -> SearchSpace:
    """Parse a search-space YAML (any URI); structure errors name the key."""
    from pipelines import storage

    if not storage.exists(path_or_uri):
        raise ConfigError(f"search space {path_or_uri!r} does not exist")
    raw = yaml.safe_load(storage.read_text(path_or_uri)) or {}
    if not isinstance(raw, dict) or set(raw) - {"parameters"}:
        raise ConfigError(f"search space {path_or_uri}: expected a mapping with one key, `parameters`")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"search space {path_or_uri}: `parameters` must map config keys to distributions")
    return SearchSpace(tuple(_parameter(str(k), v, path_or_uri) for k, v in params.items()), path_or_uri)


def validate_space(space: SearchSpace, base: TrainConfig) -> None:
    """Every value each parameter can draw makes a valid job from `base`: an unknown key, a
    wrong type or an out-of-range value is an error naming the key and the value."""
    raw = base.model_dump(mode="json")
    for param in space.parameters:
        if param.key.split(".", 1)[0] == "task":
            raise ConfigError(
                f"search space {space.source}: {param.key} cannot be searched (one search, one task)"
            )
        for value in param.checked_values():
            try:
                job = TrainConfig.model_validate(apply_overrides(raw, {param.key: value}))
                if param.key.startswith(("model.", "data.image_size", "data.max_text_len")):
                    from pipelines.train.launch import build_model_config

                    build_model_config(job)  # preset overrides are checked by the model config
            except ConfigError as err:
                raise ConfigError(f"search space {space.source}: {param.key}={value!r}: {err}") from None
            except ValueError as err:  # pydantic's ValidationError
                first = str(err).splitlines()
                raise ConfigError(
                    f"search space {space.source}: {param.key}={value!r} is not a valid value: "
                    + " ".join(line.strip() for line in first[1:3])
                ) from None
        _require_known_key(raw, param.key, space.source)


def _require_known_key(raw: dict, dotted: str, source: str) -> None:
    """Model overrides are free-form dicts: any other key must already exist in the config."""
    node: Any = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if i and parts[i - 1] == "overrides":
            return  # model.overrides.<MPlugConfig field>: checked by building the model config
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(
                f"search space {source}: unknown config key {dotted!r} (at {part!r}; known: {known})"
            )
        node = node[part]


def apply_sample(base: TrainConfig, sample: dict[str, Any]) -> TrainConfig:
    """The base job with a trial's sampled values set (dotted keys)."""
    return TrainConfig.model_validate(apply_overrides(base.model_dump(mode="json"), sample))
