"""params.yaml -> typed sections: defaults, overrides, and a catalogue of broken variants."""

import copy
import inspect
from pathlib import Path

import pytest
import yaml

from helpers import assert_refused
from pipeline.core.config import ConfigError, DiffusionConfig, ExperimentConfig
from pipeline.core.params import load_params, parse_params
from pipeline.core.sampler_specs import SAMPLER_SPECS
from pipeline.core.sweep_axes import SWEEP_OBJECTIVES

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((PROJECT / "params.yaml").read_text())


def test_default_params_load():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.dataset == "digits"
    assert list(params.experiments) == ["mu_vlb_learned", "mu_vlb_fixed", "mu_simple",
                                        "eps_vlb_learned", "eps_vlb_fixed", "eps_simple"]
    learned = params.experiment("eps_vlb_learned").diffusion
    assert (learned.mean_type, learned.var_type, learned.loss) == ("eps", "learned", "vlb")
    # an override touches only its own row
    assert params.experiment("eps_simple").diffusion.loss == "simple"
    assert params.diffusion.num_timesteps == params.experiment("mu_simple").diffusion.num_timesteps


def test_experiment_round_trips_through_a_dict():
    params = load_params(PROJECT / "params.yaml")
    exp = params.experiment("mu_vlb_fixed")
    again = ExperimentConfig.from_dict(exp.to_dict())
    assert again == exp
    assert again.config_hash() == exp.config_hash()
    other = params.experiment("eps_vlb_fixed")
    assert other.config_hash() != exp.config_hash()


def test_nested_train_override_and_yaml_float_strings():
    raw = copy.deepcopy(DEFAULT)
    raw["train"]["lr"] = "2e-4"  # YAML 1.1 reads this as a string; accept it as a number
    raw["experiments"]["eps_simple"]["train"] = {"steps": 7}
    params = parse_params(raw)
    assert params.train.lr == pytest.approx(2e-4)
    assert params.experiment("eps_simple").train.steps == 7
    assert params.experiment("mu_simple").train.steps == DEFAULT["train"]["steps"]


def broken(path, value):
    """DEFAULT with the key at dotted `path` set to `value` (or deleted for ...)."""
    raw = copy.deepcopy(DEFAULT)
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return raw


