"""Shapes: a procedurally generated, captioned toy dataset, and a judge for it.

Each image shows exactly one flat-coloured shape on a white background. A
shape is described by four independent attributes:

    color     one of 6   red, green, blue, yellow, purple, orange
    shape     one of 3   circle, square, triangle
    size      one of 2   small, large
    position  one of 5   top left, top right, bottom left, bottom right, center

and the caption states all four, in one of several phrasings, e.g.
"a small red circle in the top left" or "bottom right: a large purple circle".
Because every attribute is visible and the images are synthetic, we can check
whether a text-conditioned generator did what the caption asked: `judge` reads
the four attributes back out of an image with a few lines of pixel statistics,
and `adherence` turns that into a per-attribute accuracy.

Compositional generalisation. Three colour x shape pairs (`HELD_OUT`) never
occur in the training split, although their colour and their shape each occur
with other partners. Asking the model for, say, a red triangle after it has
only seen red circles/squares and green/blue/... triangles measures whether it
has learnt the attributes separately or only memorised the combinations.
`eval_prompts` gives a fixed list of seen and held-out prompts for this.

Scenes of two shapes (`make_scenes`, mixed in by `make_shapes_dataset(scenes=...)`). Two shapes in
two different corners, captioned in varied wordings and either order. Held out besides the three
pairs: whole pairings (`SCENE_HELD_OUT`), each the attribute swap of a pairing that training shows
(training has a red square with a green circle, the test asks for a red circle with a green
square). `read_scene` reads every shape of an image, `scene_adherence` scores prompts as GenEval
does (count, binding of color to shape, position), `parse_prompt` turns a prompt into the objects
the judge scores, or says in one line what it cannot read.

Rendering. A shape is drawn with PIL at 4x the target resolution and box-
downsampled, so edge pixels are exact area-weighted blends with white
(anti-aliasing). Small random jitter of centre and size makes images differ
without ever making an attribute ambiguous: even with jitter a large shape
stays inside its quadrant, and small and large never overlap in size.
"""

import itertools
import math
import re
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# Vocabulary. The names are what appear in captions and what `judge` returns.
# ---------------------------------------------------------------------------

# Saturated colours, chosen to be far apart from each other and from white so
# that a nearest-colour rule separates them even after blending at edges. The
# closest pair (orange/yellow) is still 80 RGB units apart; every colour is
# more than 260 units from white.
COLORS = {
    "red": (220, 20, 20),
    "green": (20, 170, 20),
    "blue": (20, 40, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 30, 180),
    "orange": (245, 120, 0),
}

SHAPES = ("circle", "square", "triangle")

# Side of the shape's bounding box as a fraction of the image side. "large"
# is chosen as big as it can be while, with worst-case jitter, still fitting
# in its quadrant: CENTER_JITTER + 0.40 / 2 * (1 + SIZE_JITTER) = 0.246 < 0.25.
# Worst-case small (0.27) and large (0.368) sides remain well apart.
SIZES = {"small": 0.25, "large": 0.40}

# Centre (x, y) of the shape's bounding box as fractions of the image; y grows
# downwards, as in image coordinates. Corners are the centres of the quadrants.
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

# Colour x shape pairs never shown in training, used to measure compositional
# generalisation. Each shape is held out once, each with a different colour,
# so every colour and every shape still occurs in training via other pairs.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

# Jitter, uniform in +-value: the centre moves by up to 3% of the image side in
# x and y, the side length is scaled by up to +-8%.
CENTER_JITTER = 0.03
SIZE_JITTER = 0.08

# Shapes are drawn at this multiple of the output resolution, then averaged
# down; 4x4 supersampling gives 17 grey levels per edge pixel.
SUPERSAMPLE = 4

WHITE = (255, 255, 255)

# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

# Several phrasings so that the text encoder has to extract the attributes
# rather than rely on a fixed template. Every phrasing names all four. Phrasing
# 0 is the canonical one used for evaluation. "{where}" is the position as a
# place ("top left corner" / "center"), for phrasings where "the top left"
# alone would read oddly.
PHRASINGS = (
    "a {size} {color} {shape} in the {position}",
    "{color} {shape}, {where}, {size}",
    "a picture of a {size} {color} {shape} in the {position}",
    "{size} {color} {shape} at the {position}",
    "{position}: a {size} {color} {shape}",
    "a {color} {shape}, {size}, in the {where}",
)


