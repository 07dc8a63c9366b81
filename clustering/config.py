"""Typed configs for every job: YAML files plus `section.key=value` overrides, with errors that name the field.

Config is data: every knob Tune may search is a field with a default here, so a Tune trial is a config.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .model.backbones import is_backbone
from .model.methods import DEFAULT_METHOD, RECIPES, MethodSettings, methods_with, settings_keys


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or field and what to do."""


def yes_no(value: Any) -> Any:
    """YAML reads an unquoted yes/no (or true/false) as a bool: take it as the word meant."""
    return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


def path_name(value: str) -> str:
    """A name that becomes one folder under a storage path: it may not climb out of it or nest."""
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value) or ".." in value:
        raise ValueError("must be a plain folder name: letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit, without '..' or '/' (it becomes a folder under the storage path)")
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (YAML itself would keep the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


UseGpu = Annotated[Literal["auto", "yes", "no"], BeforeValidator(yes_no)]
RunName = Annotated[str, AfterValidator(path_name)]


def encoder_name(value: str) -> str:
    if value in ("conv", "mlp", "resnet18") or is_backbone(value):
        return value
    raise ValueError(f"{value!r} is not an encoder: give conv, mlp, resnet18, or a pretrained backbone as "
                     "torchvision:NAME or timm:NAME (e.g. torchvision:resnet50)")


class Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShardConfig(Strict):
    source: str = Field("sklearn:digits", description="image folder, MNIST IDX folder/file, .npz, sklearn:digits, or a "
                        "WebDataset corpus indexed in place: a folder/prefix of *.tar or a brace pattern "
                        "(s3://bucket/laion/{00000..09999}.tar)")
    output: str = Field("outputs/demo/shards", description="folder or s3:// prefix for the shards")
    samples_per_shard: int = Field(10_000, ge=1, description="most images in one shard (a shard is also the unit of "
                                   "parallel writing, of a worker's share and of one Parquet part)")
    max_shard_bytes: int = Field(256 * 2**20, ge=1024, description="most encoded bytes in one shard (a folder tree: "
                                 "by the corpus' mean file size, as no process sees every file's size)")
    limit: int | None = Field(None, ge=1, description="take only the first N samples (for quick runs; a WebDataset "
                              "corpus: whole tars, up to N)")
    store: Literal["original", "resized"] = Field(
        "original", description="original: every image's own bytes; resized: each image by the input policy once "
        "(its shorter side down to shard.image_size, centre square), re-encoded (PNG stays PNG, others JPEG q95), its "
        "original's URI kept as its source: far fewer bytes and less decoding for photos. The summary prints both costs")
    image_size: int = Field(64, ge=4, description="store=resized: the side images are stored at (never enlarged)")


class TrainConfig(Strict):
    shards: str = Field("outputs/demo/shards", description="the shard job's output (follows work_dir)")
    storage_path: str = Field("outputs/demo/runs", description="where Ray Train keeps checkpoints")
    name: RunName = Field("", description="run name (a folder name); empty = method + time. Re-using a name "
                                           "resumes that run")
    method: MethodSettings = Field(
        default_factory=lambda: RECIPES[DEFAULT_METHOD].Settings(),
        description="the method and its own settings: `method: nmm`, or `method: {name: nmm, heads: 5}` "
                    "(train.method.heads=5). The methods are clustering/model/methods/' registry: dcec (seed 001), vc (seed "
                    "000), nmm (seed 002), iic, and the baselines idec, dec, ae_kmeans, kmeans (on pixels). `dicl "
                    "config train.method=NAME` lists a method's settings")
    k: int = Field(10, ge=2, description="number of clusters")
    image_size: int | None = Field(None, ge=4, description="train at this square side (shorter side resized, centre "
                                   "crop); empty = the corpus' median shorter side, at most 64 (in manifest.json), "
                                   "at least 16 for the conv autoencoders (dcec, idec, dec, ae_kmeans)")
    input: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: each worker decodes its images once and holds them on its device (fastest); "
                            "stream: each worker streams its shards through a shuffle buffer, decoding in loader "
                            "processes; auto: stream when a worker's decoded images exceed memory_budget_gb")
    memory_budget_gb: float | None = Field(None, gt=0, description="auto: most decoded GB a worker may hold; empty = "
                                           "a quarter of the host's memory per worker on it (and of the GPU's)")
    sample: int | None = Field(None, ge=1, description="train on a seeded uniform random sample of this many images "
                               "drawn across all shards (tune trials use the same one); the label job labels all")
    sample_seed: int = Field(0, description="seed of train.sample (apart from train.seed, so every trial shares it)")
    stats_sample: int = Field(20_000, ge=100, description="stream: images (over all workers) held for the "
                              "dataset statistics: k-means init and end-of-run fit, DEC/CAH f_j, NMM's normalisers")
    shuffle_buffer: int = Field(10_000, ge=1, description="stream: images each loader process shuffles across shards")
    loader_workers: int | None = Field(None, ge=0, description="stream: decoding processes per worker; empty = "
                                       "cpus_per_worker - 1 (at least 1); 0 = decode in the training process")
    encoder: Annotated[str, AfterValidator(encoder_name)] = Field(
        "conv", description="conv (a conv autoencoder or conv net), mlp (DEC's autoencoder: dcec, idec, dec, "
                            "ae_kmeans), resnet18 (CIFAR stem; nmm, iic), or a pretrained backbone: torchvision:NAME "
                            "(e.g. torchvision:resnet50) or timm:NAME, whose features the method clusters (see "
                            "train.weights, train.backbone_lr)")
    weights: str = Field("", description="a backbone's weights: a file or s3:// URI of a state dict (torch.save), or "
                         "hub (torchvision's or timm's pretrained weights, downloaded: needs network access); empty = "
                         "random. Checkpoints hold the weights: labelling needs none of these")
    backbone_lr: float = Field(0.0, ge=0, description="a backbone's learning rate: 0 = frozen (its features are "
                               "computed once, into the feature cache); > 0 = fine-tuned at this rate (e.g. lr / 10), "
                               "its gradients averaged by PyTorch DDP")
    gradients: Literal["ddp", "flat"] = Field(
        "ddp", description="how a fine-tuned backbone's gradients are averaged over workers: ddp (PyTorch DDP's "
        "buckets, overlapping the backward pass) or flat (one all-reduce after it, as the methods' own nets use)")
    backbone_size: int = Field(224, ge=8, description="the side a backbone sees: images are resized to it and "
                               "normalised by its weights' mean and std")
    features: str = Field("", description="a frozen backbone's feature cache (`dicl features`); empty = "
                          "SHARDS/features, beside the shards")
    joint_epochs: int = Field(50, ge=0, description="epochs of the clustering stage (nmm: EM, vc: the ELBO, iic: the "
                              "mutual information, dcec/idec/dec: the joint stage after pretraining; ae_kmeans and "
                              "kmeans have none)")
    batch_size: int = Field(256, ge=2, description="global batch size, split over workers")
    lr: float = Field(1e-3, gt=0, description="Adam's learning rate")
    over_cluster: int | None = Field(None, ge=1, description="the model learns k x this many fine clusters, which "
                                     "are then merged into k on the images' neighbour graph, each merge the one that "
                                     "raises modularity most (in the representation where the model learnt one, else "
                                     "in pixels or a frozen backbone's features). A frequent class splits into fine "
                                     "clusters that join again, where k clusters learnt directly come out near-even "
                                     "in size, splitting it and merging rare ones. 1 = learn the k clusters directly; "
                                     "empty = the method's default (4 for nmm, dcec, idec and vc, 1 for the rest)")
    deskew: bool = Field(False, description="the label-free neighbour graph (each start's pick, the fine clusters' "
                         "merge, the tune job's modularity) links the pixels after shearing each image upright and "
                         "centring it by its second moments (the classic deskew of handwriting): for handwriting and "
                         "line art, where a slanted character is else nearer a look-alike at its slant than itself "
                         "upright. The model's input is unchanged; a learnt representation's graph is not deskewed")
    representation_from: str = Field(
        "", description="start from the representation an earlier run learnt: its checkpoint or run folder (local "
        "or s3://, as the train job prints it) or a checkpoint file. Its encoder's weights are copied into this run's "
        "before it trains; SCAN's neighbours and the label-free scores then read those features, as after a "
        "representation stage of its own (contrast_epochs=0 is usual). One representation stage then serves many "
        "clustering runs, e.g. tune trials over k. The earlier run: the same method, encoder and input side; "
        "train.joint_epochs=0 makes a run that learns the representation alone")
    restarts: int = Field(1, ge=1, description="train this many starts (seeds seed, seed+1000, …) for "
                                               "restart_epochs epochs each and continue the one whose clusters have "
                                               "the highest modularity on the images' neighbour graph times the "
                                               "evenness of their sizes (label-free: a start that split a class "
                                               "cuts its neighbours' links)")
    restart_epochs: int = Field(5, ge=1, description="epochs each start trains before the pick (restarts > 1)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel; each needs a shard)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker asks for (its threads, and loader processes)")
    use_gpu: UseGpu = Field("auto", description="auto: a GPU per worker when the cluster has or can add GPU nodes; yes; no")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N epochs (and always at the end)")
    seed: int = Field(0, description="seed of the weights and batches (every worker starts alike)")

    @model_validator(mode="before")
    @classmethod
    def _read_old_flat_keys(cls, data: Any) -> Any:
        return nest_method_keys(data, "train", strict=False) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _encoder_fits_method(self) -> "TrainConfig":
        encoders = type(self.method).encoders
        if is_backbone(self.encoder):
            if not type(self.method).on_features:
                raise ValueError(f"encoder={self.encoder} does not fit method {self.method.name}, which models "
                                 "pixels; on a backbone's features use nmm, iic, dcec, idec, dec, ae_kmeans or kmeans")
        elif encoders is not None and self.encoder not in encoders:
            raise ValueError(f"encoder={self.encoder} does not fit method {self.method.name}, which builds "
                             f"{' or '.join(encoders)}")
        return self

    @model_validator(mode="after")
    def _a_representation_to_start_from(self) -> "TrainConfig":
        learns = "contrast_epochs" in type(self.method).model_fields  # the methods with SCAN's steps
        if self.representation_from and (not learns or is_backbone(self.encoder)):
            learners = ", ".join(methods_with("contrast_epochs"))
            raise ValueError(f"representation_from: method {self.method.name} with encoder {self.encoder} learns no "
                             f"representation to start from; methods that do: {learners} on their own encoders")
        if getattr(self.method, "freeze_representation", False) and not (self.method.contrast_epochs
                                                                         or self.representation_from):
            raise ValueError("freeze_representation needs the representation that contrast_epochs learn (or that "
                             "representation_from copies): set contrast_epochs (e.g. 100), or "
                             "freeze_representation=false")
        return self

    @classmethod
    def of(cls, where: str = "train", **values: Any) -> "TrainConfig":
        """From flat values: shared keys and the method's own settings side by side, e.g.
        TrainConfig.of(method="nmm", k=10, heads=5); a setting the method lacks is a ConfigError naming it."""
        return cls(**nest_method_keys(values, where, strict=True))

    @classmethod
    def of_spec(cls, config: dict) -> "TrainConfig":
        """The config a checkpoint's spec stores. One written before train.over_cluster learnt its k clusters
        directly."""
        return cls(**{"over_cluster": 1, **config})

    @property
    def fine_k(self) -> int:
        """The clusters the model learns: k x over_cluster (or the method's default), merged into k at the run's end."""
        return self.k * (self.over_cluster or type(self.method).over_cluster)

    def side_for(self, corpus_side: int) -> int:
        """The side images train at: train.image_size, else the corpus' side, enlarged to the least side the
        method's conv net is built for (`min_side`)."""
        if self.image_size:
            return self.image_size
        return max(corpus_side, type(self.method).min_side) if self.encoder == "conv" else corpus_side

    @property
    def frozen_backbone(self) -> bool:
        return is_backbone(self.encoder) and self.backbone_lr == 0

    @property
    def feature_cache(self) -> str:
        from .data.storage import join

        return self.features or join(self.shards, "features")

    def value(self, key: str) -> Any:
        """A train value by its flat name (a shared key, or a setting of the method: `heads`, `method.heads`) as
        JSON has it; `method` is the method's name."""
        dump, key = self.model_dump(mode="json"), key.removeprefix("method.")
        if key == "method":
            return self.method.name
        return dump[key] if key in type(self).model_fields else dump["method"][key]


