"""Checkpoints: our save/load round trip, and the official mPLUG checkpoints (pretraining and every
task model's layout, written out here from the official module names) through the checkpoint filter."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining, load_official_checkpoint
from mplug.official import MOMENTUM_NOT_KEPT, UNUSED
from tests.unit.test_init_sources import clip_text_layout, clip_visual_layout

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: OpenMP threads spinning against other processes on a shared 2-core
    box made these models several times slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**overrides) -> MPlugForPretraining:
    """Tiny with a 1,024-id vocabulary: the layouts are the same, the tensors far smaller."""
    torch.manual_seed(0)
    text = {"vocab_size": 1024, **overrides.pop("text_config", {})}
    overrides = {"queue_size": 32} | overrides
    return MPlugForPretraining(MPlugConfig.preset("tiny", text_config=text, **overrides))


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    model = _tiny()
    x = model.example_inputs(2)
    model.momentum_update(model(**x))  # non-trivial queue and pointer
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = MPlugForPretraining.from_pretrained(tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.eval()
    loaded.eval()
    torch.manual_seed(4)
    a = model(**x)
    torch.manual_seed(4)
    b = loaded(**x)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(model.generate(x["images"], max_length=5), loaded.generate(x["images"], max_length=5))


# ---- official layouts, written out here from X-PLUG/mPLUG's module names ----------------------
# Which official modules each task model holds (models/model_*_mplug.py, and the pretraining
# model the `mplug_*.pth` files come from), online and as momentum copies.
OFFICIAL_TASKS: dict[str, tuple[set[str], set[str]]] = {
    "pretrain": ({"vision", "text", "fusion", "mlm", "decoder", "proj", "itm", "queues"},
                 {"vision", "text", "fusion", "mlm", "decoder", "proj"}),
    "vqa": ({"vision", "text", "fusion", "decoder"}, {"vision", "text", "fusion", "decoder"}),
    "caption": ({"vision", "text", "fusion", "decoder"}, set()),
    "retrieval": ({"vision", "text", "fusion", "proj", "itm", "queues", "idx_queue"},
                  {"vision", "text", "fusion", "proj"}),
    "grounding": ({"vision", "text", "fusion", "decoder", "proj", "grounding"}, set()),
}  # fmt: skip


def _bert_layer(prefix: str, d: int, ffn: int, cross: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for block in ("attention", "crossattention") if cross else ("attention",):
        for proj in ("query", "key", "value"):
            shapes[f"{prefix}.{block}.self.{proj}.weight"] = (d, d)
            shapes[f"{prefix}.{block}.self.{proj}.bias"] = (d,)
        shapes[f"{prefix}.{block}.output.dense.weight"] = (d, d)
        shapes[f"{prefix}.{block}.output.dense.bias"] = (d,)
        shapes[f"{prefix}.{block}.output.LayerNorm.weight"] = (d,)
        shapes[f"{prefix}.{block}.output.LayerNorm.bias"] = (d,)
    shapes[f"{prefix}.intermediate.dense.weight"] = (ffn, d)
    shapes[f"{prefix}.intermediate.dense.bias"] = (ffn,)
    shapes[f"{prefix}.output.dense.weight"] = (d, ffn)
    shapes[f"{prefix}.output.dense.bias"] = (d,)
    shapes[f"{prefix}.output.LayerNorm.weight"] = (d,)
    shapes[f"{prefix}.output.LayerNorm.bias"] = (d,)
    return shapes


def _bert_embeddings(prefix: str, vocab: int, d: int, positions: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.word_embeddings.weight": (vocab, d),
        f"{prefix}.position_embeddings.weight": (positions, d),
        f"{prefix}.token_type_embeddings.weight": (2, d),
        f"{prefix}.LayerNorm.weight": (d,),
        f"{prefix}.LayerNorm.bias": (d,),
        f"{prefix}.position_ids": (1, positions),
    }


def _lm_head(prefix: str, vocab: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.predictions.bias": (vocab,),
        f"{prefix}.predictions.transform.dense.weight": (d, d),
        f"{prefix}.predictions.transform.dense.bias": (d,),
        f"{prefix}.predictions.transform.LayerNorm.weight": (d,),
        f"{prefix}.predictions.transform.LayerNorm.bias": (d,),
        f"{prefix}.predictions.decoder.weight": (vocab, d),
    }


def official_layout(cfg: MPlugConfig, grid: int, task: str = "pretrain") -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official mPLUG checkpoint of `task` for `cfg`. The pretraining model
    wraps the text towers as `text_encoder.bert.` / `fusion_encoder.fusion.`; the task models use
    a bare `BertModel` / `FusionModel`. The fusion model holds a full BERT depth (every layer with
    cross-attention) and runs its last `fusion_layers`."""
    online, momentum = OFFICIAL_TASKS[task]
    wrapped = task == "pretrain"
    t, v = cfg.text_config, cfg.vision_config
    d, ffn, vocab, pos = t.hidden_size, t.intermediate_size, t.vocab_size, t.max_position_embeddings
    shapes: dict[str, tuple[int, ...]] = {}
    for m, parts in (("", online), ("_m", momentum)):
        if "vision" in parts:
            shapes |= clip_visual_layout(f"visual_encoder{m}.visual", v.hidden_size, v.num_hidden_layers,
                                         v.patch_size, v.intermediate_size, grid)  # fmt: skip
            shapes |= clip_text_layout(f"visual_encoder{m}")  # CLIP's text tower rides along, never used
            if cfg.use_visual_adapter:
                shapes |= {f"visn_fc{m}.weight": (d, v.hidden_size), f"visn_fc{m}.bias": (d,),
                           f"visn_layer_norm{m}.weight": (d,), f"visn_layer_norm{m}.bias": (d,)}  # fmt: skip
        if "text" in parts:
            text = f"text_encoder{m}.bert" if wrapped else f"text_encoder{m}"
            shapes |= _bert_embeddings(f"{text}.embeddings", vocab, d, pos)
            for i in range(cfg.text_layers):
                shapes |= _bert_layer(f"{text}.encoder.layer.{i}", d, ffn, cross=False)
        if "fusion" in parts:
            fusion = f"fusion_encoder{m}.fusion" if wrapped else f"fusion_encoder{m}"
            shapes |= _bert_embeddings(f"{fusion}.embeddings", vocab, d, pos)
            for i in range(t.num_hidden_layers):
                shapes |= _bert_layer(f"{fusion}.encoder.layer.{i}", d, ffn, cross=True)
        if "mlm" in parts:
            shapes |= _lm_head(f"fusion_encoder{m}.cls", vocab, d)
        if "decoder" in parts:
            shapes |= _bert_embeddings(f"text_decoder{m}.bert.embeddings", vocab, d, pos)
            for i in range(cfg.decoder_layers):
                shapes |= _bert_layer(f"text_decoder{m}.bert.encoder.layer.{i}", d, ffn, cross=True)
            shapes |= _lm_head(f"text_decoder{m}.cls", vocab, d)
        if "proj" in parts:
            for proj in ("vision_proj", "text_proj"):
                shapes |= {f"{proj}{m}.weight": (cfg.embed_dim, d), f"{proj}{m}.bias": (cfg.embed_dim,)}
        if "itm" in parts:
            shapes |= {f"itm_head{m}.weight": (2, d), f"itm_head{m}.bias": (2,)}
    if "queues" in online:
        q = (cfg.embed_dim, cfg.queue_size)
        shapes |= {"temp": (), "image_queue": q, "text_queue": q, "queue_ptr": (1,)}
    if "idx_queue" in online:
        shapes["idx_queue"] = (1, cfg.queue_size)
    if "grounding" in online:
        shapes |= {"prefix_ids": (1,), "target_ids": (cfg.image_size + 1,), "bbox_prob_mask": (vocab,)}
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for key in ("queue_ptr", "idx_queue", "prefix_ids", "target_ids"):
        if key in sd:
            sd[key] = torch.randint(0, 30, shapes[key], generator=g)
    if "queue_ptr" in sd:
        sd["queue_ptr"] = torch.tensor([7])
    if "temp" in sd:
        sd["temp"] = torch.tensor(0.05)
    return sd


