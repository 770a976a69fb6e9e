"""Feature extractors of the quality metrics: our shapes classifier registered with torch-fidelity, Inception-v3.

Our small shapes classifier is registered with torch-fidelity as 'var-bench-classifier' (works offline;
`torch_fidelity.calculate_metrics(feature_extractor='var-bench-classifier', feature_extractor_weights_path=...)` uses
it too), and an Inception weights file selects torch-fidelity's standard 'inception-v3-compat', its bytes verified
as they are read. Features are extracted by torch-fidelity's modules with our batching on the images' device.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from typing import Dict, Optional

import torch

from bench.checkpoints import check_compatible, file_sha256, read_state_dict
from bench.defaults import QUALITY_METRICS as METRICS
from bench.errors import BenchError
from bench.log import get_logger, progress
from bench.memory import release_freed_memory
from bench.models.classifier import ShapesClassifier
from bench.zoo import read_manifest

logger = get_logger(__name__)

EXTRACTOR_NAME = "var-bench-classifier"    # our classifier, as registered with torch-fidelity
INCEPTION_NAME = "inception-v3-compat"     # torch-fidelity's TF-compatible Inception-v3


def infer_classifier_config(sd: Dict[str, torch.Tensor]) -> dict:
    """ShapesClassifier kwargs read off its weights (the architecture fixes them)."""
    try:
        width = int(sd["body.0.0.weight"].shape[0])
        feature_dim, flat = (int(s) for s in sd["features.weight"].shape)
        num_classes = int(sd["head.weight"].shape[0])
    except KeyError as e:
        raise BenchError(f"quality classifier weights lack {e.args[0]!r}; is this a ShapesClassifier state dict?") \
            from None
    side = math.isqrt(max(flat // (4 * width), 0))
    return dict(num_classes=num_classes, width=width, feature_dim=feature_dim, image_size=8 * side)


def _classifier_config_for(path: str) -> Optional[dict]:
    """The manifest's `classifier_config` of a shipped classifier file, if this is one."""
    base = os.path.basename(path)
    for entry in read_manifest().get("models", {}).values():
        if entry.get("files", {}).get("classifier") == base and entry.get("classifier_config"):
            return dict(entry["classifier_config"])
    return None