def caption(color, shape, size, position, phrasing=0):
    """Describe one image in words; `phrasing` indexes PHRASINGS."""
    where = position if position == "center" else position + " corner"
    return PHRASINGS[phrasing].format(color=color, shape=shape, size=size, position=position, where=where)


# Varied captions ("varied", what every recipe trains on): the six phrasings above are all a
# model ever reads with captions="six", and a user's own wording ("a big
# circle in the upper left") then loses the position first. The varied set
# adds word orders, synonyms and ways of naming a place. Each template takes
# {place}, a whole phrase such as "in the upper left corner".
SYNONYMS = {
    "small": ("small", "little"),
    "large": ("large", "big"),
    "top left": ("top left", "upper left", "top-left"),
    "top right": ("top right", "upper right", "top-right"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
    "center": ("center", "middle", "centre"),
}
PLACES = {"corner": ("in the {p}", "in the {p} corner", "at the {p}"), "center": ("in the {p}", "at the {p}")}
VARIED_TEMPLATES = (
    "a {size} {color} {shape} {place}",
    "{color} {shape}, {place}, {size}",
    "a picture of a {size} {color} {shape} {place}",
    "{size} {color} {shape} {place}",
    "{place}: a {size} {color} {shape}",
    "a {color} {shape}, {size}, {place}",
    "{place}, a {size} {color} {shape}",
    "a {color} {shape} that is {size}, {place}",
    "{size} {shape}, {color}, {place}",
    "an image of a {color} {size} {shape} {place}",
)

# Wordings that no training caption uses, under either setting: new verbs and
# sentence shapes around the same attribute words. The judge's "novel" prompts
# use them, to test whether the model understood the words or the templates.
NOVEL_TEMPLATES = (
    "draw a {size} {color} {shape} {place}",
    "{place} there is a {size} {color} {shape}",
    "the {shape} is {color} and {size}, and it sits {place}",
    "one {color} {shape} of {size} size, placed {place}",
    "show me a {shape}: {color}, {size}, {place}",
    "{size} and {color}, a {shape} {place}",
)


def varied_caption(color, shape, size, position, rng, templates=VARIED_TEMPLATES):
    """A caption in a template, synonyms and place phrase drawn with the numpy Generator `rng`."""
    p = SYNONYMS[position][rng.integers(len(SYNONYMS[position]))]
    places = PLACES["center" if position == "center" else "corner"]
    place = places[rng.integers(len(places))].format(p=p)
    return templates[rng.integers(len(templates))].format(
        color=color, shape=shape, size=SYNONYMS[size][rng.integers(2)], place=place
    )


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def train_pairs():
    """All colour x shape pairs of the training split, in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]


def render(color, shape, size, position, image_size=32, dx=0.0, dy=0.0, scale=1.0):
    """Draw one shape on white; returns a uint8 array (image_size, image_size, 3).

    dx, dy shift the centre (fractions of the image side) and `scale`
    multiplies the side length; they carry the random jitter.
    """
    return render_scene(
        [dict(color=color, shape=shape, size=size, position=position, dx=dx, dy=dy, scale=scale)], image_size
    )


def render_scene(objects, image_size=32, inset=0.0):
    """Draw shapes on one white canvas: `objects` are dicts of render's arguments (color, shape, size,
    position, dx, dy, scale); `inset` moves corner positions that much further out (scenes)."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), WHITE)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        cx, cy = (c if c == 0.5 else c + math.copysign(inset, c - 0.5) for c in POSITIONS[o["position"]])
        cx, cy = cx + o.get("dx", 0.0), cy + o.get("dy", 0.0)
        half = SIZES[o["size"]] * o.get("scale", 1.0) / 2
        # Bounding box in supersampled pixels. PIL's second corner is inclusive,
        # hence the -1, so the drawn side is right - left + 1 = side * big pixels.
        left, top = round((cx - half) * big), round((cy - half) * big)
        right, bottom = round((cx + half) * big) - 1, round((cy + half) * big) - 1
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif o["shape"] == "triangle":
            # Upright isosceles triangle: apex at the top centre, base spanning the
            # full width of the box, so it fills the box in both directions.
            apex = ((left + right) / 2, top)
            draw.polygon((apex, (right, bottom), (left, bottom)), fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}")

    # Box filtering = averaging each 4x4 block = exact area coverage per pixel.
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.array(small)  # a writable copy, so torch.from_numpy is happy


