"""Tower initialisation from foreign weights: an OpenAI CLIP checkpoint (TorchScript or a plain state
dict) for the vision tower and a Hugging Face BERT folder for the text side. The tests write the
weights themselves, in each source's own layout, and check where every value lands."""

from __future__ import annotations

import json
import pickle

import fsspec
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel

from mplug import MPlugConfig, MPlugForPretraining, init_text_from_bert, init_vision_from_clip
from mplug.tokenizer import packaged_model_dir
from mplug.vision import resize_pos_embed

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: OpenMP threads spinning against other processes on a shared 2-core
    box made these models several times slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(**overrides) -> MPlugForPretraining:
    """The tiny preset with a 1,024-id vocabulary: the layouts are the same, the tensors far smaller."""
    torch.manual_seed(0)
    text = {"vocab_size": 1024, **overrides.pop("text_config", {})}
    return MPlugForPretraining(MPlugConfig.preset("tiny", queue_size=32, text_config=text, **overrides))


# ---- OpenAI CLIP ------------------------------------------------------------------------------
def clip_visual_layout(
    prefix: str, width: int, layers: int, patch: int, mlp: int, grid: int
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of OpenAI CLIP's `VisionTransformer` (model.py), under `prefix`."""
    shapes = {
        f"{prefix}.class_embedding": (width,),
        f"{prefix}.positional_embedding": (grid * grid + 1, width),
        f"{prefix}.conv1.weight": (width, 3, patch, patch),
        f"{prefix}.ln_pre.weight": (width,),
        f"{prefix}.ln_pre.bias": (width,),
    }
    for i in range(layers):
        b = f"{prefix}.transformer.resblocks.{i}"
        shapes |= {
            f"{b}.attn.in_proj_weight": (3 * width, width),
            f"{b}.attn.in_proj_bias": (3 * width,),
            f"{b}.attn.out_proj.weight": (width, width),
            f"{b}.attn.out_proj.bias": (width,),
            f"{b}.ln_1.weight": (width,),
            f"{b}.ln_1.bias": (width,),
            f"{b}.mlp.c_fc.weight": (mlp, width),
            f"{b}.mlp.c_fc.bias": (mlp,),
            f"{b}.mlp.c_proj.weight": (width, mlp),
            f"{b}.mlp.c_proj.bias": (width,),
            f"{b}.ln_2.weight": (width,),
            f"{b}.ln_2.bias": (width,),
        }
    shapes |= {
        f"{prefix}.ln_post.weight": (width,),
        f"{prefix}.ln_post.bias": (width,),
        f"{prefix}.proj": (width, 64),
    }
    return shapes


def clip_text_layout(prefix: str = "") -> dict[str, tuple[int, ...]]:
    """A one-block CLIP text tower (width 64), as it rides along in every CLIP state dict."""
    p = f"{prefix}." if prefix else ""
    return {
        f"{p}token_embedding.weight": (100, 64),
        f"{p}positional_embedding": (77, 64),
        f"{p}transformer.resblocks.0.attn.in_proj_weight": (192, 64),
        f"{p}transformer.resblocks.0.mlp.c_fc.weight": (256, 64),
        f"{p}ln_final.weight": (64,),
        f"{p}text_projection": (64, 64),
        f"{p}logit_scale": (),
    }


def clip_state_dict(cfg: MPlugConfig, grid: int, width: int | None = None, layers: int | None = None) -> dict:
    """Random weights in the OpenAI CLIP layout for `cfg`'s vision tower, trained on a `grid` x `grid`
    patch grid, with a text tower and metadata beside it."""
    v = cfg.vision_config
    width = width or v.hidden_size
    mlp = v.intermediate_size * width // v.hidden_size
    shapes = clip_visual_layout("visual", width, layers or v.num_hidden_layers, v.patch_size, mlp, grid)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in (shapes | clip_text_layout()).items()}
    return sd | {"input_resolution": torch.tensor(grid * v.patch_size), "context_length": torch.tensor(77)}


def scripted(state_dict: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose state dict is `state_dict` (names nest as submodules), as
    OpenAI's released `.pt` files are."""
    root = nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if tensor.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, tensor.clone())
    with pytest.warns(FutureWarning):  # torch.jit is deprecated; the released CLIP files are TorchScript
        return torch.jit.script(root)


