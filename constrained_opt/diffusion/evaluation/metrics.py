"""Unlearning metrics: classifier scores, FID on classifier features, precision/recall, peak memory.

- P_ψ(y = c_f | x_f): mean classifier probability of the forgotten class on images generated for it;
  H = −E Σ_i P_ψ(y_i|x_f) log P_ψ(y_i|x_f) (nats) on the same images.
- Remaining accuracy: fraction of images generated for the remaining classes classified as their class.
- FID: torchmetrics ``FrechetInceptionDistance`` with the evaluation classifier's penultimate layer
  as ``feature`` — "FID (classifier features)" — or Inception-v3 when the user supplies its weights.
- Improved precision/recall (Kynkäänniemi et al. 2019, k = 3) on the same features.

Statistics: :func:`mean_ci95` (Student-t interval over seeds), :func:`bootstrap_ci95` (percentile
interval over resampled evaluation samples, for a single seed) and :func:`real_split_floor` (the
metrics between two disjoint halves of the real data: how far apart two samples of the *same*
distribution already are).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..runtime.errors import EvaluationError, UsageError


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


def _read_hwm() -> int:
    """This process's peak resident set size since the last reset (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


_HWM_METERS: list[PeakMemory] = []  # open CPU meters that read VmHWM


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0: ``5`` written to ``/proc/self/clear_refs``), after
    folding the peak so far into every open meter that reads it. False where this is not possible."""
    try:
        peak = _read_hwm()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    for meter in _HWM_METERS:
        meter._peak = max(meter._peak, peak)
    return True


class PeakMemory:
    """Peak memory (MiB) of a code block, readable live through ``peak_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory, like the paper's Table 4).
    CPU: peak RSS minus RSS on entry, i.e. the extra memory the block made the process hold. On Linux
    the peak is the kernel's high-water mark (``VmHWM``, reset on entry), so no peak is missed however
    short; elsewhere a thread samples the RSS every 5 ms (psutil), which can miss a peak shorter than
    that or one during which the thread does not get to run. Freed heap is handed back to the OS first
    (glibc ``malloc_trim``), so a block does not run on memory that an earlier block allocated and
    freed, which would hide its own use. Meters may nest: entering one keeps the peaks of the open ones.
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
        peak = max(self._peak, _read_hwm()) if self._hwm else self._peak
        return (peak - self._start) / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        _release_free_heap()
        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._hwm = _reset_hwm()
        if self._hwm:
            _HWM_METERS.append(self)
            return self
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
        elif self._hwm:
            self._peak = max(self._peak, _read_hwm())
            _HWM_METERS.remove(self)
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


METRICS = ("p_forget", "forget_entropy", "remaining_accuracy", "fid", "precision", "recall")


@dataclass
class SampleScores:
    """Per-sample quantities every metric is computed from: class probabilities of the generated
    images, their conditioning labels, and classifier features of the generated remaining-class images
    and of the real ones."""

    probs: Tensor
    labels: Tensor
    features: Tensor
    real_features: Tensor
    forget_class: int


def score_samples(
    classifier, samples: Tensor, labels: Tensor, real: Tensor, forget_class: int
) -> SampleScores:
    """Non-finite samples or features raise :class:`EvaluationError` (see :func:`require_finite`)."""
    require_finite(samples, "generated images")
    feature = classifier_features(classifier)
    keep = labels != forget_class
    fake_features, real_features = feature(samples[keep]), feature(real)
    require_finite(real_features, "classifier features of the real images")
    require_finite(fake_features, "classifier features of the generated images")
    return SampleScores(
        classifier_probs(classifier, samples), labels, fake_features, real_features, forget_class
    )


def identity_features(num_features: int) -> FeatureExtractor:
    """A feature module that passes precomputed features through (FID on stored features)."""
    return FeatureExtractor(lambda x: x, num_features)


def metrics_from_scores(s: SampleScores, index: Tensor | None = None) -> dict[str, float]:
    """The six quality/erasure figures from ``s`` (or from the generated samples at ``index``, with
    repetition: a bootstrap resample)."""
    probs, labels = s.probs, s.labels
    features = s.features
    if index is not None:
        probs, labels = probs[index], labels[index]
        position = torch.cumsum(s.labels != s.forget_class, 0) - 1  # row of each sample in `features`
        kept = index[s.labels[index] != s.forget_class]
        features = s.features[position[kept]]
    is_forget = labels == s.forget_class
    p_forget, entropy = forget_scores(probs[is_forget], s.forget_class)
    precision, recall = precision_recall(s.real_features, features)
    return {
        "p_forget": p_forget,
        "forget_entropy": entropy,
        "remaining_accuracy": accuracy(probs[~is_forget], labels[~is_forget]),
        "fid": fid(s.real_features, features, identity_features(features.shape[1])),
        "precision": precision,
        "recall": recall,
    }


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
    out = metrics_from_scores(score_samples(classifier, samples, labels, real, forget_class))
    if inception_weights:
        out["fid_inception"] = inception_fid(real, samples[labels != forget_class], inception_weights)
    return out


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (to 6 decimals); beyond,
# the Cornish–Fisher expansion around the normal quantile (error < 1e-4). Hard-coded because scipy is
# not a runtime dependency.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip


def t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval of the mean); half-width NaN for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def bootstrap_ci95(scores: SampleScores, rounds: int = 200, seed: int = 0) -> dict[str, float]:
    """Half-widths of 95% percentile bootstrap intervals of every metric over the evaluation samples.

    Each round redraws the generated samples with replacement within each class (so every class keeps
    its count) and recomputes the metrics; the real images are held fixed (every model is compared
    with the same real set). Half-width = (q97.5 − q2.5) / 2.
    """
    g = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(scores.labels == c).flatten() for c in scores.labels.unique()]
    draws: dict[str, list[float]] = {k: [] for k in METRICS}
    for _ in range(rounds):
        index = torch.cat([grp[torch.randint(len(grp), (len(grp),), generator=g)] for grp in groups])
        for k, v in metrics_from_scores(scores, index).items():
            draws[k].append(v)
    out = {}
    for k, values in draws.items():
        q = torch.quantile(
            torch.tensor(values, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)
        )
        out[k] = float(q[1] - q[0]) / 2
    return out


def real_split_floor(real_features: Tensor, rounds: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """FID, precision and recall between two random disjoint halves of the real features, over
    ``rounds`` splits: ``{metric: {"mean": …, "sd": …}}``. Two samples of one distribution score this
    far from perfect, so model differences below it are not resolved by that metric at this size."""
    g = torch.Generator().manual_seed(seed)
    half = len(real_features) // 2
    draws: dict[str, list[float]] = {"fid": [], "precision": [], "recall": []}
    for _ in range(rounds):
        perm = torch.randperm(len(real_features), generator=g)
        a, b = real_features[perm[:half]], real_features[perm[half:]]
        precision, recall = precision_recall(a, b)
        draws["fid"].append(fid(a, b, identity_features(a.shape[1])))
        draws["precision"].append(precision)
        draws["recall"].append(recall)
    return {k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v)} for k, v in draws.items()}