def make_shapes_dataset(n, image_size=32, seed=0, held_out=False, captions="varied", scenes=0.0):
    """Generate `n` captioned images.

    captions="six": one of the six PHRASINGS per image, whose words are the attribute names
    themselves; "varied": VARIED_TEMPLATES with SYNONYMS, what the recipes train on (train_diffusion.py
    passes its shapes_captions setting). The wordings come from a second random stream, so images and
    attributes are the same under both.

    Returns (images, captions, attrs): images is a uint8 tensor
    (n, 3, image_size, image_size); captions a list of n strings; attrs a list
    of n dicts with keys color, shape, size, position. With held_out=False only
    training colour x shape pairs are drawn, with held_out=True only HELD_OUT
    pairs. All choices are uniform and fully determined by `seed`.

    scenes: the share of the n images that are scenes of two shapes (make_scenes, from their own random
    stream), appended after the one-shape images; their attrs entry is a tuple of two dicts. With
    held_out=True the scenes are the held-out pairings (SCENE_HELD_OUT). scenes=0 gives the images
    that every earlier result was trained on.
    """
    if not 0 <= scenes <= 1:
        raise ValueError(f"scenes is a share of the images, in [0, 1], not {scenes!r}")
    n_scenes = round(n * scenes)
    if n_scenes:
        images, texts, attrs = make_shapes_dataset(n - n_scenes, image_size, seed, held_out, captions)
        s_images, s_texts, s_attrs = make_scenes(n_scenes, image_size, seed, held_out, captions)
        return torch.cat([images, s_images]), texts + s_texts, attrs + s_attrs
    rng = np.random.default_rng(seed)
    pairs = list(HELD_OUT) if held_out else train_pairs()
    sizes = list(SIZES)
    positions = list(POSITIONS)

    # Draw every random number up front, in a fixed order, so the output
    # depends only on (n, seed, held_out) and not on how rendering proceeds.
    pair_idx = rng.integers(len(pairs), size=n)
    size_idx = rng.integers(len(sizes), size=n)
    pos_idx = rng.integers(len(positions), size=n)
    phrasing_idx = rng.integers(len(PHRASINGS), size=n)
    shift = rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=(n, 2))
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, size=n)

    if captions not in ("six", "varied"):
        raise ValueError(f"captions must be 'six' or 'varied', got {captions!r}")
    wording_rng = np.random.default_rng([seed, 1])

    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    texts, attrs = [], []
    for i in range(n):
        color, shape = pairs[pair_idx[i]]
        a = dict(color=color, shape=shape, size=sizes[size_idx[i]], position=positions[pos_idx[i]])
        images[i] = render(**a, image_size=image_size, dx=shift[i, 0], dy=shift[i, 1], scale=scale[i])
        texts.append(
            caption(**a, phrasing=int(phrasing_idx[i])) if captions == "six" else varied_caption(**a, rng=wording_rng)
        )
        attrs.append(a)

    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return images, texts, attrs


def eval_prompts(wording="canonical"):
    """A fixed list of evaluation prompts, each a dict with keys caption, color,
    shape, size, position, held_out.

    Every training pair appears once and every held-out pair four times, with
    position and size cycled deterministically so that all positions and both
    sizes are exercised. Captions use the canonical phrasing, or with
    wording="novel" the NOVEL_TEMPLATES (and synonyms), which no training caption uses.
    """
    if wording not in ("canonical", "novel"):
        raise ValueError(f"wording must be 'canonical' or 'novel', got {wording!r}")
    rng = np.random.default_rng(2024)
    sizes = list(SIZES)
    positions = list(POSITIONS)
    prompts = []

    def add(color, shape, size, position, is_held_out):
        text = (
            caption(color, shape, size, position)
            if wording == "canonical"
            else varied_caption(color, shape, size, position, rng, NOVEL_TEMPLATES)
        )
        prompts.append(
            dict(
                caption=text,
                color=color,
                shape=shape,
                size=size,
                position=position,
                held_out=is_held_out,
            )
        )

    for i, (color, shape) in enumerate(train_pairs()):
        add(color, shape, sizes[i % 2], positions[i % 5], False)
    for j, (color, shape) in enumerate(HELD_OUT):
        # Four distinct positions per pair, alternating size.
        for k in range(4):
            add(color, shape, sizes[(j + k) % 2], positions[(j + k) % 5], True)
    return prompts


# ---------------------------------------------------------------------------
# Scenes of two shapes
# ---------------------------------------------------------------------------