def train_section(values: dict, method: str) -> dict:
    """Flat train values (tune.space's) as a train section of YAML: the method's settings under `method`."""
    out = {key: value for key, value in values.items() if key in TrainConfig.model_fields and key != "method"}
    settings = {key.removeprefix("method."): value for key, value in values.items()
                if key not in out and key != "method"}
    if settings or "method" in values:
        out["method"] = {"name": method, **settings}
    return out


def setting_path(key: str) -> str:
    """Where a flat train key lives: `k`, or `method.heads` for a method's setting."""
    key = key.removeprefix("method.")
    return key if key in TrainConfig.model_fields else f"method.{key}"


def switch_method(settings: dict, name: Any) -> Any:
    """A method's settings block after `method=name`: the same block for the same method; for another, that
    method with the settings it shares with the first where they differ from the first's defaults (e.g.
    pretrain_epochs from dcec to idec), its own defaults for the rest. A first method's default is no choice to
    impose on the next (nmm's consistency_weight 0.5 would replace vc's 1.0), and a dumped config holds them all."""
    if not isinstance(settings, dict) or not isinstance(name, str):
        return name
    first = settings.get("name", DEFAULT_METHOD)
    if first == name:
        return settings
    defaults = RECIPES[first].Settings.model_fields if first in RECIPES else {}
    return {"name": name, **{key: value for key, value in settings.items() if key in settings_keys(name)
                             and not (key in defaults and value == defaults[key].default)}}


