"""Checkpoints: save/load round trip, the official mPLUG key layout, BERT initialisation."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining, init_text_from_bert, load_official_checkpoint
from mplug.tokenizer import packaged_model_dir

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
    return MPlugForPretraining(MPlugConfig.preset("tiny", queue_size=32, text_config=text, **overrides))


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


# ---- the official layout, written out here from X-PLUG/mPLUG's module names ---------------
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


def _clip_visual(prefix: str, cfg: MPlugConfig, grid: int) -> dict[str, tuple[int, ...]]:
    v = cfg.vision_config
    w, p = v.hidden_size, v.patch_size
    shapes = {
        f"{prefix}.class_embedding": (w,),
        f"{prefix}.positional_embedding": (grid * grid + 1, w),
        f"{prefix}.conv1.weight": (w, 3, p, p),
        f"{prefix}.ln_pre.weight": (w,),
        f"{prefix}.ln_pre.bias": (w,),
        f"{prefix}.ln_post.weight": (w,),
        f"{prefix}.ln_post.bias": (w,),
        f"{prefix}.proj": (w, 512),
    }
    for i in range(v.num_hidden_layers):
        b = f"{prefix}.transformer.resblocks.{i}"
        shapes |= {
            f"{b}.attn.in_proj_weight": (3 * w, w),
            f"{b}.attn.in_proj_bias": (3 * w,),
            f"{b}.attn.out_proj.weight": (w, w),
            f"{b}.attn.out_proj.bias": (w,),
            f"{b}.ln_1.weight": (w,),
            f"{b}.ln_1.bias": (w,),
            f"{b}.mlp.c_fc.weight": (v.intermediate_size, w),
            f"{b}.mlp.c_fc.bias": (v.intermediate_size,),
            f"{b}.mlp.c_proj.weight": (w, v.intermediate_size),
            f"{b}.mlp.c_proj.bias": (w,),
            f"{b}.ln_2.weight": (w,),
            f"{b}.ln_2.bias": (w,),
        }
    return shapes


def official_layout(cfg: MPlugConfig, grid: int, wrapped: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official mPLUG checkpoint for `cfg`: the pretraining layout wraps the text
    towers as `text_encoder.bert.` / `fusion_encoder.fusion.`; the finetuned (VQA) layout does not."""
    text, fusion = (
        ("text_encoder{m}.bert", "fusion_encoder.fusion")
        if wrapped
        else ("text_encoder{m}", "fusion_encoder")
    )
    t = cfg.text_config
    d, ffn, vocab, pos = t.hidden_size, t.intermediate_size, t.vocab_size, t.max_position_embeddings
    depth = t.num_hidden_layers
    shapes: dict[str, tuple[int, ...]] = {}
    for m in ("", "_m"):
        shapes |= _clip_visual(f"visual_encoder{m}.visual", cfg, grid)
        # CLIP's text tower rides along in the official visual_encoder and is never used.
        shapes |= {
            f"visual_encoder{m}.token_embedding.weight": (49408, 512),
            f"visual_encoder{m}.positional_embedding": (77, 512),
            f"visual_encoder{m}.transformer.resblocks.0.attn.in_proj_weight": (1536, 512),
            f"visual_encoder{m}.ln_final.weight": (512,),
            f"visual_encoder{m}.text_projection": (512, 512),
            f"visual_encoder{m}.logit_scale": (),
        }
        if cfg.use_visual_adapter:
            w = cfg.vision_config.hidden_size
            shapes |= {
                f"visn_fc{m}.weight": (d, w),
                f"visn_fc{m}.bias": (d,),
                f"visn_layer_norm{m}.weight": (d,),
                f"visn_layer_norm{m}.bias": (d,),
            }
        shapes |= _bert_embeddings(f"{text.format(m=m)}.embeddings", vocab, d, pos)
        for i in range(cfg.text_layers):
            shapes |= _bert_layer(f"{text.format(m=m)}.encoder.layer.{i}", d, ffn, cross=False)
        shapes |= {f"vision_proj{m}.weight": (cfg.embed_dim, d), f"vision_proj{m}.bias": (cfg.embed_dim,)}
        shapes |= {f"text_proj{m}.weight": (cfg.embed_dim, d), f"text_proj{m}.bias": (cfg.embed_dim,)}
    # Fusion: a full-depth BERT whose last `fusion_layers` layers run; every layer has cross-attention.
    shapes |= _bert_embeddings(f"{fusion}.embeddings", vocab, d, pos)
    for i in range(depth):
        shapes |= _bert_layer(f"{fusion}.encoder.layer.{i}", d, ffn, cross=True)
    shapes |= _lm_head("fusion_encoder.cls", vocab, d)
    shapes |= _bert_embeddings("text_decoder.bert.embeddings", vocab, d, pos)
    for i in range(cfg.decoder_layers):
        shapes |= _bert_layer(f"text_decoder.bert.encoder.layer.{i}", d, ffn, cross=True)
    shapes |= _lm_head("text_decoder.cls", vocab, d)
    shapes |= {"itm_head.weight": (2, d), "itm_head.bias": (2,), "temp": ()}
    shapes |= {"image_queue": (cfg.embed_dim, cfg.queue_size), "text_queue": (cfg.embed_dim, cfg.queue_size)}
    shapes |= {"queue_ptr": (1,)}
    return shapes


def _random_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["queue_ptr"] = torch.tensor([7])
    sd["temp"] = torch.tensor(0.05)
    return sd