# A scene puts two shapes in two different corners (a shape in the center would overlap a large one in a corner).
# Each sits SCENE_INSET further out than a lone shape and moves less (SCENE_JITTER), so that two large shapes in
# neighbouring corners keep white between them, more than a pixel wide even at 16 px, and the judge reads two blobs:
# a large shape's inner edge is at most 0.25 - 0.025 + 0.008 + 0.40 * 1.08 / 2 = 0.449 of the side from its edge
# of the image, its outer edge at least 0.001 inside the image.
CORNERS = ("top left", "top right", "bottom left", "bottom right")
SCENE_INSET = 0.025
SCENE_JITTER = 0.008

# Pairings of two objects (colour x shape pairs of the training split) never shown together in training. Each is the
# attribute swap of a pairing that is shown: training has a red square with a green circle, the test asks for a red
# circle with a green square. Every object in them is seen alone and with other partners, so only the binding is new.
SCENE_HELD_OUT = (
    (("red", "circle"), ("green", "square")),
    (("blue", "square"), ("orange", "triangle")),
    (("yellow", "triangle"), ("purple", "circle")),
    (("green", "triangle"), ("orange", "circle")),
    (("purple", "square"), ("blue", "triangle")),
    (("red", "square"), ("purple", "circle")),
)


def swapped(pairing):
    """The pairing with its shapes exchanged: (red circle, green square) -> (red square, green circle)."""
    (c1, s1), (c2, s2) = pairing
    return ((c1, s2), (c2, s1))


def scene_pairings(held_out=False):
    """Unordered pairings of two different training objects, each a sorted tuple: those of the training
    split (all but SCENE_HELD_OUT), or with held_out=True SCENE_HELD_OUT itself."""
    held = sorted(tuple(sorted(p)) for p in SCENE_HELD_OUT)
    if held_out:
        return held
    return [p for p in itertools.combinations(sorted(train_pairs()), 2) if p not in held]


# Scene captions: each object in a phrase of its own, the two joined in one of several ways, named in either order.
# {place} is a phrase ("in the upper left corner"), {where} a place's bare name ("upper left"). Some phrases leave the
# size out, as people do; the scene judge does not score size.
OBJECT_PHRASES = (
    "a {size} {color} {shape} {place}",
    "{place} a {size} {color} {shape}",
    "a {color} {size} {shape} {place}",
    "a {color} {shape} {place}",
    "{where}: a {size} {color} {shape}",
    "{where}: a {color} {shape}",
)
SCENE_TEMPLATES = ("{a} and {b}", "{a}; {b}", "{a}, and {b}", "two shapes: {a} and {b}", "a picture of {a} and {b}")


def scene_caption(objects, rng=None):
    """Words for a scene of two objects (dicts with color, shape, size, position), in the order given: the canonical
    "a small red circle in the top left and a large blue square in the bottom right" without `rng`, else phrases,
    synonyms and a template drawn with the numpy Generator `rng`."""
    if rng is None:
        return " and ".join(f"a {o['size']} {o['color']} {o['shape']} in the {o['position']}" for o in objects)
    phrases = []
    for o in objects:
        where = SYNONYMS[o["position"]][rng.integers(len(SYNONYMS[o["position"]]))]
        place = PLACES["corner"][rng.integers(len(PLACES["corner"]))].format(p=where)
        size = SYNONYMS[o["size"]][rng.integers(2)]
        phrase = OBJECT_PHRASES[rng.integers(len(OBJECT_PHRASES))]
        phrases.append(phrase.format(size=size, color=o["color"], shape=o["shape"], place=place, where=where))
    return SCENE_TEMPLATES[rng.integers(len(SCENE_TEMPLATES))].format(a=phrases[0], b=phrases[1])


def make_scenes(n, image_size=32, seed=0, held_out=False, captions="varied"):
    """`n` captioned scenes of two shapes, as make_shapes_dataset returns them; each attrs entry is a tuple of two
    dicts (color, shape, size, position), in the order the caption names them. A pairing of the training split (or
    with held_out=True a held-out one), two different corners, sizes and jitter, all uniform from `seed` (a stream of
    their own); captions="six" gives the canonical wording, "varied" scene_caption's."""
    rng = np.random.default_rng([seed, 2])
    pairings = scene_pairings(held_out)
    pairing_idx = rng.integers(len(pairings), size=n)
    first = rng.integers(2, size=n)  # which object the caption names first
    corners = rng.random((n, len(CORNERS))).argsort(axis=1)[:, :2]  # two different corners
    size_idx = rng.integers(len(SIZES), size=(n, 2))
    shift = rng.uniform(-SCENE_JITTER, SCENE_JITTER, size=(n, 2, 2))
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, size=(n, 2))
    wording_rng = np.random.default_rng([seed, 3])

    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    texts, attrs = [], []
    for i in range(n):
        pair = pairings[pairing_idx[i]]
        pair = pair if first[i] == 0 else pair[::-1]
        objects = tuple(
            dict(color=c, shape=s, size=list(SIZES)[size_idx[i, k]], position=CORNERS[corners[i, k]])
            for k, (c, s) in enumerate(pair)
        )
        jitter = [dict(dx=shift[i, k, 0], dy=shift[i, k, 1], scale=scale[i, k]) for k in range(2)]
        images[i] = render_scene([o | j for o, j in zip(objects, jitter)], image_size, inset=SCENE_INSET)
        texts.append(scene_caption(objects, None if captions == "six" else wording_rng))
        attrs.append(objects)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), texts, attrs


