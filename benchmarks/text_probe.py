"""
Does the frozen text encoder already bind each object's words to its place? Linear probes on its token
embeddings of two-object captions (shapes.scene_caption, canonical wording):

    python -m benchmarks.text_probe                      # the packaged MiniLM
    python -m benchmarks.text_probe --text_encoder=<a CLIP id or folder>

For every object of `n` scenes: from the embedding of its color word, predict its corner; from its shape
word, its corner; from the last word of its place ("left"/"right"), its color. A probe well above chance
means the binding is in the tokens that cross-attention reads, and one attention hop from an image token
to its place's words could fetch what goes there. Logistic regression on standardised features,
trained on the first 80% of the objects, scored on the rest.
"""

import sys

import torch

import shapes
from configurator import parse_config, run_cli
from text_encoders import TextEncoder

DEFAULTS = dict(text_encoder="minilm", n=3000, seed=7, iters=300)


def probe(x, y, iters):
    """Held-out accuracy of a logistic regression from x (N, D) to the classes y (N,)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n_train, k = int(0.8 * len(y)), int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(iters):
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean().item(), 1 / k


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    torch.manual_seed(C.seed)
    encoder = TextEncoder(C.text_encoder)
    _, _, scenes = shapes.make_scenes(C.n, 16, seed=C.seed, captions="six")
    captions = [shapes.scene_caption(objects) for objects in scenes]
    with torch.no_grad():
        ctx, _ = encoder(captions)  # (n, L, D)
    words = [encoder.tokenizer.convert_ids_to_tokens(ids) for ids in encoder.tokenizer(captions)["input_ids"]]
    corner = {c: i for i, c in enumerate(shapes.CORNERS)}
    color = {c: i for i, c in enumerate(shapes.COLORS)}
    rows = {"color word -> its corner": [], "shape word -> its corner": [], "place word -> its color": []}
    for n, (objects, w) in enumerate(zip(scenes, words)):
        where = lambda vocab, k: [i for i, word in enumerate(w) if word in vocab][k]  # noqa: E731
        for k, o in enumerate(objects):
            rows["color word -> its corner"].append((ctx[n, where(shapes.COLORS, k)], corner[o["position"]]))
            rows["shape word -> its corner"].append((ctx[n, where(shapes.SHAPES, k)], corner[o["position"]]))
            rows["place word -> its color"].append((ctx[n, where(("left", "right"), k)], color[o["color"]]))
    print(f"{C.text_encoder}, {C.n} two-object captions, held-out accuracy of linear probes on its token embeddings")
    print("| probe | accuracy | chance |")
    print("|---|---|---|")
    for name, pairs in rows.items():
        acc, chance = probe(torch.stack([x for x, _ in pairs]).float(), torch.tensor([y for _, y in pairs]), C.iters)
        print(f"| {name} | {acc:.3f} | {chance:.3f} |")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
