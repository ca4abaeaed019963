"""MTCNN's P-, R- and O-Net (Zhang et al. 2016), defined here with the layer names of
facenet-pytorch's state dicts, whose real weights (`data/{pnet,rnet,onet}.pt` in the
facenet-pytorch wheel) load into them strictly. facenet-pytorch itself imports torchvision,
which does not install here, so only its weight files are used. Outputs are named for what they
are: a face probability, box regression and (O-Net) five landmarks."""

from __future__ import annotations

from torch import nn


def _stage(in_channels: int, out_channels: int, kernel: int, pool: tuple[int, int] | None, index: int) -> dict[str, nn.Module]:
    layers = {f"conv{index}": nn.Conv2d(in_channels, out_channels, kernel), f"prelu{index}": nn.PReLU(out_channels)}
    if pool:
        layers[f"pool{index}"] = nn.MaxPool2d(pool[0], pool[1], ceil_mode=True)
    return layers


class PNet(nn.Module):
    """Fully convolutional: any image of 12 x 12 or more -> maps of face probability and boxes."""

    def __init__(self) -> None:
        super().__init__()
        for name, layer in {**_stage(3, 10, 3, (2, 2), 1), **_stage(10, 16, 3, None, 2), **_stage(16, 32, 3, None, 3)}.items():
            setattr(self, name, layer)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, image):
        x = self.prelu1(self.conv1(image))
        x = self.pool1(x)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(dim=1), self.conv4_2(x)


class RNet(nn.Module):
    """24 x 24 candidates -> face probability and box refinement."""

    def __init__(self) -> None:
        super().__init__()
        for name, layer in {**_stage(3, 28, 3, (3, 2), 1), **_stage(28, 48, 3, (3, 2), 2), **_stage(48, 64, 2, None, 3)}.items():
            setattr(self, name, layer)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)  # the weights' (w, h, c) order
        x = self.prelu4(self.dense4(x))
        return self.dense5_1(x).softmax(dim=1), self.dense5_2(x)


class ONet(nn.Module):
    """48 x 48 faces -> face probability, box refinement and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        stages = {**_stage(3, 32, 3, (3, 2), 1), **_stage(32, 64, 3, (3, 2), 2), **_stage(64, 64, 3, (2, 2), 3), **_stage(64, 128, 2, None, 4)}
        for name, layer in stages.items():
            setattr(self, name, layer)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_1(x).softmax(dim=1), self.dense6_2(x), self.dense6_3(x)


def pnet() -> PNet:
    return PNet().eval()


def rnet() -> RNet:
    return RNet().eval()


def onet() -> ONet:
    return ONet().eval()