def scene_prompts():
    """The judge's two-object prompts: every held-out pairing and its attribute swap (a pairing seen in training), in
    the same four placements each (corners, sizes and which object is named first cycled), canonical wording.
    Each a dict: caption, objects (two dicts: color, shape, size, position), held_out."""
    corner_pairs = list(itertools.combinations(CORNERS, 2))  # 6
    sizes = list(SIZES)
    prompts = []
    for j, pairing in enumerate(SCENE_HELD_OUT):
        for held, pair in ((True, pairing), (False, swapped(pairing))):
            for k in range(4):
                places = corner_pairs[(j + k) % len(corner_pairs)]
                objects = [
                    dict(color=c, shape=s, size=sizes[(k >> m) & 1], position=places[m])
                    for m, (c, s) in enumerate(pair)
                ]
                objects = objects[::-1] if k % 2 else objects
                prompts.append(dict(caption=scene_caption(objects), objects=objects, held_out=held))
    return prompts


# The words a prompt for the judge may use: the attributes' names and synonyms, and the other words of every template.
_POSITION_WORDS = {w: p for p in POSITIONS for w in SYNONYMS[p]}
_SIZE_WORDS = {w: s for s in SIZES for w in SYNONYMS[s]}
_TEMPLATE_WORDS = {
    w
    for t in PHRASINGS + VARIED_TEMPLATES + NOVEL_TEMPLATES + OBJECT_PHRASES + SCENE_TEMPLATES + PLACES["corner"]
    for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))
}


def parse_prompt(text):
    """The objects a prompt asks for, as the judge scores them: a list of one or two dicts (color, shape, size or
    None, position). Objects are separated by "and" or ";" (parts without a shape belong to their neighbour, as in
    "small and red, a circle in the top left"). Raises ValueError, in one line, naming what it did not understand: an
    unknown word, an object without a color, shape or place, three objects, two in one place, or a second object with
    one in the center (scenes put their shapes in two corners)."""
    words_re = "|".join(sorted(map(re.escape, _POSITION_WORDS), key=len, reverse=True))
    parts = [p for p in re.split(r"\band\b|;", text.lower()) if p.strip()]
    tokens = []  # per part: [(kind, value)]
    for part in parts:
        found = []
        for m in re.finditer(rf"({words_re})\b|[a-z]+(?:-[a-z]+)*|[^\sa-z,.:!]", part):
            w = m.group(0)
            if w in _POSITION_WORDS:
                found.append(("position", _POSITION_WORDS[w]))
            elif w in COLORS:
                found.append(("color", w))
            elif w in SHAPES:
                found.append(("shape", w))
            elif w in _SIZE_WORDS:
                found.append(("size", _SIZE_WORDS[w]))
            elif w not in _TEMPLATE_WORDS:
                raise ValueError(
                    f"prompt {text!r}: unknown word {w!r}; the judge knows the colors {', '.join(COLORS)}, the shapes "
                    f"{', '.join(SHAPES)}, small/large and the places {', '.join(POSITIONS)}"
                )
        tokens.append(found)
    # a part without a shape joins the next part, or the previous one at the end
    groups, pending = [], []
    for found in tokens:
        pending += found
        if any(k == "shape" for k, _ in pending):
            groups.append(pending)
            pending = []
    if pending:
        if not groups:
            raise ValueError(f"prompt {text!r} names no shape ({', '.join(SHAPES)})")
        groups[-1] += pending
    if len(groups) > 2:
        raise ValueError(f"prompt {text!r} names {len(groups)} objects: the judge reads one or two")
    objects = []
    for g in groups:
        o = {}
        for kind, value in g:
            if kind in o and o[kind] != value:
                raise ValueError(
                    f"prompt {text!r}: one object is both {o[kind]} and {value}; separate two objects with 'and' or ';'"
                )
            o[kind] = value
        shape = o.get("shape")
        for kind in ("color", "position"):
            if kind not in o:
                raise ValueError(f"prompt {text!r}: the {shape} has no {kind}")
        objects.append(dict(color=o["color"], shape=shape, size=o.get("size"), position=o["position"]))
    if len(objects) == 2:
        if objects[0]["position"] == objects[1]["position"]:
            raise ValueError(f"prompt {text!r} puts both objects in the {objects[0]['position']}: give two places")
        if "center" in (objects[0]["position"], objects[1]["position"]):
            raise ValueError(f"prompt {text!r}: a scene of two shapes puts them in two corners, not the center")
    return objects