def nest_method_keys(values: dict, where: str, strict: bool) -> dict:
    """Flat train values into TrainConfig's shape: a key that is not a shared train key is a setting of the method,
    and goes into `method` (written `heads` or `method.heads`). strict (DeepClusterer's keywords, tune.space): a key
    the method does not have is an error that names it. Otherwise these are the flat YAML keys of earlier releases,
    read for one more release: moved with a deprecation warning, or dropped with one where the method has no such
    setting (it ignored them then)."""
    moved = [key for key in values if key.removeprefix("method.") not in TrainConfig.model_fields]
    if not moved:
        return values
    out = {key: value for key, value in values.items() if key not in moved}
    method = out.get("method", DEFAULT_METHOD)
    method = {"name": method} if isinstance(method, str) else dict(method)
    name = method.get("name", DEFAULT_METHOD)
    for key in moved:
        setting = key.removeprefix("method.")
        owners = methods_with(setting)
        if setting in settings_keys(name):
            if strict:
                method[setting] = values[key]
            else:
                method.setdefault(setting, values[key])
                print(f"warning: {where}.{key} is deprecated: write {where}.method.{setting} (a setting of {name}); "
                      "flat keys are read until the next release", file=sys.stderr)
        elif strict:
            raise ConfigError(f"{where}: {setting!r} is not a setting of method {name} "
                              + (f"(a setting of {', '.join(owners)})" if owners else "nor a train key")
                              + f"; {name}'s settings: {', '.join(sorted(settings_keys(name))) or 'none'}")
        elif owners:
            print(f"warning: {where}.{key} is ignored: method {name} has no such setting (a setting of "
                  f"{', '.join(owners)}); flat keys are read until the next release", file=sys.stderr)
        else:
            out[key] = values[key]  # no method has it: the model names it as an unknown key
    out["method"] = method
    return out


