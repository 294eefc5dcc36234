"""The real-image metric (image_quality.py): each estimator against the same quantity computed
another way, then the metric validated on real art as FID was (Heusel et al. 2017), where the
shared Pokémon art exists, and its place in training."""

import json
import os

import pytest
import torch

import image_quality as iq

ART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "pokedex-art")
needs_metric = pytest.mark.skipif(not iq.available(), reason=f"metric packages missing: {iq.INSTALL_HINT}")


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5,
    )
    k = lambda a, b: (sum(ai * bi for ai, bi in zip(a.tolist(), b.tolist())) / 3 + 1) ** 3
    m = len(x)
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    expected = (
        sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
        - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    )
    # one subset of all m images: the estimate is the whole-set one (only the order differs)
    mean, _ = iq.kid(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx(1000 * expected, rel=1e-9)


def test_kid_is_zero_on_average_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    draw = lambda shift: torch.randn(400, 16, generator=g, dtype=torch.float64) + shift
    same, spread = iq.kid(draw(0.0), draw(0.0), subsets=100, subset_size=100)
    assert abs(same) < spread  # within the spread of one subset (the subsets overlap: their mean is not 10x tighter)
    shifts = [iq.kid(draw(0.0), draw(s))[0] for s in (0.1, 0.3, 0.9)]
    assert spread < shifts[0] < shifts[1] < shifts[2]


def test_frechet_distance_of_a_shifted_and_a_scaled_set():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    c = torch.arange(8, dtype=torch.float64) / 4
    # the same covariance: only the means differ
    assert iq.frechet_distance(real, real + c) == pytest.approx(c.square().sum().item(), rel=1e-6)
    # fake = s * real: |mu (1 - s)|^2 + Tr(S) + s^2 Tr(S) - 2 s Tr(S) = |mu|^2 (1-s)^2 + (1-s)^2 Tr(S)
    s = 0.5
    expected = (1 - s) ** 2 * (real.mean(0).square().sum() + torch.cov(real.T).trace())
    assert iq.frechet_distance(real, s * real) == pytest.approx(expected.item(), rel=1e-6)


def test_copy_check_on_hand_made_features():
    train = torch.eye(4, dtype=torch.float64)  # four orthogonal "training images"
    samples = torch.tensor([[2.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, -1.0]], dtype=torch.float64)
    # cosine to the nearest training row: 1 (a scaled copy), 1/sqrt(2), 0 (opposite of one, orthogonal to the rest)
    assert iq.nearest_similarity(samples, train).tolist() == pytest.approx([1.0, 2**-0.5, 0.0])
    assert iq.copy_share(samples, train, threshold=0.9) == pytest.approx(1 / 3)
    assert iq.nearest_similarity(train, train, exclude_self=True).tolist() == [0.0] * 4
    held_out = torch.tensor([[1.0, 1.0, 1.0, 1.0]] * 99 + [[3.0, 0, 0, 0.1]], dtype=torch.float64)
    # torch.quantile interpolates: the 0.99 quantile of 99 values of 0.5 and one of v is 0.5 + 0.01 (v - 0.5)
    v = 3 / (9 + 0.01) ** 0.5
    assert iq.copy_threshold(held_out, train) == pytest.approx(0.5 + 0.01 * (v - 0.5))


def test_primary_type_and_the_probe():
    assert iq.primary_type("Bulbasaur, a grass and poison type seed pokemon. It naps.") == "grass"
    assert iq.primary_type("Charmander, a fire type lizard pokemon.") == "fire"
    assert iq.primary_type("a drawing of a pink cat") is None
    assert (
        iq.type_phrase("Bulbasaur, a grass and poison type seed pokemon. It naps.") == "a grass and poison type pokemon"
    )
    assert iq.type_phrase("Charmander, a Fire type lizard pokemon.") == "a fire type pokemon"
    assert iq.type_phrase("a drawing of a pink cat") is None
    g = torch.Generator().manual_seed(3)
    centers = {
        "fire": torch.tensor([3.0, 0, 0]),
        "water": torch.tensor([0, 3.0, 0]),
        "grass": torch.tensor([0, 0, 3.0]),
    }
    labels = ["fire"] * 30 + ["water"] * 20 + ["grass"] * 10
    feats = torch.stack([centers[t] for t in labels]).double() + 0.3 * torch.randn(
        60, 3, generator=g, dtype=torch.float64
    )
    probe = iq.TypeProbe(feats, labels)
    assert probe.accuracy(feats, labels) == 1.0
    assert probe.accuracy(feats.flip(1), labels) < 0.5  # fire and grass swapped: the probe reads the features
    assert iq.majority_share(labels, ["fire", "water", "fire", "grass"]) == 0.5


def test_caption_similarity_own_against_every_other():
    art = torch.eye(3, dtype=torch.float64)
    own, other = iq.caption_similarity(art, art)  # samples that are their own captions' art
    assert (own, other) == (pytest.approx(1.0), pytest.approx(0.0))


def test_blur_and_noise_degrade_by_their_amount():
    img = torch.zeros(1, 3, 15, 15, dtype=torch.uint8)
    img[..., 7, 7] = 255
    for sigma in (0.5, 1.0, 2.0):
        out = iq.blur(img, sigma)[0, 0].double()
        ys = torch.arange(15, dtype=torch.float64) - 7
        var = (out.sum(1) * ys.square()).sum() / out.sum()  # the spread of the blurred point along y
        assert var.item() == pytest.approx(sigma**2, rel=0.2)  # a sampled, truncated Gaussian kernel
    noisy = iq.add_noise(torch.full((1, 3, 64, 64), 128, dtype=torch.uint8), 0.1)
    assert (noisy.double().std() / 255).item() == pytest.approx(0.1, rel=0.05)


@needs_metric
def test_weights_are_the_pinned_file(monkeypatch):
    monkeypatch.setattr(iq, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="not the pinned"):
        iq.FeatureExtractor()


# -----------------------------------------------------------------------------
# Validation on real art (skips where ../shared is absent, as in a fresh clone)


@pytest.fixture(scope="module")
def art_features():
    if not os.path.isdir(ART):
        pytest.skip("no ../shared/data/pokedex-art here (a fresh clone): the real-art validation needs it")
    if not iq.available():
        pytest.skip(f"metric packages missing: {iq.INSTALL_HINT}")
    from image_data import load_art

    train, cap_train, held, cap_held = load_art(ART, 32, seed=0, val_fraction=0.2, eval_images=256)
    fe = iq.FeatureExtractor()
    sub = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(held)]]
    return dict(
        fe=fe, train=fe(train), held=fe(held), sub_images=sub, sub=fe(sub), cap_train=cap_train, cap_held=cap_held
    )


