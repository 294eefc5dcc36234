"""Scenes of two shapes (shapes.make_scenes) and the scene judge (shapes.read_scene, scene_adherence,
parse_prompt): the split holds out whole pairings, captions say what is drawn, and the judge reads rendered
scenes back, clean and noisy, binding color to shape."""

import collections
import os

import pytest
import torch

import shapes

KEYS = ("color", "shape", "size", "position")
SCORES = ("count", "binding", "position")


def pairing(objects):
    return tuple(sorted((o["color"], o["shape"]) for o in objects))


def test_scenes_share_and_the_one_shape_images_unchanged_without_them():
    plain = shapes.make_shapes_dataset(200, 16, seed=4)
    none = shapes.make_shapes_dataset(200, 16, seed=4, scenes=0.0)
    assert torch.equal(plain[0], none[0]) and plain[1:] == none[1:]
    images, captions, attrs = shapes.make_shapes_dataset(200, 16, seed=4, scenes=0.3)
    assert images.shape == (200, 3, 16, 16) and len(captions) == len(attrs) == 200
    assert sum(isinstance(a, tuple) for a in attrs) == 60  # the scenes come last
    assert all(isinstance(a, dict) for a in attrs[:140]) and all(len(a) == 2 for a in attrs[140:])
    with pytest.raises(ValueError, match="share"):
        shapes.make_shapes_dataset(10, scenes=1.5)


def test_scene_split_holds_out_whole_pairings_whose_swap_is_trained():
    _, _, train = shapes.make_scenes(3000, seed=0)
    _, _, test = shapes.make_scenes(300, seed=0, held_out=True)
    trained = {pairing(a) for a in train}
    held = {tuple(sorted(p)) for p in shapes.SCENE_HELD_OUT}
    assert {pairing(a) for a in test} == held and not trained & held
    assert trained == set(shapes.scene_pairings()) and len(trained) == 105 - len(held)
    for p in shapes.SCENE_HELD_OUT:  # the swap is seen, and every object of it is a training object
        assert tuple(sorted(shapes.swapped(p))) in trained
        assert set(p) <= set(shapes.train_pairs())
    objects = [o for a in train for o in a]
    assert not {(o["color"], o["shape"]) for o in objects} & set(shapes.HELD_OUT)
    for a in train:
        assert a[0]["position"] != a[1]["position"] and {a[0]["position"], a[1]["position"]} <= set(shapes.CORNERS)
        assert (a[0]["color"], a[0]["shape"]) != (a[1]["color"], a[1]["shape"])
    # both orders of naming, every size and corner
    firsts = collections.Counter(pairing(a[:1]) == pairing(a)[:1] for a in train)
    assert min(firsts.values()) > 1000
    assert {o["size"] for o in objects} == set(shapes.SIZES) and {o["position"] for o in objects} == set(shapes.CORNERS)


@pytest.mark.parametrize("captions", ["varied", "six"])
def test_scene_captions_parse_back_to_what_is_drawn(captions):
    _, texts, attrs = shapes.make_scenes(500, seed=1, captions=captions)
    assert len(set(texts)) > (400 if captions == "varied" else 300)
    for text, a in zip(texts, attrs):
        read = shapes.parse_prompt(text)
        assert [{k: o[k] for k in ("color", "shape", "position")} for o in read] == [
            {k: o[k] for k in ("color", "shape", "position")} for o in a
        ], text
        assert all(o["size"] in (None, t["size"]) for o, t in zip(read, a)), text
    assert shapes.scene_caption(attrs[0]) == " and ".join(
        f"a {o['size']} {o['color']} {o['shape']} in the {o['position']}" for o in attrs[0]
    )


def test_one_shape_captions_parse_back_too():
    _, texts, attrs = shapes.make_shapes_dataset(300, seed=2)
    prompts = shapes.eval_prompts("novel")
    for text, a in list(zip(texts, attrs)) + [(p["caption"], p) for p in prompts]:
        assert shapes.parse_prompt(text) == [{k: a[k] for k in KEYS}], text