# ---------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------

# A pixel is foreground if its RGB distance from white (channels in [0, 1], so
# the distance is at most sqrt(3)) exceeds this. The palest colours (yellow,
# purple) are ~1.03 from white, so a pixel counts once about a third of it is
# covered by the shape; generated backgrounds that are a little off-white stay
# background.
FOREGROUND_THRESHOLD = 0.35

# A foreground pixel with fewer than this many foreground pixels in its 3x3
# neighbourhood (itself included) is a speckle, not part of a shape.
MIN_NEIGHBOURS = 3

# Fewer foreground pixels than this fraction of the image means "no shape".
# The smallest shape in the dataset covers about 2.6% of the image.
MIN_AREA_FRACTION = 0.005

# Area / bounding-box area of the ideal shapes. A square fills its box, a
# circle pi/4 of it, our triangle (base = height = box side) half of it.
FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}

# Vertical skewness of the ideal shapes' mass. Circle and square are
# symmetric (0); the upright triangle has most of its mass near its base, a
# long tail towards the apex: skewness -2*sqrt(2)/5 = -0.57 (y grows down).
TRIANGLE_SKEW = -2 * math.sqrt(2) / 5


def _to_unit_float(images):
    """uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 1], on the CPU."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


def _count_3x3(mask):
    """Number of set pixels in each pixel's 3x3 neighbourhood; mask (B, H, W)."""
    H, W = mask.shape[1:]
    padded = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    return sum(padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3))


def _foreground(x):
    """(distance from white, foreground mask without speckles), both (B, H, W), of images x in [0, 1]."""
    distance = ((1 - x) ** 2).sum(dim=1).sqrt()  # (B, H, W): 0 for white
    mask = distance > FOREGROUND_THRESHOLD
    return distance, mask & (_count_3x3(mask) >= MIN_NEIGHBOURS)


def measure(images):
    """Per-image measurements that `judge` classifies; all tensors of length B.

    found      whether there is a shape at all (enough foreground pixels);
    rgb        mean colour (in [0, 1]) of the interior foreground pixels, i.e.
               those not touching background, which are free of the blending
               with white that anti-aliased edges have;
    area       fraction of the image covered by the shape, counting interior
               pixels as 1 and edge pixels by their coverage (distance from
               white relative to the interior colour's, at most 1);
    centroid   coverage-weighted centre (x, y) as fractions of the image;
    fill       area / bounding-box area, where the box width is the sum over
               columns of each column's largest coverage (so partially covered
               edge columns count fractionally), and likewise the height;
    skew       skewness of the coverage's vertical distribution.
    """
    x = _to_unit_float(images)
    B, _, H, W = x.shape
    distance, mask = _foreground(x)
    found = mask.flatten(1).sum(dim=1) >= MIN_AREA_FRACTION * H * W

    # Interior: all 9 pixels of the neighbourhood are foreground. Fall back to
    # the whole foreground for shapes too small or ragged to have an interior.
    interior = mask & (_count_3x3(mask) == 9)
    has_interior = interior.flatten(1).any(dim=1)
    core = torch.where(has_interior[:, None, None], interior, mask).float()
    core_pixels = core.flatten(1).sum(dim=1).clamp(min=1)
    rgb = (x * core[:, None]).flatten(2).sum(dim=2) / core_pixels[:, None]

    # Coverage: 1 inside, fractional at anti-aliased edges, 0 in the background.
    # Interior pixels count 1 whatever their shade: a generated shape's paint is
    # uneven, and a pixel paler than the mean would otherwise count as partly
    # background, pulling a square's fill ratio towards a circle's.
    core_distance = (1 - rgb).norm(dim=1).clamp(min=1e-6)
    coverage = torch.where(interior, 1.0, (distance / core_distance[:, None, None]).clamp(0, 1) * mask)
    pixels = coverage.flatten(1).sum(dim=1).clamp(min=1e-6)

    # Moments of the column and row profiles; +0.5 puts each pixel's mass at
    # its centre.
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W
    ys = (torch.arange(H, dtype=torch.float32) + 0.5) / H
    column_mass, row_mass = coverage.sum(dim=1), coverage.sum(dim=2)
    cx = (column_mass * xs).sum(dim=1) / pixels
    cy = (row_mass * ys).sum(dim=1) / pixels
    dy = ys[None] - cy[:, None]
    var_y = (row_mass * dy**2).sum(dim=1) / pixels
    skew = (row_mass * dy**3).sum(dim=1) / pixels / var_y.clamp(min=1e-12) ** 1.5

    width = coverage.amax(dim=1).sum(dim=1)  # largest coverage in each column
    height = coverage.amax(dim=2).sum(dim=1)
    fill = pixels / (width * height).clamp(min=1e-6)

    return dict(
        found=found, rgb=rgb, area=pixels / (H * W), centroid=torch.stack([cx, cy], dim=1), fill=fill, skew=skew
    )