def test_real_art_halves_score_zero_within_the_spread(art_features):
    everything = torch.cat([art_features["train"], art_features["held"]])
    perm = torch.randperm(len(everything), generator=torch.Generator().manual_seed(5))
    mean, spread = iq.kid(everything[perm[: len(perm) // 2]], everything[perm[len(perm) // 2 :]])
    assert abs(mean) < spread


def test_kid_rises_with_blur_and_with_noise(art_features):
    fe, held = art_features["fe"], art_features["held"]
    sub = art_features["sub_images"][:100]  # 100 images a level: 6 levels of features are most of this file's minutes
    clean = iq.kid(held, art_features["sub"][:100])[0]
    blurred = [iq.kid(held, fe(iq.blur(sub, s)))[0] for s in (0.5, 1.0, 2.0)]
    noisy = [iq.kid(held, fe(iq.add_noise(sub, s)))[0] for s in (0.05, 0.1, 0.2)]
    assert clean < blurred[0] < blurred[1] < blurred[2]
    assert clean < noisy[0] < noisy[1] < noisy[2]


def test_copy_share_of_training_art_is_one_and_of_new_art_about_one_percent(art_features):
    train, held = art_features["train"], art_features["held"]
    threshold = iq.copy_threshold(held, train)
    assert iq.copy_share(art_features["sub"], train, threshold) == 1.0
    half = len(held) // 2  # a threshold from one half of the held-out art, measured on the other
    assert iq.copy_share(held[half:], train, iq.copy_threshold(held[:half], train)) <= 0.05


def test_type_probe_beats_the_majority_on_held_out_art(art_features):
    labels = [iq.primary_type(c) for c in art_features["cap_train"]]
    held_labels = [iq.primary_type(c) for c in art_features["cap_held"]]
    probe = iq.TypeProbe(art_features["train"], labels)
    assert probe.accuracy(art_features["held"], held_labels) > iq.majority_share(labels, held_labels) + 0.05


# -----------------------------------------------------------------------------
# In training


def _tiny_folder(path, n=24, caption="a {} square"):
    from PIL import Image

    path.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (20, 20), (10 * i, 255 - 10 * i, 40 * (i % 3))).save(path / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": caption.format(("red", "green", "blue")[i % 3])})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _train_on_tiny_folder(tiny, tmp_path, train_in_process, caption="a {} square"):
    """Two steps of the tiny run on a 24-image folder (6 held out), evaluating at every step."""
    folder = _tiny_folder(tmp_path / "data", caption=caption)
    args = [a for a in tiny if not a.startswith(("--dataset", "--batch_size"))]
    return train_in_process(
        args
        + [
            f"--dataset={folder}",
            "--batch_size=4",
            "--max_steps=2",
            "--eval_interval=1",
            "--val_fraction=0.25",
            f"--out_dir={tmp_path / 'out'}",
        ]
    )


@needs_metric
def test_image_datasets_log_kid_and_copies_at_each_evaluation(tiny, tmp_path, train_in_process, read_log, one_thread):
    run_dir = _train_on_tiny_folder(tiny, tmp_path, train_in_process)
    evals = [r for r in read_log(run_dir) if "val/loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert 0.0 <= r["quality/copy_share"] <= 1.0 and r["quality/kid_std"] >= 0 and r["quality/seconds"] > 0


def test_training_without_the_metric_says_so_once(
    tiny, tmp_path, train_in_process, read_log, one_thread, monkeypatch, capsys
):
    monkeypatch.setattr(iq, "available", lambda: False)
    run_dir = _train_on_tiny_folder(tiny, tmp_path, train_in_process)
    assert capsys.readouterr().err.count("real-image evaluation is off") == 1
    assert not any(k.startswith("quality/") for r in read_log(run_dir) for k in r)


def test_quality_benchmark_refuses_unknown_weights_in_one_line():
    import benchmarks.quality as bq
    from configurator import UserError

    with pytest.raises(UserError, match=r"--weights=last: use ema .* or model") as e:
        bq.main(["--dataset=anything", "--weights=last"])
    assert "\n" not in str(e.value)


def test_quality_benchmark_refuses_a_grid_name_that_is_no_image_before_any_work():
    import benchmarks.quality as bq
    from configurator import UserError

    with pytest.raises(UserError, match=r"--out=scores.json is the grid image: give it a .png or .jpg name"):
        bq.main(["--dataset=anything", "--out=scores.json"])


@needs_metric
def test_quality_benchmark_focus_guides_toward_each_captions_type(tiny, tmp_path, train_in_process, one_thread):
    import benchmarks.quality as bq

    run_dir = _train_on_tiny_folder(tiny, tmp_path, train_in_process, caption="Mon, a {} type pokemon. It naps.")
    args = [f"--dataset={tmp_path / 'data'}", f"--checkpoint={run_dir}", "--steps=2", "--device=cpu"]
    plain = bq.main([*args, f"--out={tmp_path / 'plain.png'}"])
    focused = bq.main([*args, "--focus_scale=2", f"--out={tmp_path / 'focus.png'}"])
    assert (plain["focus_scale"], focused["focus_scale"]) == (0.0, 2.0)
    assert focused["kid"] != plain["kid"]  # the same noise, another guidance: other samples
    nameless = bq.main([*args, "--drop_name=true", f"--out={tmp_path / 'nameless.png'}"])
    assert nameless["drop_name"] and nameless["kid"] != plain["kid"]  # "a red type pokemon. It naps.": other samples


@needs_metric
def test_quality_benchmark_draws_are_the_single_draws_averaged(tiny, tmp_path, train_in_process, one_thread):
    import benchmarks.quality as bq

    run_dir = _train_on_tiny_folder(tiny, tmp_path, train_in_process, caption="Mon, a {} type pokemon. It naps.")
    args = [f"--dataset={tmp_path / 'data'}", f"--checkpoint={run_dir}", "--steps=2", "--device=cpu"]
    single = [bq.main([*args, f"--sample_seed={s}", f"--out={tmp_path / f'{s}.png'}"]) for s in (3, 4)]
    assert single[0]["kid"] != single[1]["kid"]  # other noise, other samples
    both = bq.main([*args, "--sample_seed=3", "--draws=2", f"--out={tmp_path / 'both.png'}"])
    assert [d["sample_seed"] for d in both["draws"]] == [3, 4]
    for key in ("kid", "kid_std", "fd", "copy_share", "probe_samples"):
        assert [d[key] for d in both["draws"]] == [r[key] for r in single]
        assert both[key] == pytest.approx((single[0][key] + single[1][key]) / 2)
    assert "draws" not in single[0]


def test_quality_benchmark_refuses_no_draws_in_one_line():
    import benchmarks.quality as bq
    from configurator import UserError

    with pytest.raises(UserError, match=r"--draws=0: draw at least once") as e:
        bq.main(["--dataset=anything", "--draws=0"])
    assert "\n" not in str(e.value)


@needs_metric
def test_quality_benchmark_refuses_focus_and_drops_no_name_where_captions_have_none(
    tiny, tmp_path, train_in_process, one_thread
):
    import benchmarks.quality as bq
    from configurator import UserError

    run_dir = _train_on_tiny_folder(tiny, tmp_path, train_in_process)
    args = [f"--dataset={tmp_path / 'data'}", f"--checkpoint={run_dir}", "--steps=2", "--device=cpu"]
    plain = bq.main([*args, f"--out={tmp_path / 'plain.png'}"])
    one_part = bq.main([*args, "--drop_name=true", f"--out={tmp_path / 'one_part.png'}"])
    assert one_part["kid"] == plain["kid"]  # "a red square" has no name to drop: the same prompts, the same samples
    with pytest.raises(UserError, match=r"captions name none \('a \w+ square'\): leave --focus_scale=0") as e:
        bq.main([f"--dataset={tmp_path / 'data'}", f"--checkpoint={run_dir}", "--focus_scale=1", "--device=cpu"])
    assert "\n" not in str(e.value)
