import pytest

from clustering.config import ConfigError, PipelineConfig, TrainConfig, load_config, train_section, trial_config


@pytest.mark.parametrize("text, message", [
    ("train:\n  kk: 3\n", r"train\.kk: unknown key"),
    ("train:\n  k: 5\n  lr: 0.001\n  k: 7\n", r"key 'k' appears twice \(lines 2 and 4\)"),  # YAML keeps the last
])
def test_an_unknown_or_repeated_key_is_refused_naming_it(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
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
    with pytest.raises(ConfigError, match="'kk'.*neither train keys nor any method's settings"):
        load_config(PipelineConfig, None, ["tune.space={kk: [8, 10]}"])


def test_each_method_has_its_own_settings_in_yaml_or_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  method:\n    name: nmm\n    heads: 5\n  k: 7\n")
    cfg = load_config(PipelineConfig, f, ["train.method.over_k=30"]).train
    assert (cfg.method.name, cfg.method.heads, cfg.method.over_k, cfg.k) == ("nmm", 5, 30, 7)
    # `method: vc` is the method with its defaults; a setting given after it joins them
    cfg = load_config(PipelineConfig, None, ["train.method=vc", "train.method.balance_weight=0.5"]).train
    assert (cfg.method.name, cfg.method.balance_weight, cfg.method.code_dim) == ("vc", 0.5, 16)
    # naming the method already chosen keeps its settings; another one keeps only those it shares
    cfg = load_config(PipelineConfig, f, ["train.method=nmm"]).train
    assert cfg.method.heads == 5
    cfg = load_config(PipelineConfig, None, ["train.method.pretrain_epochs=7", "train.method.rec_weight=2",
                                             "train.method=dec"]).train
    assert (cfg.method.name, cfg.method.pretrain_epochs) == ("dec", 7) and not hasattr(cfg.method, "rec_weight")


def test_a_setting_of_another_method_is_refused_naming_it_and_its_owner():
    with pytest.raises(ConfigError, match=r"train\.method\.heads: not a setting of method dcec \(a setting of nmm\)"):
        load_config(PipelineConfig, None, ["train.method=dcec", "train.method.heads=5"])
    with pytest.raises(ConfigError, match=r"train\.method\.rec_weight: not a setting of method vc \(a setting of dcec, idec\)"):
        load_config(PipelineConfig, None, ["train.method=vc", "train.method.rec_weight=1"])
    with pytest.raises(ConfigError, match="'heads' is not a setting of method dcec"):
        TrainConfig.of(method="dcec", heads=2)
    with pytest.raises(ConfigError, match="encoder=resnet18 does not fit method dcec"):
        load_config(PipelineConfig, None, ["train.method=dcec", "train.encoder=resnet18"])


def test_a_tune_space_key_the_trials_method_ignores_is_refused():
    nmm = TrainConfig.of(method="nmm")
    assert trial_config(nmm, {"heads": 3, "k": 8}).method.heads == 3  # flat names reach the method's settings
    assert trial_config(nmm, {"method.heads": 3}).method.heads == 3
    with pytest.raises(ConfigError, match="the trial {'rec_weight': 1}: 'rec_weight' is not a setting of method nmm"):
        trial_config(nmm, {"rec_weight": 1})
    with pytest.raises(ConfigError, match="'heads' is not a setting of method vc"):
        trial_config(nmm, {"method": "vc", "heads": 2})  # a trial of another method, with a knob it lacks
    # the winner as YAML: settings under the method's name
    assert train_section({"k": 8, "heads": 3}, "nmm") == {"k": 8, "method": {"name": "nmm", "heads": 3}}


def test_a_trial_of_another_method_keeps_what_the_base_changed_and_takes_its_own_defaults():
    nmm = TrainConfig.of(method="nmm")
    assert trial_config(nmm, {"method": "vc"}).method.consistency_weight == 1.0  # vc's default, not nmm's 0.5
    changed = trial_config(nmm, {"consistency_weight": 2.0})
    assert trial_config(changed, {"method": "vc"}).method.consistency_weight == 2.0
    dcec = TrainConfig.of(method="dcec", pretrain_epochs=7)
    assert trial_config(dcec, {"method": "idec"}).method.pretrain_epochs == 7
    # as the tune job rebuilds its base from a dump, where every setting reads as given
    assert trial_config(TrainConfig(**nmm.model_dump()), {"method": "vc"}).method.consistency_weight == 1.0
    # and on the command line
    weight = lambda *sets: load_config(PipelineConfig, None, list(sets)).train.method.consistency_weight  # noqa: E731
    assert weight("train.method.consistency_weight=0.5", "train.method=vc") == 1.0
    assert weight("train.method.consistency_weight=2", "train.method=vc") == 2.0


def test_old_flat_keys_still_work_for_a_release_with_a_deprecation_message(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("train:\n  method: nmm\n  heads: 4\n  consistency_weight: 0.5\n  rec_weight: 3\n")
    cfg = load_config(PipelineConfig, f).train
    assert cfg.method.heads == 4 and cfg.method.consistency_weight == 0.5
    err = capsys.readouterr().err
    assert "train.heads is deprecated: write train.method.heads" in err
    assert "train.rec_weight is ignored: method nmm has no such setting" in err  # as it was ignored before
    # a checkpoint written before per-method settings: its flat config still reads
    old_spec = {"method": "dcec", "k": 10, "pretrain_epochs": 5, "rec_weight": 2.0, "heads": 1}
    cfg = TrainConfig(**old_spec)
    assert (cfg.method.name, cfg.method.pretrain_epochs, cfg.method.rec_weight) == ("dcec", 5, 2.0)


def test_shipped_configs_use_per_method_settings(capsys):
    for name in ("demo", "mnist", "cifar10"):
        load_config(PipelineConfig, f"configs/{name}.yaml")
    assert "deprecated" not in capsys.readouterr().err


def test_a_refused_work_dir_is_named_without_the_whole_config():
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, ["work_dir=s3://"])
    assert "names no bucket" in str(e.value) and "samples_per_shard" not in str(e.value) and len(str(e.value)) < 200
