"""A small CNN classifier of the embedded dataset; its penultimate layer is our offline FID feature space."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class ShapesClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128, image_size: int = 32):
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, feature_dim=feature_dim, image_size=image_size)
        self.image_size = image_size
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))  # 32 -> 4
        self.features = nn.Linear(4 * w * (image_size // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x):
        """x in [-1, 1], (B,3,H,W), resized to the training size if needed -> (features, logits)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        f = self.features(self.body(x).flatten(1))
        return f, self.head(F.relu(f))

    def forward(self, x):
        return self.embed(x)[1]
