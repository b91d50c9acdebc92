"""`model.init` from a run of ours: a pretraining export into a finetuning task's model, values
checked key by key; position tables resampled to the finetuning resolution; the sources a
config names are resolved (run folder, final/, checkpoint_*, official .pth) or refused by name."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining
from mplug.vision import resize_pos_embed
from mplug.vqa import MPlugForQuestionAnswering
from pipelines.train.config import ModelSection
from pipelines.train.init import check_sources, load_initial_weights, resolve_init

pytestmark = pytest.mark.unit


def _cfg(**overrides) -> MPlugConfig:
    return MPlugConfig.preset("tiny", queue_size=8, text_config={"vocab_size": 1024}, **overrides)


@pytest.fixture
def pretrained_run(tmp_path):
    torch.manual_seed(0)
    model = MPlugForPretraining(_cfg())
    model.save_pretrained(tmp_path / "run" / "final")
    return tmp_path / "run", model


def test_a_pretraining_export_initialises_a_vqa_model_at_another_resolution(pretrained_run) -> None:
    run, source = pretrained_run
    torch.manual_seed(1)
    target = MPlugForQuestionAnswering(_cfg(image_size=96))  # finetuning at 96 px, pretrained at 64
    lines = load_initial_weights(target, ModelSection(init=str(run)))
    assert len(lines) == 1 and "a run of ours" in lines[0] and "not used by this task's model" in lines[0]
    ours, theirs = target.state_dict(), source.state_dict()
    for key in ("text_encoder.layer.0.attention.self.query.weight", "fusion_encoder.layer.1.output.dense.bias",
                "text_decoder.layer.1.crossattention.self.key.weight", "visual_encoder.blocks.0.attn.qkv.weight"):  # fmt: skip
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    assert ours["visual_encoder.pos_embed"].shape == (1, 1 + 12 * 12, 128)
    torch.testing.assert_close(
        ours["visual_encoder.pos_embed"], resize_pos_embed(theirs["visual_encoder.pos_embed"], (12, 12))
    )


def test_sources_resolve_or_are_refused_by_name(pretrained_run, tmp_path) -> None:
    run, _ = pretrained_run
    assert resolve_init(str(run)).uri.endswith("final")  # a run folder: its final/
    assert resolve_init(str(run / "final")).kind == "run"
    official = tmp_path / "mplug_base.pth"
    torch.save({"model": {}}, official)
    assert resolve_init(str(official)).kind == "official"
    with pytest.raises(FileNotFoundError, match="neither an official checkpoint"):
        resolve_init(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="init_text"):
        check_sources(ModelSection(init_text=str(tmp_path)))
    assert check_sources(ModelSection()) == []


def _grounding_task(tmp_path, init: str, bin_init: str):
    from pipelines.tasks import task_class
    from pipelines.train.config import load_config
    from pipelines.train.launch import build_model_config

    job = load_config("jobs/configs/finetune_grounding_tiny.yaml",
                      {"model.init": init, "grounding.bin_init": bin_init, "model.overrides.box_bins": 9})  # fmt: skip
    return task_class("grounding")(job, build_model_config(job))


def _bin_rows(model) -> torch.Tensor:
    from mplug.grounding import FIRST_BIN_TOKEN_ID

    weight = model.text_decoder.embeddings.word_embeddings.weight
    return weight[FIRST_BIN_TOKEN_ID : FIRST_BIN_TOKEN_ID + model.num_bins].detach().clone()


def test_grounding_bins_start_ordinal_from_a_pretraining_and_stay_trained_from_a_grounding_run(
    tmp_path,
) -> None:
    from mplug.grounding import ordinal_bin_code
    from pipelines.train.init import load_run_weights

    run = tmp_path / "pretrain"
    task = _grounding_task(tmp_path, str(run), "ordinal")
    torch.manual_seed(0)
    MPlugForPretraining(task.model_config).save_pretrained(run / "final")
    model = task.build_model()
    load_run_weights(model, str(run / "final"))
    loaded = _bin_rows(model)
    lines = task.after_initial_weights(model, resolve_init(str(run)).architecture)
    assert "ordinal code" in lines[0]
    written = _bin_rows(model)
    assert not torch.equal(written, loaded)
    torch.testing.assert_close(
        torch.nn.functional.normalize(written, dim=1), ordinal_bin_code(9, written.shape[1])
    )

    # A grounding model's own bins are trained: continuing from it keeps them.
    with torch.no_grad():
        model.text_decoder.embeddings.word_embeddings.weight.add_(0.5)
    model.save_pretrained(tmp_path / "grounding" / "final")
    again = _grounding_task(tmp_path, str(tmp_path / "grounding"), "ordinal")
    continued = again.build_model()
    load_run_weights(continued, str(tmp_path / "grounding" / "final"))
    architecture = resolve_init(str(tmp_path / "grounding")).architecture
    assert "kept as trained" in again.after_initial_weights(continued, architecture)[0]
    torch.testing.assert_close(_bin_rows(continued), written + 0.5)

    # `keep` (the default, official) leaves the loaded rows alone.
    official = _grounding_task(tmp_path, str(run), "keep")
    kept = official.build_model()
    load_run_weights(kept, str(run / "final"))
    assert official.after_initial_weights(kept, resolve_init(str(run)).architecture) == []
    torch.testing.assert_close(_bin_rows(kept), loaded)


def _planned_grounding(tmp_path, init: str, bin_init: str):
    """`plan_run` of a grounding finetuning from `init` on a stand-in ingest output."""
    import json

    from pipelines.train.config import load_config
    from pipelines.train.launch import plan_run

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "stats.json").write_text(json.dumps({"written": 64}))
    job = load_config("jobs/configs/finetune_grounding_tiny.yaml", {
        "model.init": init, "grounding.bin_init": bin_init, "data.uris": [str(data)], "data.eval_uris": [],
        "run.storage": str(tmp_path / "runs"),
    })  # fmt: skip
    return plan_run(job)


def test_a_checkpoint_folder_as_init_is_resolved_by_the_plan_before_ray(tmp_path) -> None:
    """`--init STORAGE/RUN/checkpoint_N`: the plan reads which model it holds (its config.json,
    written with every checkpoint); one without (an older checkpoint) is refused by the plan when
    the task must know, never on the workers."""
    from mplug.grounding import MPlugForGrounding
    from pipelines.train.config import ConfigError
    from pipelines.train.loop import _config_json

    task = _grounding_task(tmp_path, "unused", "ordinal")
    model = MPlugForGrounding(task.model_config)
    checkpoint = tmp_path / "run" / "checkpoint_00000040"
    model.save_pretrained(checkpoint)  # model.safetensors
    (checkpoint / "config.json").write_text(_config_json(model))  # as the loop writes it
    plan = _planned_grounding(tmp_path, str(checkpoint), "ordinal")
    assert plan.init_architecture == "MPlugForGrounding"
    assert any("checkpoint_00000040" in line for line in plan.weight_sources)

    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="does not say whether it holds a grounding model"):
        _planned_grounding(tmp_path, str(checkpoint), "ordinal")
    assert _planned_grounding(tmp_path, str(checkpoint), "keep").init_architecture is None