@pytest.mark.parametrize(
    "prompt,complaint",
    [
        ("a red circle in the top left and a blue square in the top right and a green triangle in the center", "3 obj"),
        ("a red circle in the top left and a blue square in the upper left", "both objects in the top left"),
        ("a pink circle in the top left", "unknown word 'pink'"),
        ("a red circle in the center and a blue square in the top right", "two corners"),
        ("a red thing in the top left", "unknown word 'thing'"),
        ("a red and blue circle in the top left", "both red and blue"),
        ("a red circle", "no position"),
        ("a circle in the top left", "no color"),
        ("red, top left", "names no shape"),
        ("3 red circles in the top left", "unknown word '3'"),
    ],
)
def test_prompts_the_judge_cannot_read_are_refused_in_one_line(prompt, complaint):
    with pytest.raises(ValueError) as e:
        shapes.parse_prompt(prompt)
    assert complaint in str(e.value) and "\n" not in str(e.value)


def test_scene_prompts():
    prompts = shapes.scene_prompts()
    assert prompts == shapes.scene_prompts() and len(prompts) == 48
    held = [p for p in prompts if p["held_out"]]
    seen = [p for p in prompts if not p["held_out"]]
    assert {pairing(p["objects"]) for p in held} == {tuple(sorted(p)) for p in shapes.SCENE_HELD_OUT}
    assert {pairing(p["objects"]) for p in seen} <= set(shapes.scene_pairings())
    by_pairing = collections.defaultdict(list)
    for p in prompts:
        by_pairing[pairing(p["objects"])].append(p)
    for p in shapes.SCENE_HELD_OUT:
        places = lambda q: sorted((o["position"], o["size"], o["color"]) for o in q["objects"])
        mine, swap = by_pairing[tuple(sorted(p))], by_pairing[tuple(sorted(shapes.swapped(p)))]
        assert len(mine) == len(swap) == 4
        # the swap keeps each color's place and size and exchanges the shapes
        assert [places(q) for q in mine] == [places(q) for q in swap]
    for p in prompts:
        assert shapes.parse_prompt(p["caption"]) == p["objects"]


def blobs_by_search(mask):
    """The number of 8-connected blobs of a 2D bool mask, by depth-first search."""
    H, W = mask.shape
    seen, n = set(), 0
    for i in range(H):
        for j in range(W):
            if mask[i, j] and (i, j) not in seen:
                n += 1
                stack = [(i, j)]
                seen.add((i, j))
                while stack:
                    y, x = stack.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            q = (y + dy, x + dx)
                            if 0 <= q[0] < H and 0 <= q[1] < W and mask[q] and q not in seen:
                                seen.add(q)
                                stack.append(q)
    return n


def test_blobs_match_a_depth_first_search():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 20, 24, generator=g) < torch.linspace(0.1, 0.6, 40)[:, None, None]
    labels = shapes._blobs(masks)
    for m, lab in zip(masks, labels):
        assert len(lab.unique()) - (not m.all()) == blobs_by_search(m)
        assert ((lab > 0) == m).all()


@pytest.mark.parametrize("image_size", [16, 32])
def test_two_large_shapes_in_neighbouring_corners_stay_apart(image_size):
    # worst case: both pushed towards each other as far as the jitter allows, at the largest scale
    j, s = shapes.SCENE_JITTER, 1 + shapes.SIZE_JITTER
    for shape in shapes.SHAPES:
        for (p, dx, dy), (q, ex, ey) in [
            (("top left", j, j), ("top right", -j, j)),
            (("top left", j, j), ("bottom left", j, -j)),
            (("bottom right", -j, -j), ("top right", -j, j)),
        ]:
            objects = [
                dict(color="yellow", shape=shape, size="large", position=p, dx=dx, dy=dy, scale=s),
                dict(color="purple", shape=shape, size="large", position=q, dx=ex, dy=ey, scale=s),
            ]
            image = torch.from_numpy(shapes.render_scene(objects, image_size, shapes.SCENE_INSET))
            read = shapes.read_scene(image.permute(2, 0, 1)[None])[0]
            assert len(read) == 2, (shape, p, q, read)


