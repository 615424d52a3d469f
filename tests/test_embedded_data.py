"""The embedded model's data, tokenizer, checker and trainer (no trained model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import train as T
from training.checker import check, read_image
from training.model import build_components
from training.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    Scene,
    ShapeSpec,
    held_out_scenes,
    render,
    training_scene,
    vocabulary_words,
)
from training.tokenizer import build_vocab, write_tokenizer


def test_training_scenes_are_deterministic_and_never_use_a_held_out_pair():
    for i in range(200):
        scene, img = training_scene(i, seed=3)
        again_scene, again_img = training_scene(i, seed=3)
        assert scene == again_scene and np.array_equal(img, again_img)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        for spec in scene.shapes:
            assert (spec.colour, spec.shape) not in HELD_OUT_PAIRS
    assert not np.array_equal(training_scene(0, seed=3)[1], training_scene(0, seed=4)[1])


def test_held_out_set_covers_every_colour_and_shape():
    scenes = held_out_scenes()
    assert len(scenes) == 240
    pairs = {(s.shapes[0].colour, s.shapes[0].shape) for s in scenes}
    assert pairs == set(HELD_OUT_PAIRS)
    assert {c for c, _ in pairs} == set(COLOURS)
    assert {s for _, s in pairs} == set(SHAPES)
    assert len({s.caption() for s in scenes}) == 240


def test_caption_reads_like_the_issue_example():
    scene = Scene((ShapeSpec("red", "circle", "top left", "large"),), "white")
    assert scene.caption() == "a large red circle at the top left on a white background"
    centre = Scene((ShapeSpec("blue", "star", "center", "small"),), "black")
    assert centre.caption() == "a small blue star in the center on a black background"


def test_every_caption_word_is_one_token_and_other_text_still_tokenizes(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path, vocabulary_words())
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for word in vocabulary_words():
        assert len(tok(word)["input_ids"]) == 3, word
    ids = tok("A Purple RING on a zebra!")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "apurpleringonazebra!"
    vocab, _ = build_vocab(vocabulary_words())
    assert len(tok) == len(vocab)


def test_checker_reads_ground_truth_renders_correctly():
    scenes = held_out_scenes()[::4]
    for i, scene in enumerate(scenes):
        verdict = check(render(scene, np.random.default_rng(i)), scene)
        assert verdict.all, (scene.caption(), verdict.reading)


def test_checker_rejects_the_wrong_colour_shape_and_position():
    drawn = Scene((ShapeSpec("green", "square", "bottom right", "large"),), "white")
    img = render(drawn, np.random.default_rng(0))
    wanted = Scene((ShapeSpec("red", "circle", "top left", "large"),), "white")
    verdict = check(img, wanted)
    assert not verdict.colour and not verdict.shape and not verdict.position
    assert (verdict.reading.colour, verdict.reading.shape, verdict.reading.position) == (
        "green",
        "square",
        "bottom right",
    )


def test_checker_on_an_empty_image_reads_nothing():
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    blank[:] = BACKGROUNDS["gray"]
    reading = read_image(blank)
    assert reading.colour is None and reading.shape is None and reading.background == "gray"
    with pytest.raises(ValueError, match="64x64"):
        read_image(np.zeros((32, 32, 3), dtype=np.uint8))


def _tiny_run(tmp_path, steps: int, resume_at: int | None):
    from transformers import CLIPTokenizer

    cfg = T.TrainConfig(
        images=32, unet_batch=4, unet_steps=steps, unet_cosine_steps=2, warmup=1, checkpoint_every=1, threads=1
    )
    write_tokenizer(tmp_path / "tok", vocabulary_words())
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    vocab, _ = build_vocab(vocabulary_words())
    captions = [training_scene(i)[0].caption() for i in range(cfg.images)]
    mean = torch.randn(cfg.images, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    std = torch.full_like(mean, 0.1)

    def fresh():
        torch.manual_seed(0)
        _, unet, text_encoder = build_components(vocab)
        return unet, text_encoder

    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if resume_at is not None:
        cfg.unet_steps = resume_at
        unet, te = fresh()
        T.train_unet(cfg, unet, te, tok, captions, mean, std, 1.0, work)
        cfg.unet_steps = steps
    unet, te = fresh()
    T.train_unet(cfg, unet, te, tok, captions, mean, std, 1.0, work)
    return unet


@pytest.mark.parametrize("resume_at", [1, 2, 3])  # in the cosine cycle, at its end, in the refinement phase
def test_unet_training_resumes_to_the_same_weights(tmp_path, resume_at):
    torch.set_num_threads(1)
    straight = _tiny_run(tmp_path / "a", 4, None)
    resumed = _tiny_run(tmp_path / "b", 4, resume_at)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    untrained = build_components(build_vocab(vocabulary_words())[0])[1]
    assert any(not torch.equal(a, b) for a, b in zip(straight.state_dict().values(), untrained.state_dict().values()))


def test_unet_learning_rate_schedule():
    cfg = T.TrainConfig(unet_lr=1e-3, warmup=10, unet_cosine_steps=110, unet_steps=150, refine_lr=2e-4)
    assert T.unet_lr(cfg, 0) == pytest.approx(1e-4)
    assert T.unet_lr(cfg, 9) == pytest.approx(1e-3)
    assert T.unet_lr(cfg, 10) == pytest.approx(1e-3)
    assert T.unet_lr(cfg, 60) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert T.unet_lr(cfg, 109) == pytest.approx(1e-3 * 0.05, rel=0.01)
    assert T.unet_lr(cfg, 110) == T.unet_lr(cfg, 149) == 2e-4
