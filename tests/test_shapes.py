"""Tests for shapes.py: the dataset is deterministic, the held-out split is
respected, captions are faithful, and the judge reads the dataset's own images
back (almost) perfectly."""

import math

import pytest
import torch

import shapes

ATTRS = ("color", "shape", "size", "position")


def test_constants():
    assert set(shapes.COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert set(shapes.SIZES) == {"small", "large"} and shapes.SIZES["small"] < shapes.SIZES["large"]
    assert set(shapes.POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}
    # Three held-out pairs: each shape once, three different colours.
    assert len(shapes.HELD_OUT) == 3
    assert sorted(s for _, s in shapes.HELD_OUT) == sorted(shapes.SHAPES)
    assert len({c for c, _ in shapes.HELD_OUT}) == 3
    # A large shape with worst-case jitter stays inside its quadrant.
    reach = shapes.CENTER_JITTER + shapes.SIZES["large"] / 2 * (1 + shapes.SIZE_JITTER)
    assert reach < 0.25


def test_colors_are_well_separated():
    colors = list(shapes.COLORS.values())
    for i, a in enumerate(colors):
        assert math.dist(a, (255, 255, 255)) > 250
        for b in colors[i + 1 :]:
            assert math.dist(a, b) > 75


def test_deterministic():
    a = shapes.make_shapes_dataset(64, seed=3)
    b = shapes.make_shapes_dataset(64, seed=3)
    c = shapes.make_shapes_dataset(64, seed=4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not torch.equal(a[0], c[0]) and a[1] != c[1]


def test_images_are_uint8_on_white():
    for size in (32, 64):
        images, captions, attrs = shapes.make_shapes_dataset(50, image_size=size, seed=0)
        assert images.dtype == torch.uint8 and images.shape == (50, 3, size, size)
        assert len(captions) == len(attrs) == 50
        corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 255).all()


def test_large_corner_shapes_stay_in_their_quadrant():
    images, _, attrs = shapes.make_shapes_dataset(400, image_size=32, seed=1)
    half = 16
    for image, a in zip(images, attrs):
        if a["size"] != "large" or a["position"] == "center":
            continue
        painted = (image < 255).any(dim=0).nonzero()  # (N, 2) rows, cols
        rows = slice(0, half) if "top" in a["position"] else slice(half, 32)
        cols = slice(0, half) if "left" in a["position"] else slice(half, 32)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[rows, cols] = True
        assert inside[painted[:, 0], painted[:, 1]].all(), a


def test_held_out_split():
    _, _, train = shapes.make_shapes_dataset(2000, seed=0, held_out=False)
    _, _, test = shapes.make_shapes_dataset(300, seed=0, held_out=True)
    train_pairs = {(a["color"], a["shape"]) for a in train}
    test_pairs = {(a["color"], a["shape"]) for a in test}
    assert not train_pairs & set(shapes.HELD_OUT)
    assert test_pairs == set(shapes.HELD_OUT)
    assert len(train_pairs) == 15  # all 18 - 3 pairs do occur
    assert {c for c, _ in train_pairs} == set(shapes.COLORS)
    assert {s for _, s in train_pairs} == set(shapes.SHAPES)
    assert {a["size"] for a in train} == set(shapes.SIZES)
    assert {a["position"] for a in train} == set(shapes.POSITIONS)


def test_captions_name_all_attributes():
    _, captions, attrs = shapes.make_shapes_dataset(500, seed=2, captions="six")
    assert len(set(captions)) > 100
    for text, a in zip(captions, attrs):
        for k in ATTRS:
            assert a[k] in text, (text, a)
        # ... and no competing colour, shape or size.
        for vocab, k in ((shapes.COLORS, "color"), (shapes.SHAPES, "shape"), (shapes.SIZES, "size")):
            assert [w for w in vocab if w in text] == [a[k]], text
    # Every phrasing is used and every phrasing names all four attributes.
    for p in range(len(shapes.PHRASINGS)):
        text = shapes.caption("green", "square", "large", "bottom left", phrasing=p)
        assert all(w in text for w in ("green", "square", "large", "bottom left")), text
    assert len(shapes.PHRASINGS) >= 5
    assert shapes.caption("red", "circle", "small", "top left") == "a small red circle in the top left"
    assert shapes.caption("blue", "square", "large", "center") == "a large blue square in the center"


def test_eval_prompts():
    prompts = shapes.eval_prompts()
    assert prompts == shapes.eval_prompts()
    seen = [p for p in prompts if not p["held_out"]]
    held = [p for p in prompts if p["held_out"]]
    assert len(seen) == 15 and len(held) == 12
    assert sorted((p["color"], p["shape"]) for p in seen) == sorted(shapes.train_pairs())
    for pair in shapes.HELD_OUT:
        combos = {(p["size"], p["position"]) for p in held if (p["color"], p["shape"]) == pair}
        assert len(combos) == 4
    for p in prompts:
        assert p["caption"] == shapes.caption(p["color"], p["shape"], p["size"], p["position"])


def check_judge(n, image_size, held_out, seed):
    images, _, attrs = shapes.make_shapes_dataset(n, image_size=image_size, seed=seed, held_out=held_out)
    acc = shapes.adherence(images, attrs)
    for k in ATTRS:
        assert acc[k] >= 0.99, (image_size, held_out, acc)
    return images, attrs


@pytest.mark.parametrize("image_size,n", [(32, 2000), (64, 500)])
@pytest.mark.parametrize("held_out", [False, True])
def test_judge_reads_dataset(image_size, n, held_out):
    check_judge(n, image_size, held_out, seed=10)


def test_judge_accepts_float_in_minus_one_one():
    images, attrs = check_judge(300, 32, False, seed=11)
    as_float = images.float() / 127.5 - 1
    assert shapes.judge(as_float) == shapes.judge(images)


@pytest.mark.parametrize("sigma", [0.1, 0.2])
def test_judge_tolerates_noise(sigma):
    # A stand-in for imperfect generated samples: Gaussian pixel noise. Generated squares have uneven
    # paint too: before interior pixels counted 1 whatever their shade, noise of 0.2 lowered squares'
    # measured fill ratio towards a circle's, and 0.971 of these shapes were read right (0.987 since;
    # the rest are squares whose noisy edges widen the box).
    images, _, attrs = shapes.make_shapes_dataset(1000, image_size=32, seed=12)
    g = torch.Generator().manual_seed(1)
    noisy = (images.float() / 127.5 - 1 + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    acc = shapes.adherence(noisy, attrs)
    assert all(acc[k] >= 0.985 for k in ATTRS), acc


def test_uneven_paint_inside_a_square_keeps_its_fill_ratio():
    # A 12 px red square on the pixel grid, then every other interior pixel paled towards white:
    # the shape has not changed, so neither may its area and fill ratio (exactly those of the even square).
    even = torch.ones(1, 3, 32, 32)
    even[0, :, 8:20, 8:20] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    uneven = even.clone()
    checker = (torch.arange(12)[:, None] + torch.arange(12)[None]) % 2 == 0
    inner = uneven[0, :, 9:19, 9:19]
    inner[:, checker[1:11, 1:11]] = inner[:, checker[1:11, 1:11]] * 0.6 + 0.4
    m_even, m_uneven = shapes.measure(even), shapes.measure(uneven)
    assert m_even["fill"].item() == pytest.approx(1.0) and m_even["area"].item() == pytest.approx(144 / 1024)
    assert m_uneven["fill"].item() == pytest.approx(1.0) and m_uneven["area"].item() == pytest.approx(144 / 1024)
    assert shapes.judge(uneven)[0]["shape"] == "square"


def test_judge_runs_at_16px():
    images, _, attrs = shapes.make_shapes_dataset(500, image_size=16, seed=13)
    acc = shapes.adherence(images, attrs)
    assert all(acc[k] >= 0.95 for k in ATTRS), acc


def test_blank_image_is_all_none():
    white = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    assert shapes.judge(white) == [dict(color=None, shape=None, size=None, position=None)] * 2
    # The same for a float image in [-1, 1] with a single stray speckle.
    speckled = torch.ones(1, 3, 64, 64)
    speckled[0, :, 10, 10] = -1
    assert shapes.judge(speckled)[0]["color"] is None


def test_adherence_hand_computed():
    targets = [
        dict(color="red", shape="circle", size="small", position="top left"),
        dict(color="blue", shape="square", size="large", position="center"),
        dict(color="green", shape="triangle", size="large", position="bottom right"),
        dict(color="purple", shape="circle", size="small", position="top right"),
    ]
    images = torch.stack(
        [
            torch.from_numpy(shapes.render("red", "circle", "small", "top left")),  # all right
            torch.from_numpy(shapes.render("blue", "circle", "small", "center")),  # shape, size wrong
            torch.from_numpy(
                shapes.render("orange", "triangle", "small", "bottom left")
            ),  # color, size, position wrong
            torch.full((32, 32, 3), 255, dtype=torch.uint8),  # blank: all wrong
        ]
    ).permute(0, 3, 1, 2)
    assert shapes.adherence(images, targets) == {
        "color": 2 / 4,
        "shape": 2 / 4,
        "size": 1 / 4,
        "position": 2 / 4,
    }