# (params, text that must appear in the error: the key, and the allowed values where they exist)
CATALOGUE = [
    (broken("colour", 1), ["colour", "diffusion"]),
    (broken("study.nme", "x"), ["study", "nme", "name"]),
    (broken("data.datset", "digits"), ["datset", "did you mean 'dataset'"]),
    (broken("diffusion.shedule", "linear"), ["shedule", "schedule"]),
    (broken("model.channels", 32), ["model", "channels", "allowed"]),
    (broken("train.epochs", 3), ["train", "epochs", "allowed"]),
    (broken("sample.smapler", "ddim"), ["smapler", "sampler"]),
    (broken("evaluate.fid", True), ["evaluate", "fid"]),
    (broken("tracking.uri", "x"), ["tracking", "uri"]),
    (broken("experiments.eps_simple.mean_typ", "eps"), ["experiments.eps_simple", "mean_typ",
                                                        "mean_type"]),
    (broken("experiments.eps_simple.train", {"stepz": 3}), ["stepz", "steps"]),
    (broken("train.steps", "many"), ["train.steps", "integer"]),
    (broken("train.batch_size", 12.5), ["train.batch_size", "integer"]),
    (broken("train.use_gpu", "yes"), ["train.use_gpu", "true or false"]),
    (broken("model.ch_mult", 2), ["model.ch_mult", "list"]),
    (broken("diffusion.num_timesteps", 0), ["diffusion.num_timesteps", "positive"]),
    (broken("diffusion.num_timesteps", -5), ["diffusion.num_timesteps", "positive"]),
    (broken("diffusion.beta_end", 1.5), ["beta_end", "(0, 1)"]),
    (broken("diffusion.beta_start", 0.0), ["beta_start", "(0, 1)"]),
    (broken("diffusion.schedule", "cosin"), ["diffusion.schedule", "cosin", "linear, cosine"]),
    (broken("diffusion.mean_type", "v"), ["mean_type", "eps, x0, mu"]),
    (broken("experiments.mu_simple.var_type", "fixed"), ["var_type", "fixed_large"]),
    (broken("diffusion.loss", "l1"), ["loss", "simple, vlb, hybrid"]),
    (broken("diffusion.weighting", "snr"), ["weighting", "min_snr"]),
    (broken("data.dataset", "mnist"), ["data.dataset", "digits, cifar10, folder"]),
    (broken("sample.sampler", "euler"), ["sample.sampler", "ancestral, ddim"]),
    (broken("train.precision", "fp16"), ["train.precision", "fp16", "fp32, tf32, bf16"]),
    (broken("sample.precision", True), ["sample.precision", "fp32, tf32, bf16"]),
    (broken("sample.compile", "yes"), ["sample.compile"]),
    (broken("experiments.eps_simple.var_type", "learned"), ["loss", "'simple' cannot train",
                                                            "vlb", "hybrid"]),
    (broken("train.num_workers", 3), ["batch_size", "divisible by num_workers"]),
    (broken("experiments.eps_simple.weighting", "p2"), []),  # valid: p2 weights the simple loss
    (broken("experiments.eps_vlb_fixed.weighting", "p2"), ["weighting", "simple loss"]),
    (broken("train.lr", -1.0), ["train.lr", "> 0"]),
    (broken("sample.steps", 50), ["sample.steps", "ancestral sampler takes no steps", "'ddim'"]),
    (broken("sample.eta", 1.0), ["sample.eta", "ancestral sampler takes no eta", "'ddim'"]),
    (broken("sampling_steps.experiments", ["eps_smple"]), ["sampling_steps.experiments",
                                                           "eps_smple", "eps_simple"]),
    (broken("sampling_steps.ddim_steps", [10, 500]), ["sampling_steps.ddim_steps", "500",
                                                      "200 timesteps"]),
    (broken("sampling_steps.ddim_steps", [50, 10]), ["sampling_steps.ddim_steps", "increase"]),
    (broken("sampling_steps.eta", -1.0), ["sampling_steps.eta", ">= 0"]),
    (broken("sampling_steps.stpes", [10]), ["stpes", "steps"]),
    (broken("experiments.eps_simple.sample", {"steps": 20}), ["experiments.eps_simple.sample.steps",
                                                               "takes no steps"]),
    (broken("evaluate.feature_extractor", "nonsense"), ["feature_extractor", "module:Class"]),
    (broken("experiments", ["eps"]), ["experiments", "mapping"]),
    (broken("evaluate.checkpoints", "every"), ["evaluate.checkpoints", "'all'", "list"]),
    (broken("evaluate.checkpoints", 200), ["evaluate.checkpoints", "'all'", "null"]),
    (broken("evaluate.checkpoints", [100]), ["evaluate.checkpoints", "100", "checkpoint_every",
                                             "(200)", "'all'"]),
    (broken("evaluate.checkpoints", []), ["evaluate.checkpoints", "non-empty"]),
    (broken("evaluate.checkpoints", [200, 400]), []),  # valid: checkpoint steps, the last too
    (broken("evaluate.checkpoints", "all"), []),
    (broken("evaluate.checkpoint_num_samples", 1), ["checkpoint_num_samples", ">= 2"]),
    (broken("study.seeds", []), ["study.seeds", "non-empty"]),
    (broken("study.seeds", [0, 0]), ["study.seeds", "twice"]),
    (broken("study.seeds", [-1]), ["study.seeds", ">= 0"]),
    (broken("study.seeds", 3), ["study.seeds", "list"]),
    (broken("study.seed", 1), ["study", "'seed'", "did you mean 'seeds'"]),
    (broken("data.seed", -2), ["data.seed", ">= 0"]),
    (broken("train.lr_schedule", "step"), ["train.lr_schedule", "constant, cosine"]),
    (broken("train.lr_final", 2.0), ["train.lr_final", "[0, 1]"]),
    (broken("train.ema_warmup", "on"), ["train.ema_warmup", "true or false"]),
    (broken("evaluate.reference_draws", 1), ["reference_draws", ">= 2"]),
    # attention where no level of the U-Net works: digits are 8x8, ch_mult [1, 2] gives 8, 4
    (broken("model.attn_resolutions", [16]), ["model.attn_resolutions", "16 is never reached",
                                              "8x8", "8, 4"]),
    (broken("model.attn_resolutions", [8, 4]), []),
    (broken("model.attn_resolutions", []), []),
    (broken("data.dataset", "cifar10"), ["model.attn_resolutions", "4 is never reached",
                                         "32x32", "32, 16"]),
    ({**broken("data.dataset", "folder"), "data": {"dataset": "folder", "image_size": 16}},
     ["model.attn_resolutions", "4 is never reached", "16x16", "16, 8"]),
    (broken("model.ch_mult", [1, 2, 2]), []),  # 8, 4, 2: 4 is reached
    # where Ray keeps and places the work
    (broken("cluster.storage", "s3://bucket/ddpm"), []),
    (broken("cluster.storage", "/shared/ddpm"), []),
    (broken("cluster.storage", "ftp://host/ddpm"), ["cluster.storage", "scheme 'ftp'", "s3://"]),
    (broken("cluster.storage", " "), ["cluster.storage", "path or a URI"]),
    (broken("cluster.placement", "strict"), ["cluster.placement", "pack, spread"]),
    # tracking URIs MLflow cannot track into
    (broken("tracking.tracking_uri", "mlflow.db"), ["tracking.tracking_uri", "no scheme",
                                                    "sqlite:///mlflow.db"]),
    (broken("tracking.tracking_uri", "s3://bucket/runs"), ["tracking.tracking_uri",
                                                           "scheme 's3'", "mlflow server"]),
    (broken("tracking.tracking_uri", "sqllite:///mlflow.db"), ["scheme 'sqllite'"]),
    (broken("tracking.tracking_uri", "postgresql+psycopg2://u@db/mlflow"), []),
    (broken("tracking.tracking_uri", "https://mlflow.example.org"), []),
    ([1, 2], ["top level", "mapping"]),
]


