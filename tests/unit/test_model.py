"""MPlugForPretraining: losses, gradients, purity of forward, momentum step, overfitting,
gradient checkpointing, bf16 autocast, parameter counts of base/large."""

from __future__ import annotations

import pytest
import torch

from mplug import MPlugConfig, MPlugForPretraining, MPlugPretrainingOutput
from mplug.objectives import mask_tokens, split_prefix

pytestmark = pytest.mark.unit

LOSSES = ("loss_itc", "loss_itm", "loss_mlm", "loss_prefix")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP threads spinning against other
    processes made these steps ~5x slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**overrides) -> MPlugForPretraining:
    torch.manual_seed(0)
    return MPlugForPretraining(MPlugConfig.preset("tiny", queue_size=64, **overrides))


@pytest.fixture(scope="module")
def tiny() -> MPlugForPretraining:
    return _tiny()


def test_example_inputs_are_valid(tiny: MPlugForPretraining) -> None:
    x = tiny.example_inputs(5)
    cfg = tiny.config
    assert x["images"].shape == (5, 3, 64, 64)
    ids, mask = x["input_ids"], x["attention_mask"]
    assert ids.shape == mask.shape == (5, cfg.max_text_len)
    assert (ids[:, 0] == cfg.cls_token_id).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(5), lengths - 1] == cfg.sep_token_id).all()
    assert (ids[mask == 0] == 0).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # padding only at the end


def test_losses_finite_and_every_parameter_gets_gradient(tiny: MPlugForPretraining) -> None:
    tiny.zero_grad(set_to_none=True)
    out = tiny(**tiny.example_inputs(4), alpha=0.4)
    assert isinstance(out, MPlugPretrainingOutput)
    for name in LOSSES:
        value = getattr(out, name)
        assert value.ndim == 0 and torch.isfinite(value) and value > 0, name
    torch.testing.assert_close(out.loss, sum(getattr(out, n) for n in LOSSES))
    out.loss.backward()
    trainable = [(n, p) for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all("_m." not in n for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero = [n for n, p in trainable if p.grad.abs().sum() == 0]
    assert zero == [], zero
    assert out.image_feat_m.shape == (4, tiny.config.embed_dim)


def test_forward_does_not_change_state(tiny: MPlugForPretraining) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny(**tiny.example_inputs(3))
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_momentum_update_moves_ema_and_queue() -> None:
    model = _tiny()
    x = model.example_inputs(4)
    out = model(**x)
    online = model.text_encoder.layer[0].attention.self.query.weight
    momentum = model.text_encoder_m.layer[0].attention.self.query.weight
    assert torch.equal(online, momentum)  # momentum copies start equal
    with torch.no_grad():
        online.add_(1.0)
    model.momentum_update(out)
    torch.testing.assert_close(momentum, online - 1.0 + (1 - model.config.momentum) * 1.0)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.image_queue[:, :4], out.image_feat_m.t())
    # Wrap-around: 64-slot queue, 4 more batches of 16.
    for _ in range(4):
        model.momentum_update(model(**model.example_inputs(16)))
    assert int(model.queue_ptr) == (4 + 64) % 64


def test_objectives_switch_off() -> None:
    model = _tiny(use_itc=False, use_mlm=False)
    out = model(**model.example_inputs(3))
    assert out.loss_itc == 0 and out.loss_mlm == 0
    assert out.loss_itm > 0 and out.loss_prefix > 0
    torch.testing.assert_close(out.loss, out.loss_itm + out.loss_prefix)
    assert model.mlm_head is None and model.vision_proj is None and model.image_queue is None
    assert not any(n.endswith("_m") for n, _ in model.named_children())
    assert out.image_feat_m is None
    with pytest.raises(ValueError, match="use_itc"):
        model.encode_image_features(torch.zeros(1, 3, 64, 64))


def test_itc_features(tiny: MPlugForPretraining) -> None:
    x = tiny.example_inputs(3)
    img = tiny.encode_image_features(x["images"])
    txt = tiny.encode_text_features(x["input_ids"], x["attention_mask"])
    assert img.shape == txt.shape == (3, tiny.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    # Other image sizes work: position embeddings are resampled at run time.
    assert tiny.encode_image_features(torch.randn(2, 3, 96, 80)).shape == (2, tiny.config.embed_dim)


def test_mlm_masking_rules() -> None:
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (64, 32))
    ids[:, 0], ids[:, 20] = 101, 102
    ids[:, 21:] = 0
    mask = (ids != 0).long()
    masked, labels = mask_tokens(ids, mask, 0.15, 103, 30522, special_ids=(101, 102, 0))
    picked = labels != -100
    assert not picked[:, [0, 20]].any() and not picked[:, 21:].any()  # never special tokens
    rate = picked.float().sum() / 19 / 64
    assert 0.12 < rate < 0.18
    frac_mask = (masked[picked] == 103).float().mean()
    frac_keep = (masked[picked] == ids[picked]).float().mean()
    assert 0.72 < frac_mask < 0.88 and 0.04 < frac_keep < 0.17
    assert torch.equal(masked[~picked], ids[~picked])


def test_prefix_split_at_word_boundaries() -> None:
    torch.manual_seed(0)
    # [CLS] a large red ##dish circle [SEP] [PAD]: "##dish" (id 7, position 3) continues a word.
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 102, 0]]).repeat(200, 1)
    mask = (ids != 0).long()
    word_start = torch.ones(30522, dtype=torch.bool)
    word_start[7] = False
    prefix, prefix_mask, target, target_mask = split_prefix(ids, mask, word_start, 101, 0)
    cuts = prefix_mask.sum(1)  # position of the first decoded token
    # Cuts at word starts only: never inside "red##dish" (3), never before word 2, never [SEP] alone.
    assert set(cuts.tolist()) == {2, 4, 5}
    for row in range(200):
        k = int(cuts[row])
        assert prefix[row, :k].tolist() == ids[row, :k].tolist()
        assert target[row, 0] == 101
        n = int(target_mask[row].sum())
        assert target[row, 1:n].tolist() == ids[row, k:7].tolist()  # rest of caption incl. [SEP]
        assert (target[row, n:] == 0).all()