@pytest.mark.parametrize(("adapter", "wrapped"), [(False, True), (True, False)])
def test_official_layout_loads_without_missing_or_unexpected(adapter: bool, wrapped: bool, tmp_path) -> None:
    overrides = {"use_visual_adapter": True, "vision_config": {"hidden_size": 192}} if adapter else {}
    model = _tiny(**overrides)
    cfg = model.config
    sd = _random_state_dict(official_layout(cfg, grid=6, wrapped=wrapped))  # trained at 48 px: 6x6 grid
    plain = {
        k.replace("text_encoder.bert.", "text_encoder.").replace(
            "fusion_encoder.fusion.", "fusion_encoder."
        ): v
        for k, v in sd.items()
    }
    path = tmp_path / "mplug_tiny.pth"
    torch.save({"model": sd}, path)
    missing, unexpected = load_official_checkpoint(model, str(path))
    assert missing == [] and unexpected == []

    ours = model.state_dict()
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
    assert torch.equal(ours["visual_encoder_m.norm.weight"], sd["visual_encoder_m.visual.ln_post.weight"])
    assert torch.equal(
        ours["text_encoder.layer.1.attention.output.LayerNorm.bias"],
        plain["text_encoder.encoder.layer.1.attention.output.LayerNorm.bias"],
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
    assert torch.equal(
        ours["mlm_head.transform.dense.weight"], sd["fusion_encoder.cls.predictions.transform.dense.weight"]
    )
    assert torch.equal(ours["text_decoder.head.bias"], sd["text_decoder.cls.predictions.bias"])
    assert torch.equal(
        ours["text_decoder.embeddings.word_embeddings.weight"],
        sd["text_decoder.bert.embeddings.word_embeddings.weight"],
    )
    assert torch.equal(
        ours["text_decoder.layer.1.crossattention.output.dense.weight"],
        sd["text_decoder.bert.encoder.layer.1.crossattention.output.dense.weight"],
    )
    assert torch.equal(ours["text_queue"], sd["text_queue"]) and int(ours["queue_ptr"]) == 7
    assert float(model.temp.detach()) == pytest.approx(0.05)
    if adapter:
        assert torch.equal(ours["visual_adapter.fc.weight"], sd["visn_fc.weight"])
        assert torch.equal(ours["visual_adapter_m.norm.bias"], sd["visn_layer_norm_m.bias"])
    out = model(**model.example_inputs(2))
    assert torch.isfinite(out.loss)


def test_official_loader_reports_unknown_keys_and_rejects_bad_shapes() -> None:
    model = _tiny()
    sd = _random_state_dict(official_layout(model.config, grid=8))
    sd["some_head.weight"] = torch.zeros(3)
    missing, unexpected = load_official_checkpoint(model, sd)
    assert unexpected == ["some_head.weight"] and missing == []
    del sd["some_head.weight"], sd["itm_head.bias"]
    sd["text_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"text_proj\.weight"):
        load_official_checkpoint(model, sd)


def test_without_momentum_weights_ema_starts_from_online() -> None:
    model = _tiny()
    sd = {
        k: v for k, v in _random_state_dict(official_layout(model.config, grid=8)).items() if "_m." not in k
    }
    missing, unexpected = load_official_checkpoint(model, sd)
    assert missing == [] and unexpected == []
    assert torch.equal(
        model.text_encoder_m.layer[0].output.dense.weight, model.text_encoder.layer[0].output.dense.weight
    )


def test_mini_initialises_from_packaged_minilm() -> None:
    """mini: text = MiniLM layers 0-2, fusion = 3-5, decoder = 0-5."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MPlugForPretraining(MPlugConfig.preset("mini", queue_size=16))
    folder = packaged_model_dir()
    missing, unexpected = model.init_text_from_bert(folder)
    assert unexpected == []
    # MiniLM is a bare BertModel (no MLM head): cross-attention and the LM heads stay new.
    assert missing and all(
        ".crossattention." in k or k.startswith(("text_decoder.head.", "mlm_head.")) for k in missing
    )
    assert any(".crossattention." in k for k in missing)
    bert = load_file(str(folder / "model.safetensors"))
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    ours = model.state_dict()
    q = "attention.self.query.weight"
    assert torch.equal(ours[f"text_encoder.layer.2.{q}"], bert[f"encoder.layer.2.{q}"])
    assert torch.equal(ours[f"fusion_encoder.layer.0.{q}"], bert[f"encoder.layer.3.{q}"])
    assert torch.equal(ours[f"fusion_encoder.layer.2.{q}"], bert[f"encoder.layer.5.{q}"])
    assert torch.equal(ours[f"text_decoder.layer.5.{q}"], bert[f"encoder.layer.5.{q}"])
    emb = bert["embeddings.word_embeddings.weight"]
    assert torch.equal(ours["text_encoder.embeddings.word_embeddings.weight"], emb)
    assert torch.equal(ours["text_decoder.embeddings.word_embeddings.weight"], emb)
    assert torch.equal(ours["text_encoder_m.embeddings.word_embeddings.weight"], emb)  # momentum re-synced


def test_bert_too_shallow_is_an_error() -> None:
    model = _tiny(text_layers=4, fusion_layers=4, text_config={"num_hidden_layers": 8})
    with pytest.raises(ValueError, match="6 layers"):
        init_text_from_bert(model, packaged_model_dir())
