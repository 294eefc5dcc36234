"""The training loop's pieces against values computed another way: the EMA against its recurrence
written out here, lr_at against the schedule's formulas, caption dropout and flips against the
batches the loop feeds the loss, evaluation against a run without it. In process, on tiny runs."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

import image_data
import text_encoders
import train_diffusion as td

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine


def recorded_run(train_in_process, argv, monkeypatch, force_flips=False):
    """Train argv in process and record what the loop did: the data D, the model before training,
    its weights after every optimizer step, the EMA at the end, and each training batch that
    reached the loss (x0, context, mask) in step order. emas[k]: the EMA after k updates."""
    rec = SimpleNamespace(steps=[], emas=[], batches=[])
    snapshot = lambda model: [p.detach().double().clone() for p in model.parameters()]
    load_data, build_training, loss = td.load_data, td.build_training, td.diffusion_loss

    def load(C, sysinfo):
        rec.D = load_data(C, sysinfo)
        rec.D.train_can_flip |= force_flips
        return rec.D

    def build(C, D, ckpt, sysinfo):
        rec.M = build_training(C, D, ckpt, sysinfo)
        rec.start = snapshot(rec.M.model)

        def after_step(*_):  # the loop updates the EMA after the optimizer's step: this sees the one before
            rec.steps.append(snapshot(rec.M.model))
            rec.emas.append(snapshot(rec.M.ema))

        rec.M.optimizer.register_step_post_hook(after_step)
        return rec.M

    def recording_loss(model, scheduler, x0, context, mask, *args, **kw):
        if model.training:  # validation runs in eval mode
            rec.batches.append((x0.clone(), context.clone(), mask.clone()))
        return loss(model, scheduler, x0, context, mask, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(td, "load_data", load)
        m.setattr(td, "build_training", build)
        m.setattr(td, "diffusion_loss", recording_loss)
        rec.run_dir = train_in_process(argv)
    rec.C, _ = td.configure(argv)
    return rec


def batch_images(rec, step):
    """The images of training step `step` as the loop reads them: global_batch_indices of the step."""
    idx = image_data.global_batch_indices(step, len(rec.D.train_images), rec.C.batch_size, rec.C.seed)
    return rec.D.train_images[idx].float() / 127.5 - 1, rec.D.train_rows[idx]


def assert_binomial(count, n, p, what):
    """count ~ Binomial(n, p), within 4.5 standard deviations."""
    assert abs(count - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (what, count, n, p)


STEPS = 20


@pytest.fixture(scope="module")
def recorded(tiny, train_in_process, tmp_path_factory):
    """One tiny run with caption dropout 0.3 and EMA decay 0.5 (its warmup (1 + k) / (10 + k) is the
    smaller up to step 8, ema_decay after), one with flips forced on the shapes data."""
    monkeypatch = pytest.MonkeyPatch()
    argv = tiny + ["--p_uncond=0.3", "--ema_decay=0.5", f"--max_steps={STEPS}", "--batch_size=16"]
    runs = {
        flips: recorded_run(
            train_in_process, argv + [f"--out_dir={tmp_path_factory.mktemp('loop')}"], monkeypatch, flips
        )
        for flips in (False, True)
    }
    monkeypatch.undo()
    return runs


def test_the_ema_is_its_warmed_up_recurrence(recorded):
    rec = recorded[False]
    assert len(rec.steps) == STEPS
    ema = rec.start
    for k, (weights, got) in enumerate(zip(rec.steps, rec.emas[1:] + [list(rec.M.ema.parameters())])):
        decay = min(0.5, (1 + k) / (10 + k))
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
        for expected, g in zip(ema, got):
            assert torch.allclose(g.double(), expected, rtol=0, atol=1e-6), (k, (g - expected).abs().max())
    assert not all(torch.equal(e, w) for e, w in zip(ema, rec.steps[-1]))  # the EMA is not the model


def test_dropped_captions_are_the_empty_caption_at_the_rate_p_uncond(recorded):
    rec = recorded[False]
    D, dropped, n = rec.D, 0, 0
    empty, empty_mask = text_encoders.TextEncoder("minilm", torch.device("cpu"))([""])
    L = empty.shape[1]
    assert torch.allclose(D.ctx_table[0, :L], empty[0], atol=1e-5) and torch.equal(D.ctx_mask[0, :L], empty_mask[0])
    assert not D.ctx_mask[0, L:].any()  # row 0 is the empty caption: its padding is masked out
    for step, (_, context, mask) in enumerate(rec.batches):
        _, rows = batch_images(rec, step)
        is_empty = (context == D.ctx_table[0]).flatten(1).all(1) & (mask == D.ctx_mask[0]).all(1)
        is_own = (context == D.ctx_table[rows]).flatten(1).all(1) & (mask == D.ctx_mask[rows]).all(1)
        assert (is_empty ^ is_own).all(), step  # each row is its own caption or the empty one, never another
        dropped, n = dropped + int(is_empty.sum()), n + len(rows)
    assert n == STEPS * 16
    assert_binomial(dropped, n, 0.3, "dropped captions")


@pytest.mark.parametrize("forced", [False, True], ids=["shapes_say_left_right", "flips_forced"])
def test_flips_mirror_the_width_axis_and_never_when_captions_name_sides(recorded, forced):
    rec = recorded[forced]
    flipped = n = 0
    for step, (x0, _, _) in enumerate(rec.batches):
        images, _ = batch_images(rec, step)
        same = (x0 == images).flatten(1).all(1)
        mirrored = (x0 == images.flip(3)).flatten(1).all(1) & ~same  # dims (B, 3, H, W): 3 is the width
        assert (same | mirrored).all(), step  # the image or its mirror image, nothing else (not flipped upside down)
        flipped, n = flipped + int(mirrored.sum()), n + len(images)
    if forced:
        assert_binomial(flipped, n, 0.5, "flips")
    else:
        assert flipped == 0  # shapes' captions name sides: never flipped


def test_evaluation_leaves_trainings_random_streams_alone(tiny, train_in_process, read_log, tmp_path):
    """Evaluation and sample grids every 3 steps, or never: the same training losses to the bit.
    Dropout 0.1 and DDIM eta 1 make both draw random numbers."""
    losses = []
    for every in (3, 1000):
        run_dir = train_in_process(
            tiny
            + [
                "--dropout=0.1",
                "--eta=1.0",
                "--max_steps=9",
                "--log_interval=1",
                f"--eval_interval={every}",
                f"--sample_interval={every}",
                f"--out_dir={tmp_path / str(every)}",
            ]
        )
        log = read_log(run_dir)
        losses.append({r["step"]: r["train/loss"] for r in log if "train/loss" in r})
        assert sum("val/loss" in r for r in log) == (4 if every == 3 else 2)  # steps 0, 3, 6, 9 / 0 and the end
    assert losses[0] == losses[1] and len(losses[0]) == 9


def test_lr_schedule_against_its_formulas():
    C = SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100)
    cosine = lambda s, end: (
        C.min_lr + 0.5 * (C.lr - C.min_lr) * (1 + math.cos(math.pi * (s - C.warmup_steps) / (end - C.warmup_steps)))
    )
    assert td.lr_at(0, C) == pytest.approx(C.lr / 100) and td.lr_at(49, C) == pytest.approx(C.lr / 2)  # linear warmup
    assert td.lr_at(99, C) == pytest.approx(C.lr) and td.lr_at(100, C) == pytest.approx(C.lr)  # warmup ends at the peak
    assert td.lr_at(600, C) == pytest.approx((C.lr + C.min_lr) / 2)  # the cosine's midpoint
    decay = [td.lr_at(s, C) for s in range(100, 1101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing to the end
    assert decay[-1] == pytest.approx(C.min_lr) and td.lr_at(5000, C) == pytest.approx(C.min_lr)
    for s in (137, 480, 1099):
        assert td.lr_at(s, C) == pytest.approx(cosine(s, 1100))
    C.max_steps = 2100  # raised on resume: the cosine stretches to the new end from where the run is
    for s in (600, 1100, 1600, 2099):
        assert td.lr_at(s, C) == pytest.approx(cosine(s, 2100))
    assert td.lr_at(1100, C) == pytest.approx((C.lr + C.min_lr) / 2)


@pytest.mark.parametrize("flips", [True, False])
def test_flips_setting_turns_off_mirroring_where_captions_allow_it(tiny, tmp_path, flips):
    from PIL import Image

    (tmp_path / "art").mkdir()
    rows = []
    for i in range(8):  # captions that name no side: image_data.mirrorable says yes
        Image.new("RGB", (20, 20), (30 * i, 100, 200)).save(tmp_path / "art" / f"{i}.png")
        rows.append(f'{{"file_name": "{i}.png", "text": "a blue square number {i}"}}')
    (tmp_path / "art" / "metadata.jsonl").write_text("\n".join(rows))
    args = [a for a in tiny if not a.startswith(("--dataset", "--batch_size"))]
    C, _ = td.configure(args + [f"--dataset={tmp_path / 'art'}", "--batch_size=2", f"--flips={flips}"])
    sysinfo = SimpleNamespace(device=torch.device("cpu"), master=True, world=1)
    can_flip = image_data.load_data(C, sysinfo).train_can_flip
    assert len(can_flip) > 0 and can_flip.tolist() == [flips] * len(can_flip)


def fake_data(n=40, size=8, rows=5):
    """A Data of random images and captions, no encoder: enough for get_batch."""
    g = torch.Generator().manual_seed(7)
    R, L, dim = rows, 3, 4  # caption rows, tokens, width
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    empty = (torch.zeros(1, L, dim), torch.zeros(1, L, dtype=torch.bool))
    return image_data.Data(
        name="fake",
        context_dim=dim,
        ctx_table=torch.randn(R, L, dim, generator=g),
        ctx_mask=torch.ones(R, L, dtype=torch.bool),
        train_images=images,
        train_rows=torch.randint(1, R, (n,), generator=g),
        train_can_flip=torch.rand(n, generator=g) < 0.5,
        val_images=images[:2],
        val_rows=torch.ones(2, dtype=torch.long),
        sample_prompts=["x"],
        sample_cond=empty,
        sample_uncond=empty,
    )


def test_a_batch_depends_only_on_seed_step_and_rank():
    """get_batch without a training run: the same (seed, step, rank) gives the same batch whatever
    the global RNG did meanwhile; another step or seed gives another; the ranks' slices of a global
    batch are what one process with the whole batch draws; x0 is the stored images in [-1, 1]."""
    data = fake_data()
    draw = lambda seed, step, rank=0, world=1, batch=8: image_data.get_batch(
        data, step, seed, rank, world, batch, 0.3, 50
    )
    first = draw(0, 3)
    torch.manual_seed(123)
    torch.rand(100)  # the global stream moves: the batch must not
    again = draw(0, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (draw(0, 4), draw(1, 3)):
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[4], other[4])
    whole = draw(0, 5, batch=8)
    halves = [draw(0, 5, rank=r, world=2, batch=4) for r in (0, 1)]
    for k, part in enumerate(whole):  # x0, context, mask, t, noise
        assert torch.equal(torch.cat([halves[0][k], halves[1][k]]), part), k
    x0, context, mask, t, noise = whole
    B, C, H, W = x0.shape
    assert (B, C, H, W) == (8, 3, 8, 8) and noise.shape == x0.shape and t.shape == (8,) and 0 <= t.min() <= t.max() < 50
    idx = image_data.global_batch_indices(5, len(data.train_images), 8, 0)
    stored = image_data.to_model_range(data.train_images[idx])
    assert all(
        torch.equal(x, s) or (torch.equal(x, s.flip(2)) and data.train_can_flip[i]) for x, s, i in zip(x0, stored, idx)
    )
    assert x0.min() >= -1 and x0.max() <= 1


def test_steps_in_budget_is_the_largest_run_that_fits():
    """steps_in_budget against a search over every candidate end step, with its evaluations counted
    one by one (every eval_interval steps after `step`, and one at the end)."""

    def fits(C, step, elapsed, per_step, per_eval, n):
        evals = sum(1 for k in range(step + 1, n + 1) if k % C.eval_interval == 0 or k == n)
        return elapsed + (n - step) * per_step + evals * per_eval <= C.max_minutes * 60

    for minutes, interval, elapsed, per_step, per_eval in [
        (10, 100, 30, 0.5, 20),
        (3, 200, 40, 0.24, 35),
        (1, 7, 5, 0.01, 0.3),
        (5, 1000, 2, 0.05, 0.0),
    ]:
        C = SimpleNamespace(max_minutes=minutes, eval_interval=interval)
        n = td.steps_in_budget(C, 60, elapsed, per_step, per_eval)
        best = max(
            k for k in range(61, 60 + int(minutes * 60 / per_step) + 2) if fits(C, 60, elapsed, per_step, per_eval, k)
        )
        assert n == best, (minutes, n, best)
    # a budget already spent still trains one more step, to its end
    assert td.steps_in_budget(SimpleNamespace(max_minutes=0.001, eval_interval=10), 60, 100, 1.0, 1.0) == 61


def test_a_time_budget_sets_max_steps_once_and_the_checkpoint_keeps_it(tiny, train_in_process, tmp_path, capsys):
    import checkpoints

    argv = tiny + [f"--out_dir={tmp_path}", "--max_steps=100000", "--max_minutes=0.05", "--eval_interval=40"]
    run_dir = train_in_process(argv)
    out = capsys.readouterr()
    line = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("time budget 0.05 min")]
    assert len(line) == 1 and "(instead of 100000: --max_minutes=0 keeps" in line[0], line
    fitted = int(line[0].split("max_steps ")[1].split()[0])
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["step"] == ckpt["config"]["max_steps"] == fitted > 60
    # resuming takes the stored max_steps: the run is finished, nothing is trained again
    assert train_in_process(tiny + [f"--out_dir={tmp_path}", "--resume=auto", "--max_minutes=0.05"]) == run_dir
    assert "finished at step" in capsys.readouterr().out


def test_caption_parts_cut_after_punctuation_and_shortened_versions_keep_them_in_order():
    caption = "Bulbasaur, a grass and poison type seed pokemon. It naps in the sun; it grows!"
    parts = ["Bulbasaur,", "a grass and poison type seed pokemon.", "It naps in the sun;", "it grows!"]
    assert image_data.caption_parts(caption) == parts
    assert image_data.caption_parts("a large blue circle in the top left") == ["a large blue circle in the top left"]
    assert image_data.caption_parts("3.5 kg, or so") == ["3.5 kg,", "or so"]  # a point inside a word cuts nothing
    versions = image_data.shortened_captions([caption, "one part only"], 200, seed=3)
    assert versions == image_data.shortened_captions([caption, "one part only"], 200, seed=3)  # seeded
    assert versions != image_data.shortened_captions([caption, "one part only"], 200, seed=4)
    assert versions[1] == ["one part only"] * 200
    assert image_data.shortened_captions(["", "  "], 3, seed=0) == [[""] * 3, ["  "] * 3]  # nothing to cut
    first = image_data.shortened_captions([caption, "one part only", ""], 4, seed=3, cut="first")
    assert first == [[" ".join(parts[1:])] * 4, ["one part only"] * 4, [""] * 4]  # the name goes, the rest stays
    assert [image_data.without_name(c) for c in (caption, "one part only", "")] == [r[0] for r in first]
    seen = set()
    for v in versions[0]:
        kept = v.split(" ")
        mask = []
        for part in parts:  # greedy in-order match: each version is a nonempty subsequence of the parts
            words = part.split(" ")
            hit = kept[: len(words)] == words
            mask.append(hit)
            kept = kept[len(words) :] if hit else kept
        assert not kept and any(mask), v
        seen.add(tuple(mask))
    assert len(seen) == 2**4 - 1  # every nonempty subset turns up in 200 draws (each kept w.p. 1/2)


def short_data(n=40, K=3):
    """fake_data with K shortened versions per image: rows 5.. of a larger table."""
    data = fake_data(n=n, rows=5 + n * K)
    data.train_rows = torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(1))
    data.train_short_rows = 5 + torch.arange(n * K).view(n, K)
    return data


def test_shortened_captions_replace_the_own_caption_at_the_rate_p_short():
    data = short_data()
    n = len(data.train_images)
    counts = dict(own=0, short=0, empty=0)
    for step in range(40):
        _, context, _, _, _ = image_data.get_batch(data, step, 0, 0, 1, 16, 0.2, 50, p_short=0.5)
        idx = image_data.global_batch_indices(step, n, 16, 0)
        for c, i in zip(context, idx):
            row = int((data.ctx_table == c).flatten(1).all(1).nonzero()[0])
            if row == 0:
                counts["empty"] += 1
            elif row == int(data.train_rows[i]):
                counts["own"] += 1
            else:
                assert row in data.train_short_rows[i].tolist(), (step, int(i), row)  # only its own versions
                counts["short"] += 1
    total = sum(counts.values())
    assert_binomial(counts["empty"], total, 0.2, "dropped captions")
    assert_binomial(counts["short"], counts["short"] + counts["own"], 0.5, "shortened captions")


def test_p_short_zero_leaves_batches_as_they_were_and_ranks_still_split_one_batch():
    data = short_data()
    plain = short_data()
    plain.train_short_rows = None
    for step in (0, 7):  # the draws before the shortening's are unchanged: no caption_parts, the same batch
        a = image_data.get_batch(data, step, 2, 0, 1, 8, 0.3, 50, p_short=0.0)
        b = image_data.get_batch(plain, step, 2, 0, 1, 8, 0.3, 50)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    whole = image_data.get_batch(data, 5, 0, 0, 1, 8, 0.3, 50, p_short=0.7)
    halves = [image_data.get_batch(data, 5, 0, r, 2, 4, 0.3, 50, p_short=0.7) for r in (0, 1)]
    for k, part in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][k], halves[1][k]]), part), k


def test_shifted_timesteps_follow_their_cdf_and_shift_one_is_todays_uniform_draw():
    """t_shift s > 1 warps u ~ U[0, 1) to t / T = s u / (1 + (s - 1) u), whose CDF is x / (s - (s - 1) x): the share
    of a large draw at or below each quarter of T matches it, and the median of s = 3 is 3T/4. With s = 1
    get_batch draws exactly what it drew before the setting existed (torch.randint), step by step."""
    T, n = 1000, 40000
    for s in (0.5, 3.0):
        t = image_data.shifted_timesteps(
            torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64), s, T
        )
        assert 0 <= t.min() and t.max() < T
        for x in (0.25, 0.5, 0.75):
            assert_binomial(int((t < x * T).sum()), n, x / (s - (s - 1) * x), f"s={s}, t < {x}T")
    assert abs(image_data.shifted_timesteps(torch.tensor([0.5], dtype=torch.float64), 3.0, T).item() - 750) <= 1
    data = fake_data()
    for step in (0, 7):
        t = image_data.get_batch(data, step, 2, 0, 1, 8, 0.3, 50, t_shift=1.0)[3]
        g = torch.Generator().manual_seed(2 * 1_000_003 + step)
        torch.rand(8, generator=g), torch.rand(8, generator=g)  # caption dropout and flips come first
        assert torch.equal(t, torch.randint(0, 50, (8,), generator=g))
        shifted = image_data.get_batch(data, step, 2, 0, 1, 8, 0.3, 50, t_shift=3.0)[3]
        assert not torch.equal(shifted, t)


@pytest.mark.parametrize("cut", ["random", "first"])
def test_load_data_embeds_each_training_captions_shortened_versions(tiny, tmp_path, train_in_process, monkeypatch, cut):
    from PIL import Image

    (tmp_path / "art").mkdir()
    rows = []
    for i in range(10):
        Image.new("RGB", (20, 20), (20 * i, 100, 200)).save(tmp_path / "art" / f"{i}.png")
        rows.append(f'{{"file_name": "{i}.png", "text": "Mon{i}, a water type pokemon. It swims number {i}."}}')
    (tmp_path / "art" / "metadata.jsonl").write_text("\n".join(rows))
    args = [a for a in tiny if not a.startswith(("--dataset", "--batch_size"))]
    C, _ = td.configure(
        args + [f"--dataset={tmp_path / 'art'}", "--batch_size=2", "--caption_parts=0.5", f"--caption_cut={cut}"]
    )
    sysinfo = SimpleNamespace(device=torch.device("cpu"), master=True, world=1)
    D = image_data.load_data(C, sysinfo)
    K = image_data.CAPTION_VARIANTS
    assert D.train_short_rows.shape == (len(D.train_images), K)
    encoder = text_encoders.TextEncoder("minilm", torch.device("cpu"))
    captions = [f"Mon{i}, a water type pokemon. It swims number {i}." for i in range(10)]
    train_idx = image_data.split_indices(10, C.seed, C.val_fraction, C.eval_images)[1].tolist()
    versions = image_data.shortened_captions([captions[i] for i in train_idx], K, C.seed, cut)
    if cut == "first":  # computed another way: the caption after its first comma
        assert versions[0] == [captions[train_idx[0]].split(", ", 1)[1]] * K
    for j in (0, len(train_idx) - 1):  # each row holds the embedding of that version, computed here alone
        for k in (0, K - 1):
            ctx, mask = encoder([versions[j][k]])
            row = D.train_short_rows[j, k]
            L = ctx.shape[1]
            assert torch.allclose(D.ctx_table[row, :L], ctx[0], atol=1e-5) and torch.equal(D.ctx_mask[row, :L], mask[0])
            assert not D.ctx_mask[row, L:].any()
    C0, _ = td.configure(args + [f"--dataset={tmp_path / 'art'}", "--batch_size=2"])
    assert image_data.load_data(C0, sysinfo).train_short_rows is None
    shares = []  # the loop hands caption_parts to get_batch as p_short, and t_shift as t_shift
    monkeypatch.setattr(td, "get_batch", lambda *a, **k: shares.append(a[8:]) or image_data.get_batch(*a, **k))
    train_in_process(
        args
        + [
            f"--dataset={tmp_path / 'art'}",
            "--batch_size=2",
            "--caption_parts=0.5",
            "--t_shift=3",
            "--max_steps=2",
            f"--out_dir={tmp_path / 'runs'}",
        ]
    )
    assert shares == [(0.5, 3.0), (0.5, 3.0)]
