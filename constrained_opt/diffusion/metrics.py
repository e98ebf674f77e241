"""Unlearning metrics: classifier scores, FID on classifier features, precision/recall, peak memory.

- P_ψ(y = c_f | x_f): mean classifier probability of the forgotten class on images generated for it;
  H = −E Σ_i P_ψ(y_i|x_f) log P_ψ(y_i|x_f) (nats) on the same images.
- Remaining accuracy: fraction of images generated for the remaining classes classified as their class.
- FID: torchmetrics ``FrechetInceptionDistance`` with the evaluation classifier's penultimate layer
  as ``feature`` — "FID (classifier features)" — or Inception-v3 when the user supplies its weights.
- Improved precision/recall (Kynkäänniemi et al. 2019, k = 3) on the same features.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from torch import Tensor, nn

from .errors import EvaluationError, UsageError


class FeatureExtractor(nn.Module):
    """Adapter giving torchmetrics FID a feature module: batches (N, ...) → (N, num_features) float."""

    def __init__(self, fn, num_features: int, batch_size: int = 1000):
        super().__init__()
        self.fn, self.num_features, self.batch_size = fn, num_features, batch_size

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.fn(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])


def classifier_features(classifier) -> FeatureExtractor:
    """The classifier's penultimate layer as an FID feature module (inputs in [-1, 1])."""
    device = next(classifier.parameters()).device
    return FeatureExtractor(lambda x: classifier.features(x.to(device)).cpu(), classifier.num_features)


def fid(real: Tensor, fake: Tensor, feature: nn.Module) -> float:
    """Fréchet distance ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) between ``feature`` embeddings.

    ``feature`` must expose ``num_features``; inputs are passed to it unchanged (float).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def inception_fid(real: Tensor, fake: Tensor, weights_path: str) -> float:
    """Inception-v3 FID (2048-d pool features) from user-provided torch-fidelity weights.

    Images in [-1, 1] are mapped to [0, 1] and grey images repeated to 3 channels; torchmetrics
    resizes to 299×299. Needs the ``torch-fidelity`` package.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not os.path.isfile(weights_path):
        raise UsageError(f"Inception weights not found: {weights_path}")
    try:
        metric = FrechetInceptionDistance(
            feature=2048, normalize=True, feature_extractor_weights_path=weights_path
        )
    except ModuleNotFoundError as e:
        raise UsageError(f"Inception FID needs torch-fidelity ({e}); pip install torch-fidelity") from None

    def prep(x: Tensor) -> Tensor:
        x = (x + 1) / 2
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    for start in range(0, len(real), 200):
        metric.update(prep(real[start : start + 200]), real=True)
    for start in range(0, len(fake), 200):
        metric.update(prep(fake[start : start + 200]), real=False)
    return float(metric.compute())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (N, d).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour (self excluded). Precision = fraction of fake points inside the real manifold;
    recall = fraction of real points inside the fake manifold. Hand-written (``prdc`` prints and
    spawns 8 workers; this is a few lines of ``torch.cdist``).
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than k points per set")
    real, fake = real.double(), fake.double()

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k + 1: the 0 self-distance comes first

    def coverage(points: Tensor, support: Tensor) -> float:
        inside = torch.cdist(points, support) <= radii(support)[None, :]
        return inside.any(dim=1).double().mean().item()

    return coverage(fake, real), coverage(real, fake)


@torch.no_grad()
def classifier_probs(classifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    device = next(classifier.parameters()).device
    return torch.cat(
        [
            classifier(images[i : i + batch_size].to(device)).softmax(-1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def forget_scores(probs: Tensor, forget_class: int) -> tuple[float, float]:
    """(P(y = c_f | x_f), mean entropy in nats) from class probabilities on forget-class samples."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return probs[:, forget_class].mean().item(), entropy.mean().item()


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(-1) == labels).double().mean().item()


def _release_free_heap() -> None:
    """Return freed malloc arenas to the OS (glibc only; a no-op elsewhere)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory (MiB) of a code block, readable live through ``peak_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory, like the paper's Table 4).
    CPU: the process's resident set size is sampled every 5 ms by a thread (psutil); the figure is
    peak RSS minus RSS on entry, i.e. the extra memory the block made the process hold. Freed heap
    is handed back to the OS first (glibc ``malloc_trim``), so a block does not run on memory that an
    earlier block allocated and freed, which would hide its own use.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._final: float | None = None

    @property
    def peak_mb(self) -> float:
        if self._final is not None:
            return self._final
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return (self._peak - self._start) / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        _release_free_heap()
        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
        self._final = self.peak_mb


def require_finite(x: Tensor, what: str) -> None:
    """Raise :class:`EvaluationError` if a row of ``x`` holds NaN or inf: FID's matrix square root
    (LAPACK's DGEBAL) can crash the whole process on them, and every other figure would be NaN."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bad.any():
        raise EvaluationError(f"{int(bad.sum())} of {len(x)} {what} are not finite (NaN or inf)")


def evaluate_generated(
    classifier,
    samples: Tensor,
    labels: Tensor,
    real: Tensor,
    forget_class: int,
    inception_weights: str | None = None,
) -> dict[str, float]:
    """All quality/erasure figures for one model from its samples (one per entry of ``labels``).

    ``real`` holds real images of the remaining classes; FID and precision/recall compare them with the
    samples generated for the remaining classes. Non-finite samples or features raise
    :class:`EvaluationError` before any figure is computed.
    """
    require_finite(samples, "generated images")
    probs = classifier_probs(classifier, samples)
    is_forget = labels == forget_class
    p_forget, entropy = forget_scores(probs[is_forget], forget_class)
    generated = samples[~is_forget]
    feature = classifier_features(classifier)
    real_features, fake_features = feature(real), feature(generated)
    require_finite(real_features, "classifier features of the real images")
    require_finite(fake_features, "classifier features of the generated images")
    precision, recall = precision_recall(real_features, fake_features)
    out = {
        "p_forget": p_forget,
        "forget_entropy": entropy,
        "remaining_accuracy": accuracy(probs[~is_forget], labels[~is_forget]),
        "fid": fid(real, generated, feature),
        "precision": precision,
        "recall": recall,
    }
    if inception_weights:
        out["fid_inception"] = inception_fid(real, generated, inception_weights)
    return out