class LabelConfig(Strict):
    shards: str = Field("outputs/demo/shards", description="the shards to label (follows work_dir)")
    checkpoint: str = Field("", description="a checkpoint or run folder/URI; empty = the latest finished run under "
                                           "train.storage_path (work_dir/runs)")
    output: str = Field("outputs/demo/assignments", description="folder or s3:// prefix of the Parquet parts")
    batch_size: int = Field(4096, ge=1, description="images per forward pass of a labelling actor")
    actors: int = Field(1, ge=1, description="size of the labelling actor pool (one GPU each, where there are GPUs)")
    cpus_per_actor: int = Field(1, ge=1, description="CPU threads of a labelling actor without a GPU")
    decoders: int | None = Field(None, ge=1, description="decoding tasks at once (one CPU and one shard each); "
                                 "empty = as many as the free CPUs allow")
    use_gpu: UseGpu = Field("auto", description="auto: one GPU per actor when the cluster has or can add GPU nodes; yes; no")
    write_probs: bool = Field(True, description="write each image's posteriors over the k clusters (column probs)")
    write_embedding: bool = Field(False, description="write each image's embedding (column embedding)")


class PredictConfig(Strict):
    output: str = Field("outputs/demo/predictions", description="folder or s3:// prefix for the Parquet parts "
                        "of `dicl predict` (the label job's columns)")
    images_per_part: int = Field(10_000, ge=1, description="images per Parquet part (a WebDataset tar: one part each)")
    batch_size: int = Field(1024, ge=1, description="images per forward pass")
    readers: int = Field(8, ge=1, description="threads reading and decoding images (storage latency hides behind them)")
    device: str = Field("auto", description="auto (cuda where there is one), cpu, cuda or cuda:N")
    write_probs: bool = Field(True, description="write each image's posteriors over the k clusters (column probs)")
    write_embedding: bool = Field(False, description="write each image's embedding (column embedding)")