def judge(images):
    """Read color, shape, size and position back out of a batch of images.

    images: (B, 3, H, W), either uint8 or float in [-1, 1] (the diffusion
    model's output range), any H = W >= 16. Returns a list of B dicts with keys
    color, shape, size, position; all four are None when no shape is found.
    See `measure` for the measurements. The rules:

      color     the COLORS entry nearest to the interior's mean colour, where
                a colour also stands for its mixtures with white;
      position  the POSITIONS entry nearest to the centroid;
      shape     triangle if the mass is bottom-heavy (skewness nearer the
                triangle's than 0), otherwise square or circle by whichever
                fill ratio (1 or pi/4) is nearer. Skewness rather than fill
                ratio separates triangles because, at 32 px and below, blurred
                corners push a small triangle's measured fill ratio up towards
                a circle's, while its lopsidedness survives;
      size      area against the threshold halfway (on a log scale) between
                the areas of small and large versions of the judged shape. It
                depends on the shape because a large triangle covers little
                more than a small square (0.08 vs 0.0625 of the image).
    """
    m = measure(images)
    # Edge pixels are the colour mixed with white, so a small shape's mean
    # colour is paler than its paint. Compare against each colour's whole
    # white-to-colour segment rather than its endpoint: paling then never
    # turns, e.g., red into orange.
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
    towards = palette - 1  # (6, 3): white -> colour
    offset = m["rgb"] - 1  # (B, 3): white -> measured
    mix = ((offset @ towards.T) / (towards**2).sum(dim=1)).clamp(0, 1)  # (B, 6)
    residual = offset[:, None] - mix[..., None] * towards[None]
    color_idx = residual.norm(dim=2).argmin(dim=1).tolist()
    centres = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)
    position_idx = torch.cdist(m["centroid"], centres).argmin(dim=1).tolist()
    found, area, fill, skew = (m[k].tolist() for k in ("found", "area", "fill", "skew"))

    color_names, position_names = list(COLORS), list(POSITIONS)
    square_circle_boundary = (FILL_RATIO["square"] + FILL_RATIO["circle"]) / 2
    results = []
    for i in range(len(found)):
        if not found[i]:
            results.append(dict(color=None, shape=None, size=None, position=None))
            continue
        if skew[i] < TRIANGLE_SKEW / 2:
            shape = "triangle"
        elif fill[i] > square_circle_boundary:
            shape = "square"
        else:
            shape = "circle"
        # Geometric mean of the two areas = area of a shape of side
        # sqrt(small * large), equally far from both in ratio.
        size_threshold = FILL_RATIO[shape] * SIZES["small"] * SIZES["large"]
        results.append(
            dict(
                color=color_names[color_idx[i]],
                shape=shape,
                size="large" if area[i] > size_threshold else "small",
                position=position_names[position_idx[i]],
            )
        )
    return results


def adherence(images, targets):
    """Fraction of images whose judged attribute matches the target, for each of
    color, shape, size and position. targets: list of dicts with those keys
    (e.g. from eval_prompts). An image with no detectable shape counts as wrong.
    """
    judged = judge(images)
    assert len(judged) == len(targets), "one target per image"
    keys = ("color", "shape", "size", "position")
    return {k: sum(j[k] == t[k] for j, t in zip(judged, targets)) / len(targets) for k in keys}