def _unwrapped(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official keys with the pretraining wrappers dropped, as the task scripts do."""
    renames = (("text_encoder.bert.", "text_encoder."), ("fusion_encoder.fusion.", "fusion_encoder."))
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def _assert_towers_land(model: MPlugForPretraining, sd: dict[str, torch.Tensor]) -> None:
    """Spot checks, one per mapping rule, of the online towers."""
    ours, plain, cfg = model.state_dict(), _unwrapped(sd), model.config
    w = cfg.vision_config.hidden_size
    assert torch.equal(
        ours["visual_encoder.cls_token"], sd["visual_encoder.visual.class_embedding"].view(1, 1, w)
    )
    assert ours["visual_encoder.pos_embed"].shape == (1, cfg.num_visual_tokens, w)  # resized 37 -> 65
    assert torch.equal(
        ours["visual_encoder.pos_embed"][0, 0], sd["visual_encoder.visual.positional_embedding"][0]
    )
    assert torch.equal(
        ours["visual_encoder.blocks.1.attn.qkv.weight"],
        sd["visual_encoder.visual.transformer.resblocks.1.attn.in_proj_weight"],
    )
    assert torch.equal(
        ours["visual_encoder.blocks.0.mlp.fc2.bias"],
        sd["visual_encoder.visual.transformer.resblocks.0.mlp.c_proj.bias"],
    )
    assert torch.equal(ours["visual_encoder.norm.weight"], sd["visual_encoder.visual.ln_post.weight"])
    assert torch.equal(
        ours["text_encoder.layer.1.attention.output.LayerNorm.bias"],
        plain["text_encoder.encoder.layer.1.attention.output.LayerNorm.bias"],
    )
    assert torch.equal(
        ours["text_encoder.embeddings.word_embeddings.weight"],
        plain["text_encoder.embeddings.word_embeddings.weight"],
    )
    # Fusion layer i <- official fusion layer (depth - fusion_layers + i): here 4 - 2 + i.
    start = cfg.text_config.num_hidden_layers - cfg.fusion_layers
    for i in range(cfg.fusion_layers):
        assert torch.equal(
            ours[f"fusion_encoder.layer.{i}.attention.self.query.weight"],
            plain[f"fusion_encoder.encoder.layer.{start + i}.attention.self.query.weight"],
        )
    assert torch.equal(
        ours["fusion_encoder.layer.0.crossattention.self.key.weight"],
        plain[f"fusion_encoder.encoder.layer.{start}.crossattention.self.key.weight"],
    )
    if "text_decoder.cls.predictions.bias" in sd:
        assert torch.equal(ours["text_decoder.head.bias"], sd["text_decoder.cls.predictions.bias"])
        assert torch.equal(
            ours["text_decoder.embeddings.word_embeddings.weight"],
            sd["text_decoder.bert.embeddings.word_embeddings.weight"],
        )
        assert torch.equal(
            ours["text_decoder.layer.1.crossattention.output.dense.weight"],
            sd["text_decoder.bert.encoder.layer.1.crossattention.output.dense.weight"],
        )
    if cfg.use_visual_adapter:
        assert torch.equal(ours["visual_adapter.fc.weight"], sd["visn_fc.weight"])


@pytest.mark.parametrize("adapter", [False, True])
def test_pretraining_checkpoint_loads_every_tensor(adapter: bool, tmp_path) -> None:
    overrides = {"use_visual_adapter": True, "vision_config": {"hidden_size": 192}} if adapter else {}
    model = _tiny(**overrides)
    cfg = model.config
    sd = random_state_dict(official_layout(cfg, grid=6))  # pretrained at 48 px: a 6 x 6 grid
    path = tmp_path / "mplug_tiny.pth"
    # As training scripts save it: the weights beside the run's args, config and best score.
    extra = {
        "epoch": 29,
        "config": {"image_res": 48},
        "args": argparse.Namespace(lr=1e-4),
        "best": np.float64(0.7),
    }
    torch.save({"model": sd, **extra}, path)
    report = load_official_checkpoint(model, str(path))

    assert report.left_at_init == [] and report.resynced == []
    assert set(report.loaded) | set(report.ignored) == set(sd)
    _assert_towers_land(model, sd)
    ours = model.state_dict()
    assert torch.equal(ours["visual_encoder_m.norm.weight"], sd["visual_encoder_m.visual.ln_post.weight"])
    assert torch.equal(ours["text_encoder_m.layer.0.output.dense.weight"],
                       sd["text_encoder_m.bert.encoder.layer.0.output.dense.weight"])  # fmt: skip
    assert torch.equal(
        ours["mlm_head.transform.dense.weight"], sd["fusion_encoder.cls.predictions.transform.dense.weight"]
    )
    assert torch.equal(ours["itm_head.weight"], sd["itm_head.weight"])
    assert torch.equal(ours["text_queue"], sd["text_queue"]) and int(ours["queue_ptr"]) == 7
    assert float(model.temp.detach()) == pytest.approx(0.05)
    if adapter:
        assert torch.equal(ours["visual_adapter_m.norm.bias"], sd["visn_layer_norm_m.bias"])
    reasons = report.ignored
    assert reasons["visual_encoder.token_embedding.weight"].startswith("CLIP text tower")
    assert reasons["visual_encoder_m.visual.proj"].startswith("CLIP output projection")
    assert reasons["fusion_encoder.fusion.encoder.layer.0.output.dense.weight"].startswith(
        "fusion layers the official"
    )
    assert (
        reasons["fusion_encoder.fusion.embeddings.word_embeddings.weight"] == "fusion embeddings (never run)"
    )
    assert reasons["text_decoder_m.cls.predictions.bias"] == MOMENTUM_NOT_KEPT
    assert reasons["fusion_encoder_m.cls.predictions.bias"] == MOMENTUM_NOT_KEPT
    # Tiny's fusion layer 1 is connected: its official cross-attention is never run.
    assert reasons["fusion_encoder.fusion.encoder.layer.3.crossattention.self.key.weight"].startswith(
        "cross-attention of a connected"
    )
    line = str(report)
    assert "\n" not in line and f"{len(report.loaded)} tensors loaded" in line and "0 left at init" in line
    assert torch.isfinite(model(**model.example_inputs(2)).loss)


@pytest.mark.parametrize("with_fusion_head", [False, True])
def test_momentum_mlm_heads_never_overwrite_the_online_head(with_fusion_head: bool) -> None:
    """The pretraining checkpoint may hold the MLM head under the text encoder too, online and
    momentum, with different values; the momentum one comes last in the file."""
    model = _tiny()
    d, vocab = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    sd = random_state_dict(official_layout(model.config, grid=8))
    if not with_fusion_head:
        sd = {
            k: v for k, v in sd.items() if not k.startswith(("fusion_encoder.cls.", "fusion_encoder_m.cls."))
        }
    text_heads = random_state_dict(_lm_head("text_encoder.cls", vocab, d), seed=1)
    momentum_heads = random_state_dict(_lm_head("text_encoder_m.cls", vocab, d), seed=2)
    report = load_official_checkpoint(model, sd | text_heads | momentum_heads)

    online = (
        sd["fusion_encoder.cls.predictions.bias"]
        if with_fusion_head
        else text_heads["text_encoder.cls.predictions.bias"]
    )
    assert torch.equal(model.mlm_head.bias, online)
    assert not torch.equal(model.mlm_head.bias, momentum_heads["text_encoder_m.cls.predictions.bias"])
    # Beside a fusion-encoder head, both text-encoder heads are unused; alone, the momentum one has
    # no place in a model without a momentum MLM head.
    unused = "text encoder's MLM head" if with_fusion_head else MOMENTUM_NOT_KEPT
    assert report.ignored["text_encoder_m.cls.predictions.bias"].startswith(unused)
    assert report.ignored["text_encoder_m.cls.predictions.transform.dense.weight"].startswith(unused)
    if with_fusion_head:
        assert report.ignored["text_encoder.cls.predictions.bias"].startswith("text encoder's MLM head")
    assert report.left_at_init == []


# The official task scripts' checkpoints: how each saves its state dict.
def _saved_like_the_task_script(task: str, sd: dict[str, torch.Tensor]) -> dict:
    if task == "vqa":  # DeepSpeed `save_checkpoint`: mp_rank_00_model_states.pt
        return {"module": sd, "global_steps": 100, "ds_version": "0.5.8"}
    if task == "caption":  # a DDP-wrapped model's state dict (caption_mplug_scst.py strips `module.`)
        return {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 4}
    return {"model": sd, "epoch": 7}


EXPECTED_LEFT_AT_INIT = {
    "vqa": {"vision_proj", "text_proj", "itm_head", "temp", "image_queue", "text_queue", "queue_ptr",
            "mlm_head", "vision_proj_m", "text_proj_m"},
    "caption": {"vision_proj", "text_proj", "itm_head", "temp", "image_queue", "text_queue", "queue_ptr",
                "mlm_head", "vision_proj_m", "text_proj_m"},
    "retrieval": {"text_decoder", "mlm_head"},
    "grounding": {"itm_head", "temp", "image_queue", "text_queue", "queue_ptr", "mlm_head"},
}  # fmt: skip


@pytest.mark.parametrize("task", ["vqa", "caption", "retrieval", "grounding"])
def test_task_checkpoints_load_into_the_pretraining_model(task: str, tmp_path) -> None:
    model = _tiny()
    sd = random_state_dict(official_layout(model.config, grid=6, task=task))
    path = tmp_path / f"{task}.pth"
    saved = _saved_like_the_task_script(task, sd)
    torch.save(saved, path)
    report = load_official_checkpoint(model, f"file://{path}")

    file_keys = set(saved.get("module") or saved["model"])
    assert set(report.loaded) | set(report.ignored) == file_keys
    assert {k.split(".")[0] for k in report.left_at_init} == EXPECTED_LEFT_AT_INIT[task]
    _assert_towers_land(model, sd)
    ours = model.state_dict()
    if "visual_encoder_m.visual.ln_post.weight" in sd:  # the file's own momentum tower, not a copy
        assert torch.equal(ours["visual_encoder_m.norm.weight"], sd["visual_encoder_m.visual.ln_post.weight"])
        assert not torch.equal(ours["visual_encoder_m.norm.weight"], ours["visual_encoder.norm.weight"])
    else:  # re-synced from the online tower just loaded
        assert torch.equal(ours["visual_encoder_m.norm.weight"], ours["visual_encoder.norm.weight"])
        assert "visual_encoder_m.norm.weight" in report.resynced
    if task == "vqa":
        assert report.ignored["fusion_encoder_m.encoder.layer.3.output.dense.bias"] == (MOMENTUM_NOT_KEPT)
        assert report.ignored["text_decoder_m.bert.encoder.layer.0.output.dense.bias"] == (MOMENTUM_NOT_KEPT)
    if task == "retrieval":
        assert torch.equal(ours["itm_head.weight"], sd["itm_head.weight"])
        assert report.ignored["idx_queue"] == UNUSED  # no id queue in pretraining
    if task == "grounding":
        assert report.ignored["bbox_prob_mask"].startswith("grounding start/bin token ids")
        assert torch.equal(ours["vision_proj_m.weight"], sd["vision_proj.weight"])


def test_heads_the_model_lacks_are_ignored_as_unused() -> None:
    model = _tiny(use_itm=False, use_mlm=False)
    sd = random_state_dict(official_layout(model.config, grid=8))
    report = load_official_checkpoint(model, sd)
    assert report.ignored["itm_head.weight"] == UNUSED
    assert report.ignored["fusion_encoder.cls.predictions.transform.dense.weight"] == UNUSED
    assert report.left_at_init == []


def test_unknown_key_is_an_error_and_nothing_loads() -> None:
    model = _tiny()
    before = model.text_proj.weight.detach().clone()
    sd = random_state_dict(official_layout(model.config, grid=8)) | {"some_head.weight": torch.zeros(3)}
    with pytest.raises(
        ValueError, match=r"1 keys this filter does not know: some_head\.weight\. It reads official"
    ):
        load_official_checkpoint(model, sd)
    assert torch.equal(model.text_proj.weight, before)


def test_shape_and_depth_mismatches_name_the_key() -> None:
    model = _tiny()
    sd = random_state_dict(official_layout(model.config, grid=8))
    with pytest.raises(ValueError, match=r"text_proj\.weight \(5, 5\) -> text_proj\.weight \(128, 128\)"):
        load_official_checkpoint(model, sd | {"text_proj.weight": torch.zeros(5, 5)})
    d, ffn = model.config.text_config.hidden_size, model.config.text_config.intermediate_size
    extra = random_state_dict(_bert_layer("text_encoder.bert.encoder.layer.2", d, ffn, cross=False))
    with pytest.raises(
        ValueError, match=r"text_encoder\.bert\.encoder\.layer\.2\..* text_encoder\.layer has 2 layers"
    ):
        load_official_checkpoint(model, sd | extra)
    fewer = {k: v for k, v in sd.items() if not k.startswith("text_decoder.bert.encoder.layer.1.")}
    with pytest.raises(ValueError, match=r"fills text_decoder\.layer layers \[0\] but the model has 2"):
        load_official_checkpoint(model, fewer)


def test_queues_of_another_size_keep_their_init() -> None:
    model = _tiny(queue_size=16)
    ptr = model.queue_ptr.clone()
    sd = random_state_dict(official_layout(_tiny().config, grid=8))  # queues of 32
    report = load_official_checkpoint(model, sd)
    assert report.ignored["image_queue"].startswith("feature queues of another size")
    assert report.ignored["queue_ptr"] == report.ignored["image_queue"]
    assert torch.equal(model.queue_ptr, ptr)
    assert set(report.left_at_init) == {"image_queue", "text_queue", "queue_ptr"}


def test_merged_fusion_drops_every_official_cross_attention() -> None:
    model = _tiny(fusion_mode="merged")
    sd = random_state_dict(official_layout(model.config, grid=8))
    report = load_official_checkpoint(model, sd)
    dropped = [k for k, why in report.ignored.items() if why.startswith("cross-attention of a connected")]
    assert {k.split(".")[4] for k in dropped} == {"2", "3"}  # official layers 2, 3 = our fusion 0, 1
    assert report.left_at_init == []


def test_without_momentum_weights_ema_starts_from_online() -> None:
    model = _tiny()
    sd = {k: v for k, v in random_state_dict(official_layout(model.config, grid=8)).items() if "_m." not in k}
    report = load_official_checkpoint(model, sd)
    assert report.left_at_init == [] and report.resynced
    assert torch.equal(
        model.text_encoder_m.layer[0].output.dense.weight, model.text_encoder.layer[0].output.dense.weight
    )
    assert torch.equal(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