DISTRIBUTIONS = ("randint", "uniform", "loguniform", "choice")  # a searched value drawn from one, by tune.search


def check_space_value(value: list | dict) -> list | dict:
    """A list of values, or one distribution: {randint: [low, high)}, {uniform: [low, high]}, {loguniform: [low,
    high]} (low > 0) or {choice: [values]}."""
    if isinstance(value, list):
        return value
    (kind, args), = value.items() if len(value) == 1 else [(None, None)]
    if kind not in DISTRIBUTIONS or not isinstance(args, list) or not args:
        raise ValueError(f"{value!r}: give a list of values, or one of {', '.join(DISTRIBUTIONS)} with a list, "
                         "e.g. {loguniform: [1.0e-4, 3.0e-3]}")
    number = int if kind == "randint" else (int, float)
    if kind != "choice" and not (len(args) == 2 and all(isinstance(a, number) for a in args) and args[0] < args[1]
                                 and (kind != "loguniform" or args[0] > 0)):
        need = {"randint": ", whole numbers, high excluded", "loguniform": " and low > 0"}.get(kind, "")
        raise ValueError(f"{value!r}: {kind} takes [low, high], numbers with low < high{need} (write 1.0e-4, not "
                         "1e-4, which YAML reads as text)")
    return value


def probe_values(value: list | dict) -> list:
    """What of a searched value to check before any trial starts: every listed value, or a distribution's ends."""
    if isinstance(value, list):
        return value
    (kind, args), = value.items()
    return args if kind == "choice" else [args[0], args[1] - 1] if kind == "randint" else args


class TuneConfig(Strict):
    space: dict[str, Annotated[list | dict[str, list], AfterValidator(check_space_value)]] = Field(
        default_factory=dict, description=(
            "train keys to search (shared, or the method's settings) and their values: a list, e.g. {k: [8, 10, 12], "
            "consistency_weight: [0.5, 1]}, or a distribution, e.g. {lr: {loguniform: [1.0e-4, 3.0e-3]}, k: "
            "{randint: [6, 17]}} (randint, uniform, loguniform, choice); empty = no tuning, and the pipeline trains "
            "the train section as it is"))
    search: Literal["grid", "optuna"] = Field(
        "grid", description="grid: every combination of the lists (distributions drawn at random), num_samples "
                            "times; optuna: num_samples trials chosen by Optuna's TPE from the scores so far (lists "
                            "are choices)")
    num_samples: int = Field(1, ge=1, description="grid: times the grid runs; optuna: trials")
    trial_workers: int = Field(1, ge=1, description="Ray Train workers of each trial (train.cpus_per_worker and a GPU "
                               "each, where there are GPUs); 1 = a trial trains in its own actor. The train job after "
                               "tuning uses train.num_workers")
    seed: int = Field(0, description="seed of the search (Optuna's sampler; the grid's random draws are Ray's)")
    name: RunName = Field("", description="experiment name (a folder under train.storage_path); empty = tune + time. "
                                          "Re-using a name resumes that experiment: finished and stopped trials "
                                          "stay as they are, the rest run")
    metric: Literal["modularity_x_evenness", "modularity", "silhouette", "evenness", "stability"] = Field(
        "modularity_x_evenness", description="label-free score that picks the winner: modularity of the clusters on "
                                  "the images' nearest-neighbour graph times the evenness of their sizes (clusters "
                                  "merged from fine ones have had their modularity raised at every k: alone it leans "
                                  "to k above the classes' number), or modularity alone, or their silhouette on the "
                                  "pixels, or the evenness of the cluster sizes, or their stability: the ARI between "
                                  "the clusters of the sampled images and of one random view of each (it reads the "
                                  "model, not pixels; see docs/RESULTS.md for when to trust which)")
    score_sample: int = Field(10_000, ge=100, description="images the scores are measured on (a fixed sample)")
    report_every: int = Field(5, ge=1, description="a trial scores its clusters every N epochs once it clusters "
                                                    "(and at the end): progress, and what the scheduler decides on")
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo: every trial trains to the end; asha: asynchronous successive halving stops a "
                            "trial whose score at grace_epochs is below the best third of the trials that got there")
    grace_epochs: int = Field(0, ge=0, description="asha: epochs every trial trains before it may be stopped; "
                                                    "0 = half the longest trial")
    max_concurrent: int = Field(0, ge=0, description="trials at once; 0 = as many as the cluster's resources allow")
    share_representation: bool = Field(
        True, description="where the train section has a representation stage (train.method.contrast_epochs) and "
        "tune.space searches only what comes after it (k, over_cluster, the clustering's epochs and weights), the "
        "stage trains once, as a run of its own (TUNE_NAME-representation, on train.num_workers), and every trial "
        "starts from it (train.representation_from); false: each trial trains its own")
    output: str = Field("outputs/demo/tune", description="where trials.json and best.yaml go")