def _save_clip(sd: dict, fmt: str, tmp_path) -> str:
    if fmt == "torchscript":  # fp16, as the released files
        uri = str(tmp_path / "ViT-B-16.pt")
        module = scripted({k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
        with pytest.warns(FutureWarning):
            torch.jit.save(module, uri)
        return uri
    if fmt == "plain":
        uri = "memory://clip/ViT-B-16-state-dict.pth"
        with fsspec.open(uri, "wb") as f:
            torch.save(sd, f)
        return uri
    uri = f"file://{tmp_path / 'wrapped.pth'}"  # a state dict wrapped the way training scripts save it
    with fsspec.open(uri, "wb") as f:
        torch.save({"state_dict": sd, "epoch": 3}, f)
    return uri


@pytest.mark.parametrize("fmt", ["torchscript", "plain", "wrapped"])
def test_clip_weights_land_on_the_vision_tower(fmt: str, tmp_path) -> None:
    model = tiny_model()
    cfg = model.config
    sd = clip_state_dict(cfg, grid=4)  # a 4 x 4 table (17 positions) for the tiny 8 x 8 grid
    report = init_vision_from_clip(
        model, _save_clip(sd, fmt, tmp_path), trust_torchscript=fmt == "torchscript"
    )
    if fmt == "torchscript":
        sd = {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()}

    ours = model.state_dict()
    w = cfg.vision_config.hidden_size
    assert torch.equal(ours["visual_encoder.cls_token"], sd["visual.class_embedding"].view(1, 1, w))
    assert ours["visual_encoder.pos_embed"].shape == (1, cfg.num_visual_tokens, w)  # 17 -> 65 positions
    assert torch.equal(ours["visual_encoder.pos_embed"][0, 0], sd["visual.positional_embedding"][0])
    assert torch.equal(
        ours["visual_encoder.pos_embed"], resize_pos_embed(sd["visual.positional_embedding"][None], (8, 8))
    )
    assert torch.equal(ours["visual_encoder.patch_embed.proj.weight"], sd["visual.conv1.weight"])
    for theirs, our in (("ln_pre", "norm_pre"), ("ln_post", "norm")):
        assert torch.equal(ours[f"visual_encoder.{our}.weight"], sd[f"visual.{theirs}.weight"])
        assert torch.equal(ours[f"visual_encoder.{our}.bias"], sd[f"visual.{theirs}.bias"])
    block = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
             "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
             "ln_2.bias": "norm2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
             "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}  # fmt: skip
    for i in range(cfg.vision_config.num_hidden_layers):
        for theirs, our in block.items():
            assert torch.equal(
                ours[f"visual_encoder.blocks.{i}.{our}"], sd[f"visual.transformer.resblocks.{i}.{theirs}"]
            ), (i, theirs)
    for key, value in ours.items():  # the momentum tower starts from the loaded one
        if key.startswith("visual_encoder_m."):
            assert torch.equal(value, ours[key.replace("visual_encoder_m.", "visual_encoder.", 1)]), key

    assert report.ignored["visual.proj"].startswith("CLIP output projection")
    assert report.ignored["token_embedding.weight"].startswith("CLIP text tower")
    assert report.ignored["transformer.resblocks.0.attn.in_proj_weight"].startswith("CLIP text tower")
    assert report.ignored["input_resolution"] == "CLIP model metadata"
    visual = [k for k in sd if k.startswith("visual.") and k != "visual.proj"]
    assert sorted(report.loaded) == sorted(visual)
    assert set(report.loaded) | set(report.ignored) == set(sd)  # every source key accounted for
    assert not any(k.startswith("visual_encoder") for k in report.left_at_init)
    assert "text_encoder.layer.0.output.dense.weight" in report.left_at_init
    line = str(report)
    assert "\n" not in line and f"{len(visual)} tensors loaded" in line and "re-synced" in line


def test_torchscript_is_refused_unless_trusted(tmp_path) -> None:
    """Loading TorchScript runs the code the archive holds: without trust_torchscript it is an
    error that says how to opt in, before anything is loaded (any loader, not only CLIP's)."""
    from mplug.official import UntrustedTorchScript, load_official_checkpoint

    model = tiny_model()
    before = model.visual_encoder.cls_token.detach().clone()
    uri = _save_clip(clip_state_dict(model.config, grid=4), "torchscript", tmp_path)
    with pytest.raises(
        UntrustedTorchScript, match=r"ViT-B-16\.pt is a TorchScript archive.*model\.trust_torchscript"
    ):
        init_vision_from_clip(model, uri)
    with pytest.raises(UntrustedTorchScript):
        load_official_checkpoint(model, uri)
    assert torch.equal(model.visual_encoder.cls_token, before)


class _WritesAFile:
    """Unpickling this calls `pathlib.Path.write_text`: what a hostile checkpoint would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.write_text, (pathlib.Path(self.path), "pwned")


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path) -> None:
    from mplug.official import load_official_checkpoint, read_state_dict

    marker = tmp_path / "pwned.txt"
    uri = str(tmp_path / "mplug_base.pth")
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _WritesAFile(str(marker))}, uri)
    for load in (read_state_dict, lambda u: load_official_checkpoint(tiny_model(), u)):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(uri)
    assert not marker.exists()


def test_clip_width_mismatch_names_the_key_and_both_shapes(tmp_path) -> None:
    model = tiny_model()
    before = model.visual_encoder.cls_token.detach().clone()
    uri = _save_clip(clip_state_dict(model.config, grid=4, width=192), "plain", tmp_path)
    with pytest.raises(
        ValueError, match=r"visual\.class_embedding \(192,\) -> visual_encoder\.cls_token \(1, 1, 128\)"
    ):
        init_vision_from_clip(model, uri)
    assert torch.equal(model.visual_encoder.cls_token, before)  # nothing loaded


@pytest.mark.parametrize(
    ("layers", "message"), [(3, r"resblocks\.2\..* has 2 layers"), (1, r"layers \[0\] but the model has 2")]
)
def test_clip_depth_mismatch_is_an_error(layers: int, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        init_vision_from_clip(model, clip_state_dict(model.config, grid=8, layers=layers))


def test_clip_unknown_key_is_an_error_naming_it() -> None:
    model = tiny_model()
    sd = clip_state_dict(model.config, grid=8) | {"visual.attnpool.c_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"visual\.attnpool\.c_proj\.weight.*OpenAI CLIP ViT keys"):
        init_vision_from_clip(model, sd)


# ---- Hugging Face BERT ------------------------------------------------------------------------
def tiny_bert_config(**overrides) -> BertConfig:
    """BERT at the tiny preset's text width, with its 1,024-id vocabulary and 128 positions."""
    values = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512, max_position_embeddings=128)  # fmt: skip
    return BertConfig(**(values | overrides))


def _bert_lands(model: MPlugForPretraining, bert: dict[str, torch.Tensor]) -> None:
    """text encoder = BERT layers 0-1, fusion = 2-3, decoder = 0-1; embeddings in both."""
    ours = model.state_dict()
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    for name, value in bert.items():
        if name.startswith("embeddings.") and "position_ids" not in name:
            assert torch.equal(ours[f"text_encoder.{name}"], value), name
            assert torch.equal(ours[f"text_decoder.{name}"], value), name
            assert torch.equal(ours[f"text_encoder_m.{name}"], value), name  # momentum re-synced
        if name.startswith("encoder.layer."):
            n, rest = int(name.split(".")[2]), name.split(".", 3)[3]
            target = f"text_encoder.layer.{n}.{rest}" if n < 2 else f"fusion_encoder.layer.{n - 2}.{rest}"
            assert torch.equal(ours[target], value), name
            if n < 2:
                assert torch.equal(ours[f"text_decoder.layer.{n}.{rest}"], value), name


def test_bert_model_folder_initialises_encoder_fusion_and_decoder(tmp_path) -> None:
    model = tiny_model()
    torch.manual_seed(1)
    BertModel(tiny_bert_config()).save_pretrained(tmp_path)
    report = init_text_from_bert(model, str(tmp_path))
    from safetensors.torch import load_file

    _bert_lands(model, load_file(str(tmp_path / "model.safetensors")))
    assert report.ignored == {"pooler.dense.weight": "BERT pooler (mPLUG never runs it)",
                              "pooler.dense.bias": "BERT pooler (mPLUG never runs it)"}  # fmt: skip
    left = set(report.left_at_init)
    # A bare BertModel has no MLM head; cross-attention is new in mPLUG: both stay at init.
    assert {"mlm_head.bias", "text_decoder.head.bias", "text_decoder.layer.0.crossattention.self.key.weight",
            "fusion_encoder.layer.0.crossattention.self.key.weight"} <= left  # fmt: skip
    assert not any(k.startswith("text_encoder") for k in left)


def test_bert_masked_lm_folder_at_any_uri_also_gives_the_mlm_heads(tmp_path) -> None:
    model = tiny_model()
    torch.manual_seed(2)
    bert = BertForMaskedLM(tiny_bert_config())
    bert.save_pretrained(tmp_path)
    fs = fsspec.filesystem("memory")
    for name in ("config.json", "model.safetensors"):
        fs.pipe(f"/bert-mlm/{name}", (tmp_path / name).read_bytes())
    report = init_text_from_bert(model, "memory://bert-mlm")
    sd = bert.state_dict()
    _bert_lands(model, sd)
    ours = model.state_dict()
    for rest in ("bias", "transform.dense.weight", "transform.LayerNorm.bias"):
        assert torch.equal(ours[f"mlm_head.{rest}"], sd[f"cls.predictions.{rest}"])
        assert torch.equal(ours[f"text_decoder.head.{rest}"], sd[f"cls.predictions.{rest}"])
    assert report.loaded["bert.embeddings.word_embeddings.weight"] == (
        "text_encoder.embeddings.word_embeddings.weight",
        "text_decoder.embeddings.word_embeddings.weight",
    )


def test_legacy_bert_bin_with_gamma_beta_and_nsp_head(tmp_path) -> None:
    """The original bert-base-uncased `pytorch_model.bin`: TensorFlow LayerNorm names, the NSP
    head, the (tied) decoder matrix."""
    model = tiny_model()
    torch.manual_seed(3)
    cfg = tiny_bert_config()
    sd = BertForPreTraining(cfg).state_dict()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}  # fmt: skip
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    cfg.to_json_file(tmp_path / "config.json")
    report = init_text_from_bert(model, tmp_path)
    _bert_lands(model, sd)
    assert torch.equal(
        model.text_encoder.layer[1].attention.output.LayerNorm.weight,
        sd["bert.encoder.layer.1.attention.output.LayerNorm.weight"],
    )
    assert report.ignored["cls.seq_relationship.weight"].startswith("BERT next-sentence head")
    assert report.ignored["cls.predictions.decoder.weight"].startswith("LM decoder matrix")
    assert "mlm_head.transform.LayerNorm.weight" not in report.left_at_init


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_attention_heads": 8}, "num_attention_heads=8"), ({"vocab_size": 2048}, "vocab_size=2048")],
)
def test_bert_config_mismatch_names_the_field(overrides: dict, field: str, tmp_path) -> None:
    BertModel(tiny_bert_config(**overrides)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"config\.json: {field}, but the model's text_config"):
        init_text_from_bert(tiny_model(), tmp_path)


def test_bert_too_shallow_is_an_error(tmp_path) -> None:
    BertModel(tiny_bert_config(num_hidden_layers=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 3 layers; text_layers \\+ fusion_layers = 4"):
        init_text_from_bert(tiny_model(), tmp_path)


def test_not_a_bert_folder_is_an_error(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        init_text_from_bert(tiny_model(), tmp_path)


def test_mini_initialises_from_packaged_minilm() -> None:
    """Real weights: mini's text = MiniLM layers 0-2, fusion = 3-5, decoder = 0-5."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MPlugForPretraining(MPlugConfig.preset("mini", queue_size=16))
    folder = packaged_model_dir()
    report = init_text_from_bert(model, folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    assert set(report.ignored.values()) == {"BERT pooler (mPLUG never runs it)", "position-id buffer"}
    # MiniLM is a bare BertModel (no MLM head): cross-attention and the LM heads stay new.
    text_side = [
        k for k in report.left_at_init if k.startswith(("text_encoder", "text_decoder", "fusion_", "mlm_"))
    ]
    assert text_side and all(
        ".crossattention." in k or k.startswith(("text_decoder.head.", "mlm_head.")) for k in text_side
    )
    bert = {k.removeprefix("bert."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
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
