from pathlib import Path

import pytest

from lm_lexicon.config import ConfigError, PipelineConfig, config_from_dict, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "llama3-8b-3dex.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.partition.n_experts >= 1


def test_tiny_is_the_offline_cpu_default():
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert cfg.embed.model == "bundled-minilm"
    assert cfg.seed_model.name == "bundled-smollm2" == load_config(None).seed_model.name  # a pretrained LM
    assert not cfg.resources.use_gpu and cfg.train.deepspeed is None
    assert [s.format for s in cfg.data.sources] == ["wordnet"]


def test_paper_recipe_has_table_12_hyperparameters():
    t = load_config(REPO / "configs/llama3-8b-3dex.yaml").train
    assert (t.max_length, t.adam_betas, t.schedule, t.warmup_ratio) == (128, (0.9, 0.95), "cosine", 0.1)
    assert (t.weight_decay, t.grad_clip, t.dropout, t.seeds, t.lr) == (0.01, 1.0, 0.1, [21, 42, 84], 5e-6)


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "configs/tiny.yaml",
                      ["partition.n_experts=8", "train.adam_betas=[0.8,0.99]", "evaluate.split=valid"])
    assert cfg.partition.n_experts == 8
    assert cfg.train.adam_betas == (0.8, 0.99)
    assert cfg.evaluate.split == "valid"


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x", "a.d=true", "a.e=null"]) == [
        ("a.b", 1), ("a.c", "x"), ("a.d", True), ("a.e", None)]
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["partition.n_experts"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["partition..n=1"])


@pytest.mark.parametrize("overrides, message", [
    (["partition.method=none"], "means one domain"),
    (["partiton.n_experts=2"], "partiton: unknown field"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio"),
    (["train.adam_betas=[0.9,1.2]"], "adam_betas must lie in"),
    (["train.seeds=[1,1]"], "seeds repeat"),
    (["merge.routing=token", "merge.top_k=5"], "exceeds partition.n_experts"),
    (["train.deepspeed=configs/deepspeed/zero3.json"], "DeepSpeed is used only on GPUs"),
    (["resources.use_gpu=true"], "gpus_per_worker is 0"),
    (["data.sources=[{format: table, path: x.csv}]"], "needs columns"),
    (["data.sources=[{format: 3dex}]"], "needs a 'path'"),
    (["data.sources=[{format: wordnet, lang: xx}]"], "unknown language"),
    (["data.sources=[]"], "at least one data source"),
    (["partition.n_experts=0"], "partition.n_experts"),
])
def test_contradictions_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", overrides)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        config_from_dict({"name": "x"}, ["name.sub=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)


def test_stage_hash_tracks_only_its_sections():
    a = load_config(None)
    b = load_config(None, ["train.lr=0.001"])
    assert a.stage_hash("partition") == b.stage_hash("partition")
    assert a.stage_hash("train") != b.stage_hash("train")


def test_every_field_is_documented():
    from pydantic import BaseModel

    def walk(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann)
            else:
                yield model.__name__, name, field.description

    undocumented = [(m, n) for m, n, d in walk(PipelineConfig) if not d]
    assert undocumented == []


def test_fields_added_later_keep_their_defaults():
    """A field marked ADDED_LATER is left out of fingerprints at its default, so a changed default would make runs
    at the old and the new default look alike: the defaults are pinned here."""
    import lm_lexicon.config as config

    marked = {f"{cls.__name__}.{name}": field.get_default(call_default_factory=True)
              for cls in vars(config).values() if isinstance(cls, type) and issubclass(cls, config._Strict)
              for name, field in cls.model_fields.items() if field.json_schema_extra == config.ADDED_LATER}
    assert marked == {"SourceSpec.dictionary": None, "SourceSpec.dictd_dir": None, "SourceSpec.genre": None,
                      "SourceSpec.max_rows": None, "PartitionConfig.features": "prompt",
                      "PartitionConfig.classifier_c": 0.3, "RewardConfig.neighbours": 32, "EvalConfig.misrouted": False,
                      "EvalConfig.num_beams": 1, "EvalConfig.length_penalty": 1.0}