def test_overfits_one_batch() -> None:
    """Every loss falls clearly when the tiny model trains on one fixed batch (vocabulary cut to
    1,024 ids so the test stays fast on a shared CPU)."""
    model = _tiny(text_config={"vocab_size": 1024})
    x = model.example_inputs(4, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    first = None
    history: list[dict[str, float]] = []
    for _ in range(100):
        out = model(**x, alpha=0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.momentum_update(out)
        history.append({n: float(getattr(out, n).detach()) for n in LOSSES})
        first = first or history[0]
    last = {
        n: sum(h[n] for h in history[-10:]) / 10 for n in LOSSES
    }  # ITM is noisy: fresh negatives each step
    for n in LOSSES:
        # MLM re-draws its masks every step, so it plateaus highest (~0.45 of its start).
        assert last[n] < 0.6 * first[n], (n, first[n], last[n])


def test_gradient_checkpointing_matches() -> None:
    model = _tiny()
    x = model.example_inputs(3)
    torch.manual_seed(1)
    ref = model(**x)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert model.visual_encoder.grad_checkpointing and model.fusion_encoder.layer[0].gradient_checkpointing
    torch.manual_seed(1)
    out = model(**x)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, g in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-5, rtol=1e-4)


def test_bf16_autocast(tiny: MPlugForPretraining) -> None:
    tiny.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(**tiny.example_inputs(3), alpha=0.4)
    assert all(torch.isfinite(getattr(out, n)) for n in LOSSES)
    out.loss.backward()
    assert torch.isfinite(tiny.text_proj.weight.grad).all()


@pytest.mark.parametrize(
    ("name", "image_size", "official"), [("base", 384, 344.7e6), ("large", 336, 565.3e6)]
)
def test_parameter_count_matches_official(name: str, image_size: int, official: float) -> None:
    """Counted without momentum copies, pretraining heads included (ITC projections, ITM head,
    MLM head transform + bias), at the official VQA resolution; built on the meta device."""
    with torch.device("meta"):
        model = MPlugForPretraining(MPlugConfig.preset(name, image_size=image_size))
    count = model.num_parameters_without_momentum()
    assert abs(count - official) / official < 0.01, count


def test_itc_without_queue_trains_and_enqueues_nothing():
    torch.manual_seed(0)
    model = MPlugForPretraining(MPlugConfig.preset("tiny", queue_size=0, use_mlm=False, use_prefix=False))
    assert model.image_queue.shape[1] == 0
    out = model(**model.example_inputs(4))
    assert out.loss_itc.isfinite() and out.loss_itc > 0
    out.loss.backward()
    model.momentum_update(out)  # must not fail on an empty queue
    assert model.image_queue.shape[1] == 0


def test_sincos_position_table_from_scratch_and_a_loaded_table_wins(tmp_path) -> None:
    from mplug.vision import sincos_position_table

    table = sincos_position_table(4, 16)  # 4x4 patches, 8 channels per axis
    assert table.shape == (16, 16) and float(table.abs().max()) <= 1.0
    cols, rows = torch.arange(16) % 4, torch.arange(16) // 4
    for i in range(16):  # first half: the column alone; second half: the row alone
        assert torch.equal(table[i, :8], table[int(cols[i]), :8])
        assert torch.equal(table[i, 8:], table[int(rows[i]) * 4, 8:])
    assert len({tuple(r.tolist()) for r in table}) == 16

    model = _tiny()  # tiny starts from the table (position_init="sincos")
    grid = model.config.image_size // model.config.vision_config.patch_size
    expected = sincos_position_table(grid, model.config.vision_config.hidden_size)
    torch.testing.assert_close(model.visual_encoder.pos_embed[0, 1:], expected)
    torch.testing.assert_close(model.visual_encoder_m.pos_embed[0, 1:], expected)
    with torch.no_grad():
        model.visual_encoder.pos_embed.mul_(3.0)
    model.save_pretrained(tmp_path / "m")
    loaded = MPlugForPretraining.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.visual_encoder.pos_embed, model.visual_encoder.pos_embed)
    normal = MPlugConfig.preset("tiny", vision_config={"position_init": "normal"})
    assert normal.vision_config.position_init == "normal"
    with pytest.raises(ValueError, match="position_init"):
        MPlugConfig.preset("tiny", vision_config={"position_init": "learned"})
