"""The Python quickstart (`pipelines.eval.quickstart.Predictor`): the README's snippet runs as
written, a caption is the one `mplug infer` writes for the same image, weights from a pretraining
run or an official checkpoint land where they should, and misuse is an error naming the value."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from mplug import MPlugConfig, MPlugForPretraining
from mplug.caption import MPlugForCaptioning
from mplug.vqa import MPlugForQuestionAnswering
from pipelines.eval.quickstart import Predictor
from tests.unit.test_checkpoint import official_layout, random_state_dict

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: spinning OpenMP threads on the shared 2-core box slow tiny models down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo(size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A red disc and a blue square on white: a real image, not a 64 px square."""
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 15, 55, 60), fill=(220, 30, 30))
    draw.rectangle((70, 30, 105, 65), fill=(30, 60, 200))
    return im


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny captioner, VQA model and pretraining run, randomly initialised and saved as runs save
    them (`save_pretrained` into `final/`)."""
    root = tmp_path_factory.mktemp("quickstart")
    cfg = MPlugConfig.preset("tiny", queue_size=32)
    out = {}
    for name, cls in (
        ("cap", MPlugForCaptioning),
        ("vqa", MPlugForQuestionAnswering),
        ("pre", MPlugForPretraining),
    ):
        torch.manual_seed(len(out))
        cls(cfg).save_pretrained(root / name / "final")
        out[name] = root / name
    return out


def readme_quickstart() -> str:
    """The first ```python block of the README's quickstart section."""
    text = README.read_text()
    section = text[text.index("## Python quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no ```python block after '## Python quickstart'"
    return match.group(1)


def test_readme_quickstart_runs_as_written(models, tmp_path, monkeypatch, capsys) -> None:
    """The snippet, verbatim, where `make demo` leaves its pretrained model and with a photo.jpg."""
    code = readme_quickstart()
    assert len([line for line in code.splitlines() if line.strip()]) <= 6, code
    run = tmp_path / "demo_out" / "runs" / "demo-tiny"
    run.parent.mkdir(parents=True)
    (run).symlink_to(models["pre"])
    photo().save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md quickstart", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and all(line.strip() for line in printed), printed


def test_caption_is_what_mplug_infer_writes(models, tmp_path) -> None:
    from pipelines.eval.infer import InferUnit, InferWorker

    image = tmp_path / "photo.png"
    photo().save(image)
    captioner = Predictor.load("caption", models["cap"])
    caption = captioner.caption(image)
    assert isinstance(caption, str) and caption.strip()
    # The same image as a PIL image, as bytes, and in a batch of two: the same caption.
    assert captioner.caption(photo()) == caption
    assert captioner.predict([image.read_bytes(), photo((90, 120))])[0] == caption

    worker = InferWorker("caption", str(models["cap"] / "final"), str(tmp_path / "out"), None, {}, 4)
    summary = worker.run_unit(InferUnit("f000000", "files", (str(image),)))
    assert summary["predicted"] == 1
    written = pq.read_table(tmp_path / "out" / "predictions" / "f000000.parquet").to_pylist()
    assert written == [{"key": "photo.png", "prediction": caption}]


def test_answer_uses_the_question(models) -> None:
    vqa = Predictor.load("vqa", str(models["vqa"] / "final"), options={"vqa.num_beams": 2})
    assert vqa.task.job.vqa.num_beams == 2
    answers = vqa.predict([photo(), photo()], ["what colour is the disc?", "how many shapes are there?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert vqa.answer(photo(), "what colour is the disc?") == answers[0]


def test_a_pretraining_run_captions_with_its_own_decoder(models) -> None:
    captioner = Predictor.load("caption", models["pre"])  # STORAGE/RUN: its final/
    assert "not used by this task's model" in captioner.loaded[0]
    pretrained = MPlugForPretraining.from_pretrained(models["pre"] / "final").state_dict()
    ours = captioner.model.state_dict()
    for key in ("text_decoder.layer.0.crossattention.self.query.weight", "visual_encoder.pos_embed"):
        assert torch.equal(ours[key], pretrained[key]), key
    assert captioner.caption(photo()).strip()


def test_official_checkpoint_needs_its_size_and_loads_every_tensor(tmp_path) -> None:
    cfg = MPlugConfig.preset("tiny")
    checkpoint = tmp_path / "mplug_tiny.pth"
    torch.save({"model": random_state_dict(official_layout(cfg, grid=6))}, checkpoint)
    with pytest.raises(ValueError, match="preset='base'"):
        Predictor.load("vqa", checkpoint)
    vqa = Predictor.load("vqa", checkpoint, preset="tiny", image_size=48)
    assert vqa.task.model_config.image_size == 48
    assert "0 left at init" in vqa.loaded[0], vqa.loaded[0]
    answer = vqa.answer(photo(), "what is on the left?")
    # Exported as a run of ours and loaded back: the same answer.
    vqa.model.save_pretrained(tmp_path / "exported")
    assert Predictor.load("vqa", tmp_path / "exported").answer(photo(), "what is on the left?") == answer


def test_misuse_is_an_error_naming_the_value(models) -> None:
    with pytest.raises(ValueError, match="'grounding'.*valid tasks: \\('vqa', 'caption'\\)"):
        Predictor.load("grounding", models["cap"])
    with pytest.raises(ValueError, match="preset= and image_size= are for official checkpoints"):
        Predictor.load("caption", models["cap"], preset="base")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Predictor.load("caption", "/nowhere/run")
    captioner = Predictor.load("caption", models["cap"])
    with pytest.raises(ValueError, match="decode_error"):
        captioner.caption(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="takes no questions"):
        captioner.predict([photo()], ["why?"])
    with pytest.raises(TypeError, match="pass a path or URI"):
        captioner.caption(123)
    vqa = Predictor.load("vqa", models["vqa"])
    with pytest.raises(ValueError, match="1 images, no questions"):
        vqa.predict([photo()])
    with pytest.raises(ValueError, match="non-empty text"):
        vqa.answer(photo(), "  ")
    buffer = io.BytesIO()
    photo((400, 40)).save(buffer, format="PNG")  # 10:1, as ingest rejects it
    with pytest.raises(ValueError, match="bad_aspect"):
        vqa.answer(buffer.getvalue(), "what?")
