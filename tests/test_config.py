import pytest

from clustering.config import ConfigError, PipelineConfig, TrainConfig, load_config


def test_unknown_key_names_the_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"train\.kk: unknown key"):
        load_config(PipelineConfig, f)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"train\.k: .*'many'"):
        load_config(PipelineConfig, None, ["train.k=many"])


def test_overrides_are_typed_and_paths_follow_work_dir():
    cfg = load_config(PipelineConfig, None, ["train.k=12", "train.lr=3e-4", "work_dir=s3://b/run"])
    assert cfg.train.k == 12 and cfg.train.lr == 3e-4
    assert cfg.shard.output == "s3://b/run/shards" and cfg.train.shards == "s3://b/run/shards"
    assert cfg.label.output == "s3://b/run/assignments"


def test_explicit_path_wins_over_work_dir():
    cfg = load_config(PipelineConfig, None, ["work_dir=w", "label.output=elsewhere"])
    assert cfg.label.output == "elsewhere" and cfg.train.storage_path == "w/runs"


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["k"])


def test_demo_config_is_valid():
    cfg = load_config(PipelineConfig, "configs/demo.yaml")
    assert cfg.shard.source == "sklearn:digits"


def test_tune_space_names_train_keys_and_follows_work_dir():
    cfg = load_config(PipelineConfig, "configs/demo.yaml", ["work_dir=/tmp/w", "tune.space={k: [8, 10]}"])
    assert cfg.tune.space == {"k": [8, 10]} and cfg.tune.output == "/tmp/w/tune"
    with pytest.raises(ConfigError, match="'kk'.*not train keys"):
        load_config(PipelineConfig, None, ["tune.space={kk: [8, 10]}"])