def _blobs(mask):
    """Labels of the 8-connected blobs of mask (B, H, W): 0 off the mask, on it the largest pixel number
    (1-based) in the pixel's blob, spread by repeated 3x3 maxima until nothing changes."""
    B, H, W = mask.shape
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W) * mask  # exact: H * W < 2^24
    while True:
        grown = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def read_scene(images):
    """Every shape in each image of a batch (B, 3, H, W), uint8 or float in [-1, 1]: a list per image of dicts
    (color, shape, size, position). A shape is a blob of foreground (8-connected, after `measure`'s speckle rule)
    of at least MIN_AREA_FRACTION of the image, read by `judge` as if it were alone: its image with every pixel off
    the blob white. Two shapes that touch are one blob, read as one shape, as a detector would."""
    x = _to_unit_float(images)
    B, _, H, W = x.shape
    labels = _blobs(_foreground(x)[1])
    alone, owner = [], []
    for b in range(B):
        for label in labels[b].unique().tolist():
            blob = labels[b] == label
            if label and blob.sum() >= MIN_AREA_FRACTION * H * W:
                alone.append(torch.where(blob, x[b], 1.0))
                owner.append(b)
    read = [[] for _ in range(B)]
    for b, shape in zip(owner, judge(torch.stack(alone) * 2 - 1) if alone else []):
        read[b].append(shape)
    return read


def scene_adherence(images, targets):
    """For prompts of one or more objects (targets: per image a list of dicts with color, shape, position), the
    share of images where, as GenEval scores them:
      count     the judge reads as many shapes as the prompt names;
      binding   every named object, color and shape together, is among the shapes read: a red square and a blue
                circle do not count for "a red circle and a blue square";
      position  every named object is read with its color and shape at its place.
    Extra shapes do not undo binding or position; count says so. Size is not scored."""
    read = read_scene(images)
    assert len(read) == len(targets), "one target per image"

    def all_there(shapes_read, objects, keys):  # as multisets: two red circles need two
        have = Counter(tuple(s[k] for k in keys) for s in shapes_read)
        return not Counter(tuple(o[k] for k in keys) for o in objects) - have

    n = len(targets)
    return dict(
        count=sum(len(r) == len(t) for r, t in zip(read, targets)) / n,
        binding=sum(all_there(r, t, ("color", "shape")) for r, t in zip(read, targets)) / n,
        position=sum(all_there(r, t, ("color", "shape", "position")) for r, t in zip(read, targets)) / n,
    )


# ---------------------------------------------------------------------------
# Judging a model: sample the evaluation prompts, judge the images
# ---------------------------------------------------------------------------


@torch.no_grad()
def sample_adherence(model, scheduler, prompts, cond, uncond, settings, guidance_scales, seed, autocast=None):
    """Sample the judge's prompts (shapes.eval_prompts() or scene_prompts(), embedded as cond) with the sampler
    `settings` (a diffusion_model.SamplerConfig) at each of the guidance scales, one noise stream per prompt
    from `seed`, and judge the images (adherence, or scene_adherence for scenes).
    Returns {w: {"seen": {attr: frac}, "held_out": {attr: frac}}}.
    Deterministic samplers (DDIM at eta = 0, DPM-Solver++) depend on the prediction target: an
    eps-predicting model's first x0 guess at t = T-1 is noise that they carry to the end (position is
    lost), while a v-predicting model, as in the recipes, is judged the same as with DDPM."""
    import contextlib

    # here, not at the top: the dataset and the judge need no model
    from diffusion_model import image_generators, sample

    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    results = {}
    for w in guidance_scales:
        with autocast:
            images = sample(
                model,
                scheduler,
                cond,
                uncond,
                settings,
                generator=image_generators(seed, len(prompts)),
                guidance_scale=w,
            )
        judged = {}
        for split, held in (("seen", False), ("held_out", True)):
            idx = [i for i, p in enumerate(prompts) if p["held_out"] == held]
            if "objects" in prompts[0]:  # scene_prompts()
                judged[split] = scene_adherence(images[idx].float().cpu(), [prompts[i]["objects"] for i in idx])
            else:
                judged[split] = adherence(images[idx].float().cpu(), [prompts[i] for i in idx])
        results[w] = judged
    model.train(was_training)  # the EMA stays in eval mode (no dropout in later sample grids)
    return results