class PipelineConfig(Strict):
    work_dir: str = Field("outputs/demo", description="folder or s3:// prefix; shards/, runs/, assignments/, report/, "
                          "tune/ and predictions/ go under it")
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _wire_paths(self) -> "PipelineConfig":
        # Paths a user did not set follow work_dir, so one override moves the whole run.
        from .data.storage import StorageError, check_uri

        try:
            check_uri(self.work_dir)
        except StorageError as e:
            raise ValueError(f"work_dir: {e}") from None
        root = self.work_dir.rstrip("/")
        if "output" not in self.shard.model_fields_set:
            self.shard.__dict__["output"] = f"{root}/shards"
        for section, field, value in [
            (self.train, "shards", self.shard.output),
            (self.train, "storage_path", f"{root}/runs"),
            (self.label, "shards", self.shard.output),
            (self.label, "output", f"{root}/assignments"),
            (self.predict, "output", f"{root}/predictions"),
            (self.tune, "output", f"{root}/tune"),
        ]:
            if field not in section.model_fields_set:
                section.__dict__[field] = value
        unknown = sorted(key for key in self.tune.space if key not in TrainConfig.model_fields
                         and not methods_with(key.removeprefix("method.")))
        if unknown:
            raise ValueError(f"tune.space names {unknown}, which are neither train keys nor any method's settings "
                             "(see `dicl config`)")
        return self


def probe_space(space: dict[str, list | dict]) -> dict[str, list]:
    """The values of each key to check before any trial starts (`probe_values`)."""
    return {key: probe_values(value) for key, value in space.items()}


def grid_values(space: dict[str, list]) -> list[dict]:
    """Every combination of the searched values (a grid), in a stable order."""
    keys = sorted(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    """`base` with the trial's values: train keys, or settings of the trial's method (`heads`, `method.heads`)."""
    data = base.model_dump()
    if "method" in values:
        data["method"] = switch_method(data["method"], values["method"])
    rest = {key: value for key, value in values.items() if key != "method"}
    data = nest_method_keys({**data, **rest}, f"tune.space: the trial {values}", strict=True)
    try:
        return TrainConfig(**data)
    except ValueError as e:
        raise ConfigError(f"tune.space: the trial {values} is not a valid train config: {e}") from None


def parse_value(text: str) -> Any:
    """`k=12` gives an int, `lr=1e-3` a float, `use_gpu=no` a string: YAML scalar rules."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.k=12)")
        dotted, text = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if p == "method" and isinstance(child, str):  # `method: nmm` gains a setting: {name: nmm, ...}
                child = node[p] = {"name": child}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = child
        value = parse_value(text)
        node[leaf] = switch_method(node[leaf], value) if leaf == "method" and leaf in node else value
    return data


def describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        tagged = [i + 1 for i in range(len(loc) - 2) if loc[i] == "method" and loc[i + 1] in RECIPES]
        method = loc.pop(tagged[0]) if tagged else None  # a setting's path names the union's tag: train.method.nmm.x
        field = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden" and method:
            owners = methods_with(loc[-1])
            lines.append(f"  {field}: not a setting of method {method} "
                         + (f"(a setting of {', '.join(owners)})" if owners else "(check the spelling)")
                         + f"; {method}'s settings: {', '.join(sorted(settings_keys(method))) or 'none'}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (check the spelling; see the configs/ files for valid keys)")
        else:
            got = e.get("input")  # a section's own check gets the whole section: not worth echoing
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {field}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "\n".join(lines)


def load_config(model: type[BaseModel], path: str | Path | None = None, overrides: list[str] = ()) -> BaseModel:
    """Load a YAML file (optional), apply dotted overrides, validate into `model`."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (try configs/demo.yaml)")
        try:
            data = yaml.load(p.read_text(), Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if data is None:
            print(f"warning: config file {str(path)!r} is empty: every setting is the default", file=sys.stderr)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values (sections shard, "
                              f"train, label, tune), not a {type(data).__name__}")
        source = str(path)
    data = apply_overrides(data, list(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, source)) from None
