"""The embedded model's data, tokenizer, checker and trainer (no trained model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import train as T
from training.checker import check, check_relation, read_image
from training.model import build_components
from training.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_COLOUR_PAIRS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeSpec,
    held_out_relation_scenes,
    held_out_scenes,
    render,
    training_scene,
    vocabulary_words,
)
from training.tokenizer import build_vocab, write_tokenizer


def test_training_scenes_are_deterministic_and_never_use_a_held_out_combination():
    kinds = set()
    for i in range(300):
        scene, img = training_scene(i, seed=3)
        again_scene, again_img = training_scene(i, seed=3)
        assert scene == again_scene and np.array_equal(img, again_img)
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) == (128, 128, 3) and img.dtype == np.uint8
        for spec in scene.shapes:
            assert (spec.colour, spec.shape) not in HELD_OUT_PAIRS
            assert spec.colour != scene.background
        if scene.relation is not None:
            assert frozenset(s.colour for s in scene.shapes) not in HELD_OUT_COLOUR_PAIRS
            assert len({s.colour for s in scene.shapes}) == 2
        kinds.add(scene.relation)
        kinds.add(scene.background)
    assert set(RELATIONS) | set(BACKGROUNDS) <= kinds  # every relation and every background is drawn
    assert not np.array_equal(training_scene(0, seed=3)[1], training_scene(0, seed=4)[1])


def test_held_out_sets_cover_every_colour_shape_background_and_relation():
    scenes = held_out_scenes()
    assert len(scenes) == 240 and len({s.caption() for s in scenes}) == 240
    pairs = {(s.shapes[0].colour, s.shapes[0].shape) for s in scenes}
    assert pairs == set(HELD_OUT_PAIRS)
    assert {c for c, _ in pairs} == set(COLOURS)
    assert {s for _, s in pairs} == set(SHAPES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert all(s.background != s.shapes[0].colour for s in scenes)
    relations = held_out_relation_scenes()
    assert len(relations) == 128 and relations == held_out_relation_scenes()
    assert {frozenset(s.colour for s in r.shapes) for r in relations} == set(HELD_OUT_COLOUR_PAIRS)
    assert {(r.shapes[0].colour, r.relation) for r in relations} == {(c, rel) for c in COLOURS for rel in RELATIONS}
    for r in relations:
        assert r.background not in {s.colour for s in r.shapes}
        assert all((s.colour, s.shape) not in HELD_OUT_PAIRS for s in r.shapes)


def test_captions_read_like_the_issue_examples():
    scene = Scene((ShapeSpec("red", "circle", "top left", "large"),), "white")
    assert scene.caption() == "a large red circle at the top left on a white background"
    centre = Scene((ShapeSpec("red", "circle", "center", "large"),), "blue")
    assert centre.caption() == "a large red circle in the center on a blue background"
    pair = Scene((ShapeSpec("red", "circle"), ShapeSpec("orange", "square")), "black", "to the left of")
    assert pair.caption() == "a red circle to the left of an orange square on a black background"
    assert (
        Scene((ShapeSpec("blue", "star", "center", "small"),), "orange").caption().endswith("on an orange background")
    )
    with pytest.raises(ValueError, match="invisible"):
        Scene((ShapeSpec("blue", "star", "center", "small"),), "blue")
    with pytest.raises(ValueError, match="two shapes"):
        Scene((ShapeSpec("blue", "star"),), "white", "above")


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_relation_scenes_draw_the_first_shape_where_the_caption_says(relation):
    scene = Scene((ShapeSpec("red", "circle"), ShapeSpec("blue", "square")), "white", relation)
    for i in range(5):
        img = render(scene, np.random.default_rng(i))
        red = np.argwhere((img == COLOURS["red"]).all(-1)).mean(0)  # (y, x)
        blue = np.argwhere((img == COLOURS["blue"]).all(-1)).mean(0)
        dx, dy = RELATIONS[relation]  # from the first shape to the second
        assert np.sign(blue[1] - red[1]) == dx or dx == 0
        assert np.sign(blue[0] - red[0]) == dy or dy == 0
        assert abs(blue[1] - red[1]) > 40 or abs(blue[0] - red[0]) > 40  # never touching


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
    for i, scene in enumerate(held_out_scenes()[::4]):
        verdict = check(render(scene, np.random.default_rng(i)), scene)
        assert verdict.all and verdict.background, (scene.caption(), verdict.reading)
    for i, scene in enumerate(held_out_relation_scenes()[::3]):
        verdict = check_relation(render(scene, np.random.default_rng(i)), scene)
        assert verdict.all and verdict.background, (scene.caption(), verdict)


def test_checker_rejects_the_wrong_colour_shape_position_and_background():
    drawn = Scene((ShapeSpec("green", "square", "bottom right", "large"),), "pink")
    img = render(drawn, np.random.default_rng(0))
    wanted = Scene((ShapeSpec("red", "circle", "top left", "large"),), "white")
    verdict = check(img, wanted)
    assert not verdict.colour and not verdict.shape and not verdict.position and not verdict.background
    r = verdict.reading
    assert (r.colour, r.shape, r.position, r.background) == ("green", "square", "bottom right", "pink")


def test_checker_rejects_a_reversed_relation_and_a_missing_object():
    drawn = Scene((ShapeSpec("red", "circle"), ShapeSpec("blue", "cross")), "white", "above")
    img = render(drawn, np.random.default_rng(1))
    assert check_relation(img, drawn).all
    reversed_ = check_relation(img, Scene(drawn.shapes, "white", "below"))
    assert reversed_.colours and reversed_.shapes and not reversed_.relation
    sideways = check_relation(img, Scene(drawn.shapes, "white", "to the left of"))
    assert not sideways.relation
    other = Scene((ShapeSpec("red", "circle"), ShapeSpec("green", "cross")), "white", "above")
    missing = check_relation(img, other)
    assert not missing.colours and not missing.relation and missing.readings[1].centre is None
    with pytest.raises(ValueError, match="relation scenes"):
        check_relation(img, Scene((ShapeSpec("red", "circle", "center", "large"),), "white"))
    with pytest.raises(ValueError, match="one-shape scenes"):
        check(img, drawn)


def test_checker_on_an_empty_image_reads_nothing():
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    blank[:] = BACKGROUNDS["purple"]
    reading = read_image(blank)
    assert reading.colour is None and reading.shape is None and reading.background == "purple"
    with pytest.raises(ValueError, match="128x128"):
        read_image(np.zeros((64, 64, 3), dtype=np.uint8))


def test_vae_crops_are_whole_latent_pixels_of_the_image():
    x = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128)
    crops = T._random_crops(x, 64, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 64, 64)
    for img, crop in zip(x, crops):
        y, xx = divmod(int(crop[0, 0, 0].item()) % (128 * 128), 128)
        assert y % 8 == 0 and xx % 8 == 0 and torch.equal(crop, img[:, y : y + 64, xx : xx + 64])


def test_preview_decoder_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = T.TrainConfig(decoder_steps=4, decoder_batch=2, checkpoint_every=1)
    images = np.stack([training_scene(i)[1] for i in range(6)])
    mean = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    std = torch.full_like(mean, 0.1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = T.train_preview_decoder(cfg, images, mean, std, 0.7, tmp_path / "a")

    save = T._atomic_save

    def interrupted_after_step_2(obj, path):
        save(obj, path)
        if obj["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_atomic_save", interrupted_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        T.train_preview_decoder(cfg, images, mean, std, 0.7, tmp_path / "b")
    monkeypatch.setattr(T, "_atomic_save", save)
    resumed = T.train_preview_decoder(cfg, images, mean, std, 0.7, tmp_path / "b")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


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