def _register():
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.helpers import vassert
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """bench.models.classifier.ShapesClassifier as a torch-fidelity feature extractor.

        Input: uint8 (N,3,H,W) as torch-fidelity passes images. Features: 'features' (the 128-d penultimate layer:
        FID, KID, PR), 'logits' (the trained class posterior: IS) and 'logits_unbiased' (head without its bias, for
        parity with Inception's feature names). Weights: `feature_extractor_weights_path` (safetensors or a plain
        state dict, loaded without pickled code); `classifier_config` (ShapesClassifier kwargs) is optional."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, classifier_config=None, **kwargs):
            super().__init__(name, features_list)
            vassert(feature_extractor_weights_path is not None,
                    f"{name} needs feature_extractor_weights_path (the classifier's .safetensors)")
            sd = read_state_dict(feature_extractor_weights_path, "quality classifier weights")
            cfg = dict(classifier_config or _classifier_config_for(feature_extractor_weights_path)
                       or infer_classifier_config(sd))
            self.net = ShapesClassifier(**cfg)
            check_compatible(self.net, sd, f"quality classifier weights {feature_extractor_weights_path}",
                             f"ShapesClassifier({cfg})")
            self.net.load_state_dict(sd, strict=True)  # shipped fp16 weights are cast to fp32 here
            self.net.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "features", "logits", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                    "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
            x = x.float().div(127.5).sub(1).contiguous(memory_format=torch.channels_last)  # range of to_model_range
            f, logits = self.net.embed(x)
            out = {"features": f, "logits": logits}
            if "logits_unbiased" in self.features_list:
                out["logits_unbiased"] = logits - self.net.head.bias
            return tuple(out[k].float() for k in self.features_list)

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
    return FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME]


ClassifierFeatureExtractor = _register()

_SHA_MEMO: Dict[tuple, str] = {}
_EXTRACTORS: Dict[tuple, torch.nn.Module] = {}
_INCEPTION: Dict[str, Dict[str, torch.Tensor]] = {}


def _verified_inception(path: str):
    """(sha256, tensors) of an Inception weights file whose bytes are read exactly once: the hash, the safe load
    (no pickled code) and the finiteness check all see those bytes, so a file swapped later changes nothing."""
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    if sha not in _INCEPTION:
        _INCEPTION.clear()   # one set of Inception weights in memory at a time (~100 MB)
        _INCEPTION[sha] = read_state_dict(path, "Inception weights", data=data)
    return sha, _INCEPTION[sha]


def _weights_sha(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


class Extractor:
    """Which torch-fidelity extractor, with which weights, and the layer each metric reads."""

    def __init__(self, name: str, weights: str, config: Optional[dict] = None):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        self.name, self.weights, self.config = name, weights, config
        if name == INCEPTION_NAME:
            self.sha256, self._state = _verified_inception(weights)
        else:
            self.sha256 = _weights_sha(weights)
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.layers = {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}
        # one feature array serves FID, KID and PR (true for both extractors; the cache stores that one)
        assert self.layers["fid"] == self.layers["kid"] == self.layers["prc"]
        self.feature_layer, self.isc_layer = self.layers["fid"], self.layers["isc"]

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.sha256[:8]}"

    @property
    def feature_dim(self) -> int:
        if self.name == INCEPTION_NAME:
            return int(self.feature_layer)
        return int(read_state_dict(self.weights, "quality classifier weights")["features.weight"].shape[0])

    def module(self, device) -> torch.nn.Module:
        """The torch-fidelity module on `device`, built once per (weights, device)."""
        key = (self.name, self.sha256, str(device))
        if key not in _EXTRACTORS:
            from torch_fidelity.utils import create_feature_extractor
            with tempfile.TemporaryDirectory(prefix="var-bench-inception-") as private:
                weights = self.weights
                if self.name == INCEPTION_NAME:
                    # torch-fidelity unpickles its weights file with weights_only=False: it never sees the user's
                    # file, only a copy written here (in a directory only we can read) from the verified tensors
                    weights = os.path.join(private, "inception-verified.pt")
                    torch.save(self._state, weights)
                kwargs = dict(feature_extractor_weights_path=weights, verbose=False)
                if self.config:
                    kwargs["classifier_config"] = self.config
                try:
                    fe = create_feature_extractor(self.name, [self.feature_layer, self.isc_layer], cuda=False,
                                                  **kwargs)
                except RuntimeError as e:  # load_state_dict: wrong file for this architecture
                    first = str(e).strip().splitlines()[0][:200]
                    raise BenchError(f"weights {self.weights} do not fit torch-fidelity's {self.name}: {first}") \
                        from None
            if len(_EXTRACTORS) >= 4:
                _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
            _EXTRACTORS[key] = fe.to(device)
        return _EXTRACTORS[key]

    @torch.no_grad()
    def extract(self, images, device=None, batch_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """uint8 (N,3,H,W) (a tensor, or bench.stored_images.StoredImages read a batch at a time) -> {layer: (N, D)
        float32 CPU tensor}, batched on `device` (default: the images')."""
        device = torch.device(device) if device is not None else images.device
        batch_size = batch_size or (64 if self.name == INCEPTION_NAME else 250)  # Inception works at 299px
        fe = self.module(device)
        # each layer's rows written into one tensor allocated at the first batch: small per-batch outputs kept among
        # the freed activations fragmented the heap, and the resident set grew with N (+146 MB at 5000 images of 32²)
        features: Dict[str, torch.Tensor] = {}
        start = 0
        for batch in progress(images.split(batch_size), total=-(-len(images) // batch_size),
                              desc=f"{self.name} features", unit="batch", logger=logger):
            out = fe.convert_features_tuple_to_dict(fe(batch.to(device, non_blocking=True)))
            for k, v in out.items():
                if k not in features:
                    features[k] = torch.empty((len(images), *v.shape[1:]), dtype=torch.float32)
                features[k][start:start + len(v)] = v.float().cpu()
            start += len(batch)
        release_freed_memory()
        return features


def resolve_extractor(bundle=None, inception_weights: Optional[str] = None,
                      classifier: Optional[str] = None) -> Extractor:
    """Inception-v3 when a weights file is given (nothing is downloaded), else the model's shipped classifier."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise BenchError(f"Inception weights not found: {inception_weights} (torch-fidelity's "
                             f"weights-inception-2015-12-05-6726825d.pth; nothing can be downloaded here)")
        return Extractor(INCEPTION_NAME, inception_weights)   # verified as it is read (_verified_inception)
    path = classifier or (bundle.classifier if bundle is not None else None)
    if not path:
        name = getattr(bundle, "name", "this model")
        raise BenchError(f"{name} ships no quality classifier; give Inception weights (inception_weights= / "
                         f"--inception-weights) or a classifier .safetensors")
    if not os.path.isfile(path):
        raise BenchError(f"quality classifier weights not found: {path}")
    return Extractor(EXTRACTOR_NAME, path, _classifier_config_for(path))



def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float images (as bench.sampling.generate returns them) -> uint8; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8)