@pytest.mark.parametrize("image_size,sigma,least", [(32, 0.0, 1.0), (64, 0.0, 1.0), (32, 0.1, 0.99), (32, 0.2, 0.98)])
def test_the_scene_judge_reads_rendered_scenes(image_size, sigma, least):
    # the training split and the held-out pairings, clean and with Gaussian pixel noise (a stand-in for samples)
    for held_out in (False, True):
        images, _, attrs = shapes.make_scenes(400 if image_size == 32 else 100, image_size, seed=5, held_out=held_out)
        g = torch.Generator().manual_seed(1)
        x = (images.float() / 127.5 - 1 + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)
        score = shapes.scene_adherence(x, [list(a) for a in attrs])
        assert all(score[k] >= least for k in SCORES), (held_out, score)
        if sigma == 0:  # every shape read exactly, size included
            read = shapes.read_scene(images)
            hits = sum(
                sorted(map(str, r)) == sorted(str({k: o[k] for k in KEYS}) for o in a) for r, a in zip(read, attrs)
            )
            assert hits / len(attrs) >= 0.99


def test_scene_adherence_hand_computed():
    def scene(*objects):
        return torch.from_numpy(shapes.render_scene([dict(zip(KEYS, o)) for o in objects], 32, shapes.SCENE_INSET))

    red_tl, blue_br = ("red", "circle", "small", "top left"), ("blue", "square", "large", "bottom right")
    target = [dict(zip(KEYS, red_tl)), dict(zip(KEYS, blue_br))]
    images = torch.stack(
        [
            scene(red_tl, blue_br),  # all right
            scene(("red", "square", "small", "top left"), ("blue", "circle", "large", "bottom right")),  # swapped
            scene(("blue", "square", "large", "top left"), ("red", "circle", "small", "bottom right")),  # places
            scene(red_tl, blue_br, ("green", "triangle", "small", "top right")),  # a third shape
            scene(red_tl),  # one missing
            torch.full((32, 32, 3), 255, dtype=torch.uint8),  # blank
        ]
    ).permute(0, 3, 1, 2)
    assert shapes.scene_adherence(images, [target] * 6) == dict(count=3 / 6, binding=3 / 6, position=2 / 6)
    # a one-object prompt scores like the one-shape judge's color x shape x position
    one = shapes.scene_adherence(images[:1], [[dict(zip(KEYS, red_tl))]])
    assert one == dict(count=0.0, binding=1.0, position=1.0)


def test_a_run_with_scenes_logs_two_object_adherence_and_one_without_does_not(train_in_process, tiny, tmp_path):
    import json

    logged = {}
    for share in (0.0, 0.5):
        args = tiny + ["--max_steps=2", "--eval_interval=2", "--wandb_mode=disabled", f"--shapes_scenes={share}"]
        run_dir = train_in_process(args + [f"--out_dir={tmp_path / str(share)}", "--steps=2"])
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            logged[share] = [json.loads(line) for line in f if '"val/loss"' in line][-1]
    scene_keys = {f"scenes/w{w}/{s}/{k}" for w in (0, 3) for s in ("seen", "held_out") for k in SCORES}
    assert scene_keys <= set(logged[0.5]) and not scene_keys & set(logged[0.0])
    assert all(0 <= logged[0.5][k] <= 1 for k in scene_keys)
    one_shape = {k for k in logged[0.0] if k.startswith("adherence/")}
    assert one_shape and one_shape <= set(logged[0.5])