@pytest.mark.parametrize("raw,needles", CATALOGUE, ids=[str(i) for i in range(len(CATALOGUE))])
def test_broken_params_are_refused_with_a_message_naming_the_key(raw, needles):
    assert_refused(raw, needles)



@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.002\n  steps: 10\n  lr: 0.01\n", "train.lr", (2, 4)),
    ("train:\n  steps: 10\ntrain:\n  steps: 20\n", "train", (1, 3)),
    ("experiments:\n  a:\n    train: {lr: 1, lr: 2}\n", "experiments.a.train.lr", (3, 3)),
])
def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path, text, key, lines):
    """YAML loaders keep the last of two equal keys silently; params.yaml refuses them."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert f"key '{key}' is written twice (lines {lines[0]} and {lines[1]})" in message
    assert "\n" not in message and str(path) in message


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """`<<: *anchor` then an explicit key overrides the merged one: valid YAML, no duplicate."""
    path = tmp_path / "params.yaml"
    path.write_text("experiments:\n  a: &a {loss: simple, schedule: cosine}\n"
                    "  b:\n    <<: *a\n    loss: vlb\n")
    b = load_params(path).experiments["b"].diffusion
    assert (b.loss, b.schedule) == ("vlb", "cosine")


def test_yaml_syntax_error_and_empty_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error \(line \d+"):
        load_params(bad)
    bad.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_evaluate_checkpoints_forms():
    from pipeline.core.config import checkpoint_steps

    params = load_params(PROJECT / "params.yaml")
    assert params.evaluate.checkpoints is None  # the default study scores only the final model
    raw = copy.deepcopy(DEFAULT)
    raw["train"].update(steps=500, checkpoint_every=200)
    assert checkpoint_steps(parse_params(raw).train) == [200, 400, 500]  # the last one too
    raw["train"]["steps"] = 400
    raw["evaluate"]["checkpoints"] = [200, 400]

    exp = parse_params(raw).experiment("eps_simple")
    assert exp.evaluate.checkpoints == (200, 400)
    assert ExperimentConfig.from_dict(exp.to_dict()) == exp
    raw["experiments"]["eps_simple"]["train"] = {"steps": 300}  # 400 is past this row's end
    with pytest.raises(ConfigError, match="400 have no checkpoint in experiment 'eps_simple'"):
        parse_params(raw)


def test_every_experiment_runs_once_per_seed():
    raw = copy.deepcopy(DEFAULT)
    raw["study"]["seeds"] = [0, 3]
    params = parse_params(raw)
    assert [r.key for r in params.runs()][:4] == ["mu_vlb_learned-0", "mu_vlb_learned-3",
                                                 "mu_vlb_fixed-0", "mu_vlb_fixed-3"]
    assert len(params.runs()) == 2 * len(params.experiments)
    first, other = params.experiment("eps_simple"), params.experiment("eps_simple", 3)
    assert (first.seed, other.seed) == (0, 3) and other.key == "eps_simple-3"
    assert ExperimentConfig.from_dict(other.to_dict()) == other
    # a run's identity does not depend on the study's other seeds: adding seed 3 to a study
    # leaves its seed-0 runs' names (and checkpoints) as they were
    alone = load_params(PROJECT / "params.yaml").experiment("eps_simple")
    assert first.config_hash() == alone.config_hash() != other.config_hash()
    with pytest.raises(ConfigError, match=r"seed 5 is not one of the study's seeds \[0, 3\]"):
        params.experiment("eps_simple", 5)


def test_sections_are_frozen():
    import dataclasses

    params = load_params(PROJECT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.steps = 5  # type: ignore[misc]


def section_defaults() -> dict[str, object]:
    """{section: its dataclass with every field at its default} of the base sections."""
    import dataclasses

    from pipeline.core.params import Params

    return {f.name: f.default_factory() for f in dataclasses.fields(Params)
            if f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory())}


def test_each_default_has_one_value_the_field_and_params_yaml_agree():
    """A key deleted from params.yaml leaves the study as it was: each field's default is the
    value params.yaml gives it, and params.yaml (as docs/cifar10.params.yaml) lists every key."""
    import dataclasses

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    disagree, missing = [], []
    for section, default in section_defaults().items():
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            if f.name not in raw[section]:
                missing.append(f"{section}.{f.name}")
            elif raw[section][f.name] != (list(value) if isinstance(value, tuple) else value):
                disagree.append(f"{section}.{f.name}: field {value!r}, params.yaml "
                                f"{raw[section][f.name]!r}")
    assert not disagree and not missing, (disagree, missing)
    cifar = yaml.safe_load((PROJECT / "docs" / "cifar10.params.yaml").read_text())
    assert not [f"{s}.{f.name}" for s, d in section_defaults().items()
                for f in dataclasses.fields(d) if f.name not in cifar[s]]
    # and the check can fail: the paper's T is not the default study's
    assert cifar["diffusion"]["num_timesteps"] != DiffusionConfig().num_timesteps


def test_ddpm_storage_overrides_cluster_storage(monkeypatch):
    cluster = parse_params(broken("cluster.storage", "/shared/ddpm")).cluster
    monkeypatch.delenv("DDPM_STORAGE", raising=False)
    assert cluster.resolved_storage() == "/shared/ddpm"
    monkeypatch.setenv("DDPM_STORAGE", "s3://bucket/ray")
    assert cluster.resolved_storage() == "s3://bucket/ray"


def test_the_library_registries_are_keyed_by_the_params_choices():
    """params.yaml's choices live in the config's Literal annotations (config imports no torch);
    each registry of the library must be keyed by exactly those names."""
    from pipeline.core import config
    from pipeline.diffusion import gaussian, samplers, schedules

    assert config.SCHEDULES == tuple(schedules.SCHEDULES)
    assert config.MEAN_TYPES == tuple(gaussian.MEAN_TYPES)
    assert config.VAR_TYPES == tuple(gaussian.VAR_TYPES)
    assert config.LOSSES == tuple(gaussian.LOSSES)
    assert config.WEIGHTINGS == tuple(gaussian.WEIGHTINGS)
    assert config.SAMPLERS == tuple(samplers.SAMPLERS)
    for name, spec in SAMPLER_SPECS.items():  # each takes its declared options, by keyword
        parameters = inspect.signature(samplers.SAMPLERS[name]).parameters
        assert set(spec.options) <= {k for k, p in parameters.items()
                                     if p.kind == p.KEYWORD_ONLY}, name
    assert config.SWEEP_WEIGHTINGS == tuple(SWEEP_OBJECTIVES)
    assert set(config.SWEEP_SCHEDULES) <= set(config.SCHEDULES)
    for loss, weighting in SWEEP_OBJECTIVES.values():
        assert loss in config.LOSSES and weighting in config.WEIGHTINGS
    # the vocabularies that config holds for the layers above it
    assert config.PRECISIONS == config.choices(config.SampleConfig, "precision")
    assert set(config.LEARNED_VAR_TYPES) <= set(config.VAR_TYPES)
    betas = schedules.beta_schedule("linear", 10)
    for var_type in config.VAR_TYPES:  # the network outputs a variance exactly for these
        learned = gaussian.GaussianDiffusion(betas, "eps", var_type, "vlb").learns_variance
        assert learned == (var_type in config.LEARNED_VAR_TYPES), var_type
    from pipeline.core.dataset_specs import DATASET_NAMES, DATASET_SPECS
    from pipeline.data import datasets
    from pipeline.measure import extractors

    # each dataset: declared once, read by its reader, measured by its declared extractor,
    # flipped as declared; config's choices are the declared names
    assert config.choices(config.DataConfig, "dataset") == DATASET_NAMES == tuple(
        datasets.READERS)
    for name, spec in DATASET_SPECS.items():
        assert spec.extractor in (config.DIGITS_EXTRACTOR, config.INCEPTION_EXTRACTOR), name
        assert extractors.extractor_name(name) == spec.extractor
        assert datasets.default_hflip(config.DataConfig(dataset=name)) == spec.flip
        assert config.DataConfig(dataset=name).image_shape() == (spec.shape or (3, 32, 32))
    assert not DATASET_SPECS["digits"].flip and DATASET_SPECS["cifar10"].flip
    assert DATASET_SPECS["cifar10"].paper_table1 and not DATASET_SPECS["digits"].paper_table1


def test_choices_reads_a_literal_field_and_a_list_of_literals():
    from dataclasses import dataclass
    from typing import Literal

    from pipeline.core.coerce import choices

    @dataclass
    class Section:
        one: Literal["a", "b"] = "a"
        many: tuple[Literal["x", "y", "z"], ...] = ("x",)

    assert choices(Section, "one") == ("a", "b")
    assert choices(Section, "many") == ("x", "y", "z")
