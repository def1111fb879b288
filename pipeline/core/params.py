"""params.yaml read and checked: `load_params` (a file) and `parse_params` (a mapping) give the
whole study as `Params`, its sections the typed dataclasses of `pipeline.core.config`.

Beyond each section's own checks, the file is checked as a whole here: no key written twice
(YAML would keep the last), no unknown section, each experiment's overrides resolved against
the base sections (an experiment overrides `diffusion` keys, and `train:` and `sample:` keys
nested under their names), settings that must agree across sections (the attention
resolutions against the image size, sample.steps against diffusion.num_timesteps,
evaluate.checkpoints against the checkpoints training keeps), and every sweep trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from pipeline.core.coerce import (ConfigError, build_section, check_unknown, describe_value,
                                  plain, suggest)
from pipeline.core.config import (SECTIONS, ClusterConfig, DataConfig, DiffusionConfig,
                                  EvaluateConfig, ExperimentConfig, ModelConfig, SampleConfig,
                                  SamplingStepsConfig, StudyConfig, SweepConfig, TrackingConfig,
                                  TrainConfig,
                                  checkpoint_steps, require)


@dataclass(frozen=True)
class Params:
    """The whole params.yaml: base sections plus the `experiments` mapping of overrides."""

    study: StudyConfig = field(default_factory=StudyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experiments: Mapping[str, ExperimentConfig] = field(default_factory=dict)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    sampling_steps: SamplingStepsConfig = field(default_factory=SamplingStepsConfig)

    def experiment(self, name: str, seed: Optional[int] = None) -> ExperimentConfig:
        """Experiment `name` trained with `seed` (default: the study's first seed), which must
        be one of `study.seeds`."""
        if name not in self.experiments:
            raise ConfigError(f"experiments: no experiment named '{name}'; "
                              f"defined: {', '.join(self.experiments) or '(none)'}")
        seed = self.study.seeds[0] if seed is None else seed
        if seed not in self.study.seeds:
            raise ConfigError(f"study.seeds: seed {seed} is not one of the study's seeds "
                              f"{list(self.study.seeds)}; add it to study.seeds in params.yaml")
        return dataclasses.replace(self.experiments[name], seed=seed)

    def runs(self) -> list[ExperimentConfig]:
        """Every (experiment, seed) of the study, experiments outermost."""
        return [self.experiment(name, seed) for name in self.experiments
                for seed in self.study.seeds]

    def base_experiment(self, name: str) -> ExperimentConfig:
        """The base sections without any experiment's overrides (e.g. reference rows), with
        the study's first seed."""
        return ExperimentConfig(name=name, seed=self.study.seeds[0],
                                **{s: getattr(self, s) for s in SECTIONS})

    def sweep_experiment(self, *cell: str) -> ExperimentConfig:
        """One sweep trial: `sweep.base_experiment` (the study's first seed) with one value of
        each of the sweep's axes (a schedule and a weighting)."""
        if self.sweep.base_experiment not in self.experiments:
            raise ConfigError(f"sweep.base_experiment: '{self.sweep.base_experiment}' is not an "
                              f"experiment; choose one of: {', '.join(self.experiments)}")
        return self.sweep.trial_experiment(self.experiment(self.sweep.base_experiment), *cell)

    def to_dict(self) -> dict[str, Any]:
        out = {name: plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}
        out["sweep"] = plain(dataclasses.asdict(self.sweep))
        out["sampling_steps"] = plain(dataclasses.asdict(self.sampling_steps))
        return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; run from the project root or pass --params")
    try:
        text = path.read_text()
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; it needs at least an 'experiments' mapping")
    return parse_params(raw, source=str(path))


def _check_duplicate_keys(node: Any, path: Path, where: tuple[str, ...] = ()) -> None:
    """Refuse a key written twice in one mapping (YAML loaders keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            line = key.start_mark.line + 1
            if key.tag != "tag:yaml.org,2002:merge" and name in seen:
                raise ConfigError(f"{path}: key '{'.'.join((*where, name))}' is written twice "
                                  f"(lines {seen[name]} and {line}); YAML would keep only the "
                                  "last, so delete one")
            seen[name] = line
            _check_duplicate_keys(value, path, (*where, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, path, (*where, str(index)))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as loaded from YAML) into `Params`."""
    try:
        return _parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse_params(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {describe_value(raw)}")
    allowed = (*SECTIONS, "experiments", "sweep", "sampling_steps")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown section '{key}'; allowed: {', '.join(allowed)}")
    sections = {name: build_section(cls, raw.get(name) or {}, name)
                for name, cls in SECTIONS.items()}
    for name, section in sections.items():
        section.validate(name)
    _check_attention(sections["model"], sections["data"])

    experiments_raw = raw.get("experiments")
    if experiments_raw is None:
        experiments_raw = {}
    if not isinstance(experiments_raw, dict):
        raise ConfigError(f"experiments must be a mapping of name -> overrides, "
                          f"got {describe_value(experiments_raw)}")
    experiments = {}
    for name, overrides in experiments_raw.items():
        experiments[str(name)] = _resolve_experiment(str(name), overrides, sections)
    sweep = build_section(SweepConfig, raw.get("sweep") or {}, "sweep")
    sweep.validate("sweep")
    steps = build_section(SamplingStepsConfig, raw.get("sampling_steps") or {}, "sampling_steps")
    steps.validate("sampling_steps")
    params = Params(**sections, experiments=experiments, sweep=sweep, sampling_steps=steps)
    if "sweep" in raw:  # without a sweep section the defaults need not fit these experiments
        _check_sweep(params)
    if "sampling_steps" in raw:  # likewise
        _check_sampling_steps(params)
    return params


def _check_attention(model: ModelConfig, data: DataConfig) -> None:
    """Every attention resolution must be a size some level of the U-Net works at."""
    size = data.resolution()
    reached = model.resolutions(size)
    never = [r for r in model.attn_resolutions if r not in reached]
    require(not never, "model.attn_resolutions",
             f"{', '.join(map(str, never))} is never reached: {data.dataset} images are "
             f"{size}x{size} and ch_mult {list(model.ch_mult)} works at "
             f"{', '.join(map(str, reached))}; use some of those (or [] for no attention)")


def _check_sweep(params: Params) -> None:
    """Every trial of the sweep must be a valid experiment (checked before any work starts)."""
    for cell in params.sweep.cells():
        exp = params.sweep_experiment(*cell)
        require(params.sweep.fid_steps <= exp.diffusion.num_timesteps, "sweep.fid_steps",
                 f"must be <= diffusion.num_timesteps ({exp.diffusion.num_timesteps})")


def _check_sampling_steps(params: Params) -> None:
    """Every experiment `sampling_steps` names must exist, with at least its largest count of
    timesteps."""
    for name in params.sampling_steps.experiments:
        require(name in params.experiments, "sampling_steps.experiments",
                f"'{name}' is not an experiment; choose from: {', '.join(params.experiments)}")
        steps, top = params.sampling_steps.ddim_steps[-1], \
            params.experiments[name].diffusion.num_timesteps
        require(steps <= top, "sampling_steps.ddim_steps",
                f"{steps} steps: experiment '{name}' has {top} timesteps")


_EXPERIMENT_NESTED = ("train", "sample")


def _resolve_experiment(name: str, overrides: Any, sections: dict[str, Any]) -> ExperimentConfig:
    where = f"experiments.{name}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{where}: experiment names may use letters, digits, '_' and '-' only")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping of diffusion overrides, got {describe_value(overrides)}")
    diffusion_keys = [f.name for f in fields(DiffusionConfig)]
    resolved = dict(sections)
    diffusion_overrides = {}
    for key, value in overrides.items():
        if key in _EXPERIMENT_NESTED:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a mapping, got {describe_value(value)}")
            base = sections[key]
            merged = {**plain(dataclasses.asdict(base)), **value}
            check_unknown(type(base), value, f"{where}.{key}")
            resolved[key] = build_section(type(base), merged, f"{where}.{key}")
            resolved[key].validate(f"{where}.{key}")
        elif key in diffusion_keys:
            diffusion_overrides[key] = value
        else:
            allowed = diffusion_keys + list(_EXPERIMENT_NESTED)
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, allowed)}; "
                              f"allowed: {', '.join(allowed)}")
    merged = {**plain(dataclasses.asdict(sections["diffusion"])), **diffusion_overrides}
    resolved["diffusion"] = build_section(DiffusionConfig, merged, where)
    resolved["diffusion"].validate(where)
    if resolved["sample"].steps is not None:
        require(resolved["sample"].steps <= resolved["diffusion"].num_timesteps, "sample.steps",
                 f"must be <= diffusion.num_timesteps ({resolved['diffusion'].num_timesteps})")
    _check_checkpoint_steps(name, resolved["evaluate"], resolved["train"])
    return ExperimentConfig(name=name, seed=resolved["study"].seeds[0], **resolved)


def _check_checkpoint_steps(name: str, evaluate: EvaluateConfig, train: TrainConfig) -> None:
    if not isinstance(evaluate.checkpoints, tuple):
        return
    available = set(checkpoint_steps(train))
    bad = [step for step in evaluate.checkpoints if step not in available]
    require(not bad, "evaluate.checkpoints",
             f"step(s) {', '.join(map(str, bad))} have no checkpoint in experiment '{name}'; use "
             f"multiples of train.checkpoint_every ({train.checkpoint_every}) up to train.steps "
             f"({train.steps}), train.steps itself, or 'all'")
